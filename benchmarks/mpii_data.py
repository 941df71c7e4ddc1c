"""MPII validation data in the layout LocLLM and HRNet read: `valid.json` and `annot/gt_valid.mat`.

`valid.json` is a list of persons `{image, center, scale, joints [16][2], joints_vis [16]}` in MATLAB's 1-based
pixels; `gt_valid.mat` holds the same persons as columns (`pos_gt_src` [16, 2, N], `jnt_missing` [16, N],
`headboxes_src` [2, 2, N], `dataset_joints` [1, 16]). The crop is LocLLM's `MPIIDataset`: centre y += 15·scale and
scale × 1.25 (only when the centre is known), then 1-based → 0-based; no rotation, 200-px scale unit.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import InputError
from runtime.paths import relative_name

NUM_JOINTS = 16
# `dataset_joints` of gt_valid.mat, in the order LocLLM's keypoint set `mpii` asks them (the scorer indexes both
# by position, so a file in another order is refused rather than mis-scored)
MAT_JOINTS = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor", "neck", "head", "rwri", "relb",
              "rsho", "lsho", "lelb", "lwri")


@dataclass(frozen=True, eq=False)
class MpiiPerson:
    """One evaluated person: LocLLM's crop centre/scale (0-based) and the 0-based ground truth."""

    ins_id: int  # position in valid.json = column in gt_valid.mat
    file_name: str  # the image, relative to --images
    center: np.ndarray  # float32 [2]
    scale: np.ndarray  # float32 [2], box side / 200
    joints: np.ndarray  # float32 [16, 2], 0-based image pixels
    joints_vis: np.ndarray  # float32 [16]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The square the crop covers (x, y, w, h): what a result reports as its person box."""
        side = float(self.scale[0]) * 200.0
        return (float(self.center[0]) - side / 2, float(self.center[1]) - side / 2, side, side)


def locllm_center_scale(center, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """LocLLM `MPIIDataset.__init__`: float32 throughout, as it computes it."""
    c = np.array(center, dtype=np.float32)
    s = np.array([scale, scale], dtype=np.float32)
    c[1] = c[1] + 15 * s[1]  # lower the centre a little so the crop keeps the feet
    s = s * 1.25
    return c - 1, s  # MATLAB 1-based → 0-based


def read_mpii_persons(path: str | os.PathLike) -> list[MpiiPerson]:
    name = os.fspath(path)
    try:
        data = json.loads(Path(name).read_bytes())
    except FileNotFoundError:
        raise InputError(f"MPII annotation file {name!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read MPII annotation file {name!r}: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise InputError(f"MPII annotation file {name!r} must hold a non-empty JSON list of persons "
                         f"{{image, center, scale, joints, joints_vis}}")
    return [_person(i, entry, name) for i, entry in enumerate(data)]


def _person(i: int, entry, source: str) -> MpiiPerson:
    where = f"{source}: entry {i}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} is a {type(entry).__name__}; expected an object {{image, center, scale, ...}}")
    missing = [k for k in ("image", "center", "scale", "joints", "joints_vis") if k not in entry]
    if missing:
        raise InputError(f"{where} has no {missing}; expected image, center, scale, joints, joints_vis")
    image = relative_name(str(entry["image"]), f"{where} image", "the images folder", InputError)
    center, scale = entry["center"], entry["scale"]
    if not (_numbers(center) and len(center) == 2):
        raise InputError(f"{where} has center {center!r}; expected [x, y]")
    if not _numbers([scale]) or not scale > 0:
        raise InputError(f"{where} has scale {scale!r}; expected a positive number (person height / 200)")
    if center[0] == -1:  # MPII's marker for "no person position": LocLLM would crop around (-2, ...)
        raise InputError(f"{where} (image {image}) has centre {center!r}, MPII's 'unknown' marker; "
                         f"expected a person centre (drop such entries from the file)")
    joints = np.asarray(entry["joints"], dtype=object)
    if joints.ndim != 2 or joints.shape[1] != 2 or not _numbers(list(joints.reshape(-1))):
        raise InputError(f"{where} has joints of shape {joints.shape}; expected [{NUM_JOINTS}][2] numbers")
    if joints.shape[0] != NUM_JOINTS or len(entry["joints_vis"]) != NUM_JOINTS:
        raise InputError(f"{where} has {joints.shape[0]} joints and {len(entry['joints_vis'])} joints_vis; "
                         f"expected {NUM_JOINTS} (MPII)")
    c, s = locllm_center_scale(center, float(scale))
    return MpiiPerson(ins_id=i, file_name=image, center=c, scale=s,
                      joints=joints.astype(np.float32) - 1, joints_vis=np.asarray(entry["joints_vis"], np.float32))


