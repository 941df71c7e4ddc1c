"""MPII PCKh exactly as LocLLM `MPIIDataset.evaluate` (HRNet's scorer) computes it.

head size = 0.6 × the head box diagonal; a joint is correct when its error / head size ≤ the threshold (a joint
exactly at the threshold counts); per-joint PCKh over the visible joints (`1 - jnt_missing`). `Mean` weighs the
joints by their visible counts with pelvis, thorax, neck and head top (joints 6-9) masked out — the paper's "only
keypoints that appear in COCO". `Mean@0.1` is read, as LocLLM and HRNet read it, at `np.arange(0, 0.51, 0.01)[11]`,
a threshold of **0.11**. The four masked joints are the zero-shot columns, reported unmasked and unhalved here
(LocLLM's own printout shows them masked).
"""
from __future__ import annotations

import numpy as np

from .mpii_data import NUM_JOINTS, MpiiGroundTruth

SC_BIAS = 0.6
THRESHOLD = 0.5
THRESHOLDS = np.arange(0, 0.5 + 0.01, 0.01)
MEAN_AT_01_INDEX = 11  # THRESHOLDS[11] == 0.11: the threshold the paper's "PCKh@0.1" was computed at
ZERO_SHOT = {"Pelvis": 6, "Thorax": 7, "Neck": 8, "Head top": 9}  # not COCO joints: out of Mean
GROUPS = {"Shoulder": (13, 12), "Elbow": (14, 11), "Wrist": (15, 10), "Hip": (3, 2), "Knee": (4, 1),
          "Ankle": (5, 0)}  # (left, right) in MPII order
COLUMNS = ("Mean", "Mean@0.1", *GROUPS, *ZERO_SHOT)


def scaled_errors(pred: np.ndarray, gt: MpiiGroundTruth) -> np.ndarray:
    """[16, N] error / head size for 0-based predictions [N, 16, 2] (LocLLM adds 1: the GT is 1-based)."""
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != (gt.count, NUM_JOINTS, 2):
        raise ValueError(f"predictions of shape {pred.shape}; expected ({gt.count}, {NUM_JOINTS}, 2)")
    pos_pred = np.transpose(pred + 1.0, [1, 2, 0])
    err = np.linalg.norm(pos_pred - gt.pos_gt, axis=1)
    heads = SC_BIAS * np.linalg.norm(gt.headboxes[1] - gt.headboxes[0], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # a person with no visible joint may have no head box
        return err / heads * gt.visible


def pckh_per_joint(scaled: np.ndarray, visible: np.ndarray, threshold: float) -> np.ndarray:
    """[16] percent of visible joints within threshold (NaN for a joint never visible)."""
    hits = np.sum((scaled <= threshold) * visible, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * hits / np.sum(visible, axis=1)


def pckh_table(pred: np.ndarray, gt: MpiiGroundTruth) -> dict:
    """The columns of the paper's table plus per-joint PCKh@0.5 (MPII order) and the joint counts."""
    scaled = scaled_errors(pred, gt)
    at_05 = pckh_per_joint(scaled, gt.visible, THRESHOLD)
    at_011 = pckh_per_joint(scaled, gt.visible, THRESHOLDS[MEAN_AT_01_INDEX])
    count = np.sum(gt.visible, axis=1)
    kept = np.ones(NUM_JOINTS, bool)
    kept[list(ZERO_SHOT.values())] = False
    ratio = count[kept] / np.sum(count[kept])
    zero_ratio = count[~kept] / np.sum(count[~kept])
    table = {"Mean": float(np.sum(at_05[kept] * ratio)), "Mean@0.1": float(np.sum(at_011[kept] * ratio))}
    table.update({g: float(0.5 * (at_05[left] + at_05[right])) for g, (left, right) in GROUPS.items()})
    table.update({g: float(at_05[j]) for g, j in ZERO_SHOT.items()})
    table["Zero-shot mean"] = float(np.sum(at_05[~kept] * zero_ratio))
    return {"PCKh": {k: _num(v) for k, v in table.items()},
            "PCKh_per_joint": [_num(v) for v in at_05], "PCKh@0.11_per_joint": [_num(v) for v in at_011],
            "joint_counts": [int(c) for c in count]}


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)
