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
