"""The AP harness on real COCO ground truth (../shared/data/coco-mini): GT as predictions scores AP 100,
jittered GT scores lower, monotonically with the jitter."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tiny

pytest.importorskip("pycocotools", reason="pycocotools not installed (dev extra)")
from benchmarks.coco_metrics import coco_keypoint_metrics  # noqa: E402

ANN = tiny.SHARED / "data" / "coco-mini" / "person_keypoints.json"


def _gt_predictions(jitter: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    data = json.loads(ANN.read_text())
    preds = []
    for a in data["annotations"]:
        if a.get("iscrowd") or max(a["keypoints"]) == 0:
            continue
        k = np.asarray(a["keypoints"], dtype=np.float64).reshape(17, 3)
        k[:, :2] += rng.normal(scale=jitter, size=(17, 2)) * np.sqrt(a["area"]) / 10.0
        k[:, 2] = 1.0
        preds.append({"image_id": a["image_id"], "category_id": 1, "keypoints": k.reshape(-1).tolist(),
                      "score": 1.0})
    return preds


@pytest.mark.skipif(not ANN.exists(), reason=f"{ANN} not found (../shared is not part of a user's clone)")
def test_gt_scores_100_and_jitter_lowers_ap_monotonically():
    ap = [coco_keypoint_metrics(ANN, _gt_predictions(j))["AP"] for j in (0.0, 0.2, 0.5, 1.0, 2.0)]
    print("AP by jitter (0, .2, .5, 1, 2):", ap)
    assert ap[0] == pytest.approx(100.0, abs=1e-6)
    assert all(a > b for a, b in zip(ap, ap[1:])), ap


def test_no_predictions_is_zero(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    assert coco_keypoint_metrics(ann, [])["AP"] == 0.0