def _numbers(values) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


@dataclass(frozen=True)
class MpiiGroundTruth:
    """gt_valid.mat, checked: joint positions (1-based), visibility and head boxes per person."""

    pos_gt: np.ndarray  # [16, 2, N]
    visible: np.ndarray  # [16, N]: 1 - jnt_missing
    headboxes: np.ndarray  # [2, 2, N]: (x1, y1), (x2, y2)

    @property
    def count(self) -> int:
        return self.pos_gt.shape[2]


def read_gt_valid(path: str | os.PathLike, persons: int | None = None) -> MpiiGroundTruth:
    """Read and check gt_valid.mat; `persons` (valid.json's length) must equal its number of columns."""
    from scipy.io import loadmat  # scipy only where MPII is evaluated (the [bench] extra)
    from scipy.io.matlab import MatReadError

    name = os.fspath(path)
    if not Path(name).is_file():
        raise InputError(f"MPII head-box file {name!r} does not exist; expected gt_valid.mat (MPII's annot/)")
    try:
        mat = loadmat(name)
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as exc:
        raise InputError(f"cannot read {name!r} as a MATLAB .mat file: {exc}") from exc
    missing = [k for k in ("dataset_joints", "jnt_missing", "pos_gt_src", "headboxes_src") if k not in mat]
    if missing:
        raise InputError(f"{name} lacks {missing}; expected gt_valid.mat with dataset_joints, jnt_missing, "
                         f"pos_gt_src and headboxes_src")
    joints = tuple(str(np.asarray(j).reshape(-1)[0]) if np.asarray(j).size else ""
                   for j in np.asarray(mat["dataset_joints"]).reshape(-1))
    if joints != MAT_JOINTS:
        raise InputError(f"{name}: dataset_joints {list(joints)}; expected MPII's order {list(MAT_JOINTS)}")
    pos = np.asarray(mat["pos_gt_src"], dtype=np.float64)
    miss = np.asarray(mat["jnt_missing"], dtype=np.float64)
    heads = np.asarray(mat["headboxes_src"], dtype=np.float64)
    n = pos.shape[-1] if pos.ndim == 3 else -1
    if pos.shape != (NUM_JOINTS, 2, n) or miss.shape != (NUM_JOINTS, n) or heads.shape != (2, 2, n):
        raise InputError(f"{name}: pos_gt_src {pos.shape}, jnt_missing {miss.shape}, headboxes_src {heads.shape}; "
                         f"expected [16, 2, N], [16, N], [2, 2, N] for one N")
    if persons is not None and n != persons:
        raise InputError(f"{name} has {n} persons but the MPII annotation file has {persons}; expected the "
                         f"gt_valid.mat that belongs to this valid.json")
    visible = 1 - miss
    sizes = np.linalg.norm(heads[1] - heads[0], axis=0)
    bad = np.flatnonzero((sizes <= 0) & (visible.sum(0) > 0))
    if bad.size:
        raise InputError(f"{name}: person {int(bad[0])} has an empty head box {heads[:, :, bad[0]].tolist()}; "
                         f"expected a head box of positive size (PCKh divides by it)")
    return MpiiGroundTruth(pos_gt=pos, visible=visible, headboxes=heads)
