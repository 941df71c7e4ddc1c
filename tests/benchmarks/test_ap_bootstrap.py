"""The paired ΔAP bootstrap (benchmarks/ap_bootstrap.py) on synthetic COCO ground truth: the identity draw gives
pycocotools' own AP exactly, a variant equal to the reference has a zero-width interval, and a jittered variant's
interval lies below zero and covers its ΔAP."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("pycocotools", reason="pycocotools not installed (dev extra)")
from benchmarks.ap_bootstrap import delta_interval, draws, evaluated, resampled_ap  # noqa: E402
from benchmarks.coco_metrics import coco_keypoint_metrics  # noqa: E402


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    from training.data.synthetic import ANNOTATION_FILE, SyntheticConfig, generate_dataset
    return generate_dataset(SyntheticConfig(num_images=12, seed=5), tmp_path_factory.mktemp("coco") / "set") \
        / ANNOTATION_FILE


def _predictions(ann, jitter: float, seed: int) -> list[dict]:
    """GT keypoints moved by `jitter` × sqrt(area) / 10 pixels (normal), as a model's results file holds them."""
    rng = np.random.default_rng(seed)
    preds = []
    for a in json.loads(ann.read_text())["annotations"]:
        k = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
        k[:, :2] += rng.normal(scale=jitter, size=(len(k), 2)) * np.sqrt(a["area"]) / 10.0
        k[:, 2] = 1.0
        preds.append({"image_id": a["image_id"], "category_id": 1, "keypoints": k.reshape(-1).tolist(),
                      "score": 1.0})
    return preds


def _image_ids(ann) -> list[int]:
    return sorted(i["id"] for i in json.loads(ann.read_text())["images"])


def test_identity_draw_is_pycocotools_ap(ann):
    ids = _image_ids(ann)
    preds = _predictions(ann, 0.4, seed=1)
    expected = coco_keypoint_metrics(ann, preds, ids)["AP"]
    got = resampled_ap(evaluated(ann, preds, ids), np.arange(len(ids))[None])[0]
    print(f"AP pycocotools {expected:.4f}, identity draw {got:.4f}, |diff| {abs(got - expected):.2e} (tol 1e-3)")
    assert 0.0 < expected < 100.0
    assert got == pytest.approx(expected, abs=1e-3)  # report rounds to 3 decimals


def test_interval_is_paired_and_covers_a_real_drop(ann):
    ids = _image_ids(ann)
    picks = draws(len(ids), resamples=200, seed=0)
    assert picks.shape == (200, len(ids)) and picks.min() >= 0 and picks.max() < len(ids)
    ref_preds = _predictions(ann, 0.2, seed=1)
    ref = resampled_ap(evaluated(ann, ref_preds, ids), picks)
    assert delta_interval(ref, resampled_ap(evaluated(ann, ref_preds, ids), picks)) == [0.0, 0.0]
    worse_preds = _predictions(ann, 0.5, seed=2)
    delta = coco_keypoint_metrics(ann, worse_preds, ids)["AP"] - coco_keypoint_metrics(ann, ref_preds, ids)["AP"]
    lo, hi = delta_interval(ref, resampled_ap(evaluated(ann, worse_preds, ids), picks))
    print(f"ΔAP {delta:.2f}, 90% interval [{lo:.2f}, {hi:.2f}]")
    assert lo <= delta <= hi and hi < 0.0
    assert hi - lo > 0.1  # draws differ: a zero-width interval here would mean the resampling did nothing


def test_subset_report_reads_eval_predictions(ann, tmp_path, capsys):
    from benchmarks.ap_bootstrap import main
    for name, jitter, seed in (("reference", 0.2, 1), ("int4-template", 0.5, 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keypoints_results.json").write_text(json.dumps(_predictions(ann, jitter, seed)))
    assert main([str(ann), str(tmp_path), "--images", "6", "12", "--out", str(tmp_path / "r.json")]) == 0
    print(capsys.readouterr().out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report) == ["6", "12"] and report["6"]["images"] == 6
    full = report["12"]["variants"]["int4-template"]
    lo, hi = full["delta_AP_ci90"]
    assert lo <= full["delta_AP"] <= hi < 0.0  # the same drop test_interval_... measures on all images
