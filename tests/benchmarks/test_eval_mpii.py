"""`posellm-edge eval --mpii`: the reference and a variant on the synthetic MPII set, LocLLM's pred_kpt.json
re-scored independently, and one-line errors for wrong flags."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("scipy", reason="MPII's gt_valid.mat is read with scipy (the [bench] extra)")

from benchmarks.evaluate import EvalConfig, evaluate  # noqa: E402
from posellm_edge.cli import main  # noqa: E402
from runtime.keypoint_sets import KEYPOINT_SETS  # noqa: E402
from training.data.mpii import generate_mpii  # noqa: E402
from training.data.synthetic import SyntheticConfig  # noqa: E402

TOL = 1e-4  # the report rounds PCKh to 4 decimals


@pytest.fixture(scope="module")
def mpii_set(tmp_path_factory):
    return generate_mpii(SyntheticConfig(num_images=3, seed=9, background="plain"),
                         tmp_path_factory.mktemp("mpii") / "set")


def _rescore(pred_file, valid_file, mat_file) -> dict:
    """PCKh written out joint by joint (not the vectorised scorer), from LocLLM's pred_kpt.json."""
    from scipy.io import loadmat
    mat = loadmat(mat_file)
    n = len(json.loads(valid_file.read_text()))
    preds = {p["ins_id"]: p["keypoints"] for p in json.loads(pred_file.read_text())}
    hits05, hits011, count = [0] * 16, [0] * 16, [0] * 16
    for i in range(n):
        (x1, y1), (x2, y2) = mat["headboxes_src"][0, :, i], mat["headboxes_src"][1, :, i]
        head = 0.6 * math.hypot(x2 - x1, y2 - y1)
        for j in range(16):
            if mat["jnt_missing"][j, i]:
                continue
            x, y = preds[i][3 * j] + 1, preds[i][3 * j + 1] + 1  # 0-based → MATLAB 1-based
            d = math.hypot(x - mat["pos_gt_src"][j, 0, i], y - mat["pos_gt_src"][j, 1, i]) / head
            count[j] += 1
            hits05[j] += d <= 0.5
            hits011[j] += d <= 0.11
    coco = [j for j in range(16) if j not in (6, 7, 8, 9)]
    total = sum(count[j] for j in coco)
    return {"Mean": 100.0 * sum(hits05[j] for j in coco) / total,
            "Mean@0.1": 100.0 * sum(hits011[j] for j in coco) / total,
            "Head top": 100.0 * hits05[9] / count[9]}


def test_eval_mpii_reference_and_fp32_with_rescored_predictions(tiny_checkpoint, tiny_bundle, mpii_set, tmp_path):
    annot = mpii_set / "annot"
    cfg = EvalConfig(checkpoint=tiny_checkpoint, bundles=(tiny_bundle,), images=mpii_set / "images",
                     mpii=annot / "valid.json", headboxes=annot / "gt_valid.mat", precisions=("fp32",),
                     decodings=("free",), out=tmp_path / "eval.json", predictions=tmp_path / "pred")
    report = evaluate(cfg, log=lambda *_: None)
    assert json.loads((tmp_path / "eval.json").read_text())["metric"] == "Mean"
    (fp32,) = report["variants"]
    print(f"reference Mean {report['reference']['Mean']}, fp32 ΔPCKh {fp32['delta_PCKh']}, "
          f"token agreement {fp32['token_agreement']}")
    assert fp32["delta_PCKh"] == 0.0 and fp32["delta_PCKh@0.1"] == 0.0 and fp32["token_agreement"] == 1.0
    assert list(fp32["pixel_error_per_keypoint"]) == list(KEYPOINT_SETS["mpii"])
    for row in (report["reference"], fp32):
        pred = tmp_path / "pred" / f"{row['name']}" / "pred_kpt.json"
        entries = json.loads(pred.read_text())
        assert [e["ins_id"] for e in entries] == list(range(report["persons"]))
        assert all(len(e["keypoints"]) == 48 and np.isfinite(e["keypoints"]).all() for e in entries)
        again = _rescore(pred, annot / "valid.json", annot / "gt_valid.mat")
        for col, value in again.items():
            assert abs(row[col] - value) < TOL, (row["name"], col, row[col], value)
    assert "Mean@0.1" in report["markdown"] and "0.11" in report["markdown"]


@pytest.mark.parametrize("flags, message", [
    (["--mpii", "V"], "needs --headboxes"),
    (["--mpii", "V", "--headboxes", "M", "--coco", "C"], "exactly one benchmark"),
    (["--mpii", "V", "--headboxes", "missing.mat"], "missing.mat"),
])
def test_eval_flag_errors_are_one_line(tiny_checkpoint, tiny_bundle, mpii_set, capsys, flags, message):
    annot = mpii_set / "annot"
    subst = {"V": str(annot / "valid.json"), "M": str(annot / "gt_valid.mat"), "C": str(annot / "valid.json")}
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--bundle", str(tiny_bundle), "--images",
                 str(mpii_set / "images"), *[subst.get(f, f) for f in flags]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_scorer_equals_the_joint_by_joint_rescoring_on_noisy_predictions(mpii_set, tmp_path):
    """Non-trivial PCKh values (the tiny model's are 0): GT + noise of about a head size, both scorers."""
    from benchmarks.mpii_eval import MpiiBenchmark
    annot = mpii_set / "annot"
    bench = MpiiBenchmark.load(annot / "valid.json", annot / "gt_valid.mat")
    rng = np.random.default_rng(0)
    preds = [{"ins_id": p.ins_id, "score": 0.5,
              "keypoints": np.c_[p.joints + rng.normal(0, 6.0, (16, 2)), np.ones(16)].reshape(-1).tolist()}
             for p in bench.persons]
    (tmp_path / "pred_kpt.json").write_text(json.dumps(preds))
    table = bench.metrics(preds)["PCKh"]
    again = _rescore(tmp_path / "pred_kpt.json", annot / "valid.json", annot / "gt_valid.mat")
    print({k: (table[k], round(v, 4)) for k, v in again.items()})
    assert 0 < table["Mean@0.1"] < table["Mean"] <= 100
    for col, value in again.items():
        assert abs(table[col] - value) < TOL, (col, table[col], value)


def test_max_images_keeps_the_first_images_persons_and_their_mat_columns(mpii_set):
    from benchmarks.mpii_eval import MpiiBenchmark
    annot = mpii_set / "annot"
    full = MpiiBenchmark.load(annot / "valid.json", annot / "gt_valid.mat")
    one = MpiiBenchmark.load(annot / "valid.json", annot / "gt_valid.mat", max_images=1)
    first = [p for p in full.persons if p.file_name == full.persons[0].file_name]
    assert [p.ins_id for p in one.persons] == list(range(len(first))) and one.gt.count == len(first)
    np.testing.assert_array_equal(one.gt.pos_gt, full.gt.pos_gt[:, :, [p.ins_id for p in first]])
