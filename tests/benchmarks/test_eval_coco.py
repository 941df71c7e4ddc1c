"""`posellm-edge eval --coco` after the MPII split: the reference and fp32 on a nested (Human-Art style) synthetic
set, COCO results per variant via --predictions."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pycocotools", reason="COCO AP needs pycocotools (the [bench] extra)")

from benchmarks.evaluate import EvalConfig, evaluate  # noqa: E402
from training.data.synthetic import ANNOTATION_FILE, SyntheticConfig, generate_dataset  # noqa: E402


def test_eval_coco_reference_and_fp32(tiny_checkpoint, tiny_bundle, tmp_path):
    data = generate_dataset(SyntheticConfig(num_images=2, seed=3, max_persons=2), tmp_path / "art", nested=True)
    cfg = EvalConfig(checkpoint=tiny_checkpoint, bundles=(tiny_bundle,), images=data / "images",
                     coco=data / ANNOTATION_FILE, precisions=("fp32",), decodings=("free",),
                     out=tmp_path / "eval.json", predictions=tmp_path / "pred", max_ap_drop=0.0)
    report = evaluate(cfg, log=lambda *_: None)
    (fp32,) = report["variants"]
    print(f"reference AP {report['reference']['AP']}, fp32 ΔAP {fp32['delta_AP']}")
    assert report["metric"] == "AP" and fp32["delta_AP"] == 0.0 and report["failed"] == []
    assert fp32["token_agreement"] == 1.0 and len(fp32["pixel_error_per_keypoint"]) == 17
    results = json.loads((tmp_path / "pred" / "fp32-free" / "keypoints_results.json").read_text())
    assert len(results) == report["persons"] and all(len(r["keypoints"]) == 51 for r in results)
    md = (tmp_path / "eval.md").read_text()
    assert "| name | AP |" in md and "delta_AP_ci90" in md
    # the paired bootstrap: a variant identical to the reference has a zero-width interval at 0
    assert fp32["delta_AP_ci90"] == [0.0, 0.0] and report["delta_interval"]["resamples"] > 0


def test_unknown_precision_fails_before_the_reference_runs(tiny_bundle, tmp_path, monkeypatch):
    """`--precision fp32,fp16` (a comma list; the flag repeats) names no variant: one line naming it and the
    bundle's variants, raised before the checkpoint is even loaded."""
    import posellm.checkpoint
    from runtime.errors import InputError

    monkeypatch.setattr(posellm.checkpoint, "load_checkpoint", lambda *a: pytest.fail("the reference was loaded"))
    cfg = EvalConfig(checkpoint=tmp_path / "never-read", bundles=(tiny_bundle,), images=tmp_path,
                     coco=tmp_path / "ann.json", precisions=("fp32,fp16",))
    with pytest.raises(InputError, match=r"'fp32,fp16'.*expected one of \['fp16', 'fp32'\].*flag repeats") as err:
        evaluate(cfg, log=lambda *_: None)
    print(err.value)
