"""CPU smoke test of benchmarks/quant_fullwidth.py (issue 13's full-width speed run): tiny preset, one layer."""
from __future__ import annotations

import json

from benchmarks.quant_fullwidth import main


def test_tiny_run_times_every_variant_against_fp32(tokenizer_dir, tmp_path):
    from training.data.synthetic import SyntheticConfig, generate_dataset
    coco = generate_dataset(SyntheticConfig(num_images=2, seed=3), tmp_path / "coco")
    out = tmp_path / "res.json"
    res = main(["--preset", "tiny", "--layers", "1", "--tokenizer", str(tokenizer_dir), "--persons", "1",
                "--coco", str(coco / "person_keypoints.json"), "--images", str(coco / "images"),
                "--block-size", "32", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["status"] == "ok", res.get("error")
    v = res["variants"]
    print({k: (x["time_vs_fp32"], x["decode_vs_fp32"]) for k, x in v.items()})
    assert set(v) == {"fp32", "int4", "int8wo", "int4_level0", "int8wo_level0"}
    assert v["fp32"]["time_vs_fp32"] == 1.0 and all(x["ms_per_person_p50"] > 0 for x in v.values())
    assert v["int4"]["bundle_bytes"] < v["int8wo"]["bundle_bytes"] < v["fp32"]["bundle_bytes"]
    q = res["quantize"]
    assert set(q) == set(v) - {"fp32"} and all(x["peak_rss_gb"] > 0.05 and x["seconds"] > 0 for x in q.values())
    assert q["int4"]["decoder_weight_bytes"] < q["int8wo"]["decoder_weight_bytes"]
    assert not (tmp_path / "work").exists()  # checkpoint and bundle removed


def test_memory_extrapolation_takes_each_steps_own_slope():
    """A step growing per layer overtakes a flat one at 32 layers; the overall peak's line would miss it."""
    from benchmarks.quant_fullwidth import _per_layer

    def run(layers, grow):
        return {"peak_rss_gb": max(5.0, 1.0 + grow * layers), "seconds": 10.0 * layers,
                "variant_weight_bytes": 10**8 * layers, "fp16_weight_bytes": 4 * 10**8 * layers,
                "peak_rss_gb_by_step": {"flat": 5.0, "growing": 1.0 + grow * layers}}
    p = _per_layer({2: run(2, 0.4), 4: run(4, 0.4)}, 2, 4, "rtn")
    assert p["peak_rss_gb_at_32_from_overall_peak"] == 5.0  # the old estimate
    assert p["peak_rss_gb_by_step_at_32"]["growing"] == {"per_layer": 0.4, "at_32": 13.8}
    assert p["peak_rss_gb_at_32"] == 13.8 and p["peak_step_at_32"] == "growing"
    assert p["bound_gb_at_32"] == 10.4 and not p["meets_bound_at_32"]
    assert p["target_gb_at_32"] == 12.0 and not p["meets_target_at_32"]


def test_in_run_group_trend_continues_the_peaks_not_the_starts():
    from benchmarks.quant_fullwidth import _group_drift
    flat = _group_drift({"start": [0.16, 0.16, 0.17, 0.16], "peak": [4.4, 4.3, 4.5, 4.4]}, 4)
    print(flat)
    assert abs(flat["start_drift_gb_per_layer"]) < 0.01 and flat["largest_peak_above_start_gb"] == 4.33
    assert flat["peak_slope_gb_per_layer"] == 0.05 and flat["at_32"] == round(4.5 + 0.05 * 28, 3)
    # peaks growing while every group starts from the same RSS (issue #24's GPTQ at 4 layers): not flat
    grows = _group_drift({"start": [0.125, 0.158, 0.159, 0.159], "peak": [4.369, 4.954, 5.399, 5.535]}, 4)
    print(grows)
    assert grows["start_drift_gb_per_layer"] < 0.02 and grows["peak_slope_gb_per_layer"] > 0.5
    assert grows["at_32"] > 16
    two = _group_drift({"start": [0.124, 0.157], "peak": [4.596, 4.999]}, 2)
    assert two["peak_slope_gb_per_layer"] == 0.403
    assert _group_drift(None, 4) is None and _group_drift({"start": [0.1], "peak": [1.0]}, 1) is None
