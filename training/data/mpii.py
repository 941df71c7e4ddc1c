"""Synthetic MPII-format validation sets from the same figures as the COCO sets:

    python -m training.data.synthetic --mpii --out DIR --num-images N --seed S

writes DIR/images/NNNNNN.jpg, DIR/annot/valid.json and DIR/annot/gt_valid.mat in the layout LocLLM and HRNet read
(MATLAB 1-based pixels). The 16 joints are the figure's COCO joints in MPII order plus its pelvis, thorax, upper
neck and head top (`Figure.landmarks`); the head box bounds the drawn head (skin and hair). Scenes are rendered by
`render_scene`, so image i is the same picture as in the COCO set of the same config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .figure import HEAD
from .synthetic import SyntheticConfig, render_scene, write_atomically

# MPII joint → the figure's COCO keypoint index, or ("landmark", row of Figure.landmarks)
MPII_SOURCES = (16, 14, 12, 11, 13, 15, ("landmark", 0), ("landmark", 1), ("landmark", 2), ("landmark", 3),
                10, 8, 6, 5, 7, 9)
MAT_JOINTS = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor", "neck", "head", "rwri", "relb",
              "rsho", "lsho", "lelb", "lwri")
CENTER_SHIFT = 15  # LocLLM lowers the centre by 15·scale; the file's centre sits that much higher


def mpii_joints(fig) -> np.ndarray:
    """[16, 2] image pixels (0-based) in MPII order."""
    return np.stack([fig.landmarks[s[1]] if isinstance(s, tuple) else fig.keypoints[s] for s in MPII_SOURCES])


def head_box(fig) -> np.ndarray:
    """[2, 2]: (x1, y1), (x2, y2) of the drawn head, 0-based."""
    pts = np.concatenate([g for kind, part, _, g in fig.prims if kind == "poly" and part == HEAD])
    return np.stack([pts.min(0), pts.max(0)])


def build_mpii(cfg: SyntheticConfig, image_dir: Path | None = None) -> tuple[list[dict], dict]:
    """Renders the scenes; returns valid.json's list and gt_valid.mat's arrays (persons whose box centre is in
    the image and with a joint inside it)."""
    valid, pos, missing, heads = [], [], [], []
    for index in range(cfg.num_images):
        img, anns, figs = render_scene(cfg, index)
        w, h = img.size
        name = f"{index + 1:06d}.jpg"
        kept = 0
        for ann, fig in zip(anns, figs):
            x, y, bw, bh = ann["bbox"]
            cx, cy = x + bw / 2, y + bh / 2
            joints = mpii_joints(fig)
            vis = ((joints[:, 0] >= 0) & (joints[:, 0] <= w - 1) & (joints[:, 1] >= 0) & (joints[:, 1] <= h - 1))
            if not (0 <= cx <= w - 1 and 0 <= cy <= h - 1) or not vis.any():
                continue
            kept += 1
            scale = round(max(bw, bh) / 200.0, 6)
            one = np.round(joints + 1, 2)  # MATLAB 1-based
            valid.append({"image": name, "center": [round(cx + 1, 2), round(cy + 1 - CENTER_SHIFT * scale, 2)],
                          "scale": scale, "joints": one.tolist(), "joints_vis": [int(v) for v in vis]})
            pos.append(one)
            missing.append(~vis)
            heads.append(np.round(head_box(fig) + 1, 2))
        if kept and image_dir is not None:
            img.save(image_dir / name, quality=cfg.jpeg_quality, subsampling=0)
    gt = {"pos_gt_src": np.stack(pos, axis=2) if pos else np.zeros((16, 2, 0)),
          "jnt_missing": (np.stack(missing, axis=1) if missing else np.zeros((16, 0))).astype(np.uint8),
          "headboxes_src": np.stack(heads, axis=2) if heads else np.zeros((2, 2, 0))}
    return valid, gt


def write_gt_valid(path: str | os.PathLike, pos_gt_src: np.ndarray, jnt_missing: np.ndarray,
                   headboxes_src: np.ndarray, joints: tuple[str, ...] = MAT_JOINTS) -> None:
    """gt_valid.mat as MPII's eval code has it (`dataset_joints` a 1×16 cell array of names)."""
    from scipy.io import savemat
    names = np.empty((1, len(joints)), dtype=object)
    for i, j in enumerate(joints):
        names[0, i] = np.array([j])
    savemat(path, {"dataset_joints": names, "jnt_missing": np.asarray(jnt_missing, np.uint8),
                   "pos_gt_src": np.asarray(pos_gt_src, np.float64),
                   "headboxes_src": np.asarray(headboxes_src, np.float64)})


def generate_mpii(cfg: SyntheticConfig, out_dir: str | os.PathLike) -> Path:
    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        (tmp / "annot").mkdir()
        valid, gt = build_mpii(cfg, tmp / "images")
        (tmp / "annot" / "valid.json").write_text(json.dumps(valid, separators=(",", ":")))
        write_gt_valid(tmp / "annot" / "gt_valid.mat", **gt)
    return write_atomically(out_dir, fill)
