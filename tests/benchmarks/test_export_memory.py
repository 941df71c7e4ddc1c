"""CPU smoke test of benchmarks/export_memory.py (issue 15's full-width export benchmark): tiny preset."""
from __future__ import annotations

import json

from benchmarks.export_memory import main


def test_tiny_runs_record_peaks_and_slopes(tokenizer_dir, tmp_path):
    out = tmp_path / "res.json"
    res = main(["--tokenizer", str(tokenizer_dir), "--preset", "tiny", "--runs", "1:fp16:off", "2:fp16:off",
                "1:fp32:on", "--work", str(tmp_path / "work"), "--out", str(out), "--min-free-gb", "0"])
    assert json.loads(out.read_text()) == res and res["status"] == "ok", res.get("error")
    assert [(r["layers"], r["precision"], r["validated"]) for r in res["runs"]] == [
        (1, "fp16", False), (1, "fp32", True), (2, "fp16", False)]  # grouped by layer count: one checkpoint each
    for r in res["runs"]:
        assert r["peak_rss_gb"] > 0.05 and r["variant_gb"] > 0 and r["export_s"] > 0
        assert r["validation_passed"] if r["validated"] else r["validation_s"] is None
    slope = res["per_layer"]["fp16-skip-validate"]  # two layer counts: a slope; fp32 has one point: none
    assert slope["from_layers"] == [1, 2] and "fp32" not in res["per_layer"]
    assert slope["variant_gb_per_layer"] >= 0 and "fits_32gb_at_32" in slope
    assert not (tmp_path / "work").exists()
