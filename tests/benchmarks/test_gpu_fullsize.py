"""CPU smoke test of benchmarks/gpu_fullsize.py (issue [F]'s device script): tiny preset, fp32 on both sides."""
from __future__ import annotations

import json

import pytest

from benchmarks.gpu_fullsize import main

REQUIRED = ("device", "layers", "token_agreement", "max_logit_diff", "runtime_ms_per_person",
            "reference_ms_per_person", "speedup_vs_reference", "export_s", "peak_ram_gb", "peak_gpu_gb",
            "image_embed_max_err", "precision", "runtime_stages_ms_mean", "runtime_scaling", "reference_scaling")


def test_tiny_cpu_run_writes_complete_results(tokenizer_dir, tmp_path):
    out = tmp_path / "results.json"
    res = main(["--preset", "tiny", "--layers", "1", "--tokenizer", str(tokenizer_dir), "--device", "cpu",
                "--crops", "2", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["status"] == "ok", res.get("error")
    missing = [k for k in REQUIRED if res.get(k) is None]
    assert not missing, missing
    assert res["device"].startswith("cpu") and res["precision"] == "fp32" and res["peak_gpu_gb"] == 0.0
    assert (res["layers"], res["full_layers"], res["crops"]) == (1, 2, 2)
    # fp32 on one CPU: the runtime must reproduce the reference exactly (token-identical, tiny float noise)
    assert res["token_agreement"] == res["first_token_agreement"] == 1.0
    assert res["max_logit_diff"] < 1e-3 and res["image_embed_max_err"] < 1e-3
    assert res["export_validation"]["passed"] is True
    # the plain-PyTorch template baseline, side by side: both force the template, so fp32 tokens agree exactly
    assert res["torch_template_token_agreement"] == 1.0 and res["torch_template_ms_per_person"] > 0
    assert res["speedup_vs_torch_template"] == pytest.approx(
        res["torch_template_ms_per_person"] / res["runtime_ms_per_person"], rel=0.01)
    assert res["runtime_backend"]["providers"]["decoder"] == ["CPUExecutionProvider"]
    assert res["runtime_ms_per_person"] > 0 and res["reference_ms_per_person"] > 0 and res["export_s"] > 0
    assert res["speedup_vs_reference"] == pytest.approx(
        res["reference_ms_per_person"] / res["runtime_ms_per_person"], rel=0.01)
    assert set(res["runtime_stages_ms_mean"]) >= {"vision", "prefix_prefill", "suffix_prefill", "decode"}
    for side in ("runtime_scaling", "reference_scaling"):  # 1 of 2 layers measured: extrapolation adds time
        s = res[side]
        assert s["ms_per_layer"] > 0 and s["ms_per_person_at_full"] > s["fixed_ms"] + s["llm_ms"] - 0.01
    assert 0 < res["peak_ram_gb"] < 8
    assert not (tmp_path / "work" / "checkpoint").exists() and (tmp_path / "work" / "bundle").is_dir()


def test_failure_still_writes_json(tmp_path):
    out = tmp_path / "results.json"
    with pytest.raises(Exception):
        main(["--preset", "tiny", "--tokenizer", str(tmp_path / "missing"), "--device", "cpu",
              "--work", str(tmp_path / "work"), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["status"] == "failed" and res["error"] and res["peak_gpu_gb"] == 0.0
