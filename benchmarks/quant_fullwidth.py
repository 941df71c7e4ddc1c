"""Issue 13 at the real model's width: fp32 vs weight-only int4 / int8 decoders on onnxruntime CPU, per person.

The shipped model's layers are 128 wide, where a MatMul costs less than the kernel's fixed overhead, so its bench
says little about weight-only speed. Here a random posellm-7b-width checkpoint (ViT-L/14 + Vicuna-7B width, N LLM
layers, LocLLM's layout: benchmarks/export_memory.py) is exported to fp32, quantized (RTN: speed does not depend on
how the ints were chosen) to int4 and int8 at each MatMulNBits accuracy level asked for, and `posellm-edge bench`
times template decoding of real COCO persons with the variants interleaved person by person (same persons, same
load), one run. Random weights make the answers meaningless; template decoding's work is fixed, so the times are not.

    python -m benchmarks.quant_fullwidth --tokenizer ../shared/fixtures/llama-tokenizer \\
        --coco ../shared/data/coco-mini/person_keypoints.json --images ../shared/data/coco-mini/images \\
        --layers 2 --persons 4 --out benchmarks/results/cpu-fullwidth-quant-bench.json

`--memory` (issue #24) instead measures `quantize` itself as a user runs it — int4, RTN and GPTQ, validation against
the PyTorch checkpoint on, each in its own process — on an fp32 + fp16 bundle of each `--layers` count in turn,
and fits the per-layer slope of peak RSS and seconds between the first two counts, extrapolated to 32 layers —
the peak RSS step by step (each step of quantize on its own slope; the 32-layer peak is the largest step's):

    python -m benchmarks.quant_fullwidth --memory --layers 2 4 --tokenizer ../shared/fixtures/llama-tokenizer \
        --coco ../shared/data/coco-mini/person_keypoints.json --images ../shared/data/coco-mini/images \
        --samples 4 --out benchmarks/results/cpu-fullwidth-quantize-memory.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import BenchConfig, benchmark
from benchmarks.export_memory import write_checkpoint
from benchmarks.recorded import recorded
from runtime.results import write_json
from exporter.bundle import ExportConfig, export_bundle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path, help="dir with tokenizer.json (LLaMA's, 32000 ids)")
    p.add_argument("--coco", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--preset", default="posellm-7b", help="model shapes (tiny: the CPU smoke test)")
    p.add_argument("--layers", type=int, nargs="+", default=[2], help="LLM layers (--memory: one run per count)")
    p.add_argument("--memory", action="store_true", help="measure quantize's peak RSS and seconds (issue #24)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], help="--memory: quantize methods")
    p.add_argument("--samples", type=int, default=4, help="--memory: GPTQ calibration persons")
    p.add_argument("--segment-layers", type=int, default=None, help="--memory: quantize --segment-layers")
    p.add_argument("--hessian-layers", type=int, default=None, help="--memory: quantize --hessian-layers")
    p.add_argument("--persons", type=int, default=4, help="timed persons per variant (0: quantize only, no bench)")
    p.add_argument("--levels", type=int, nargs="+", default=[4, 0], help="MatMulNBits accuracy levels to time")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/quant_fullwidth"))
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def _ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: p50 time per person and per stage, and its ratio to fp32's (same persons, interleaved)."""
    llm = ("prefix_prefill", "suffix_prefill", "decode")
    base = {k: v["p50"] for k, v in rows["fp32"]["stages_ms"].items()}
    out = {}
    for name, r in rows.items():
        stages = {k: v["p50"] for k, v in r["stages_ms"].items()}
        out[name] = {"ms_per_person_p50": r["ms_per_person"]["p50"], "stages_ms_p50": stages,
                     "bundle_bytes": r["bundle_bytes"],
                     "time_vs_fp32": round(r["ms_per_person"]["p50"] / rows["fp32"]["ms_per_person"]["p50"], 3),
                     "decode_vs_fp32": round(stages["decode"] / base["decode"], 3),
                     "llm_stages_vs_fp32": round(sum(stages[s] for s in llm) / sum(base[s] for s in llm), 3)}
    return out


FULL_LAYERS = 32  # Vicuna-7B


def _quantize_run(a: argparse.Namespace, bundle: Path, ckpt: Path, method: str) -> dict[str, Any]:
    """`posellm-edge quantize` int4 in its own process (its peak RSS is quantize's alone), validation on."""
    name = f"int4_{method}"
    cmd = [sys.executable, "-m", "posellm_edge.cli", "quantize", str(bundle), "--bits", "4", "--block-size",
           str(a.block_size), "--method", method, "--name", name, "--checkpoint", str(ckpt), "--overwrite"]
    if method == "gptq":
        cmd += ["--coco", str(a.coco), "--images", str(a.images), "--samples", str(a.samples)]
    for flag, value in (("--threads", a.threads), ("--segment-layers", a.segment_layers),
                        ("--hessian-layers", a.hessian_layers)):
        if value:
            cmd += [flag, str(value)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"quantize {name} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    art = json.loads((bundle / name / "quantization.json").read_text())
    variant_bytes = art["sizes"]["onnxruntime_weight_bytes"]
    return {"seconds": art["seconds"], "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(art["peak_rss_bytes"] / 1e9, 3), "peak_rss_gb_by_step": art.get("peak_rss_gb_by_step"),
            "rss_gb_by_group": art.get("rss_gb_by_group"),
            "variant_weight_bytes": variant_bytes, "fp16_weight_bytes": art["sizes"]["fp16_weight_bytes"],
            "ratio_vs_fp16": art["sizes"]["onnxruntime_ratio_vs_fp16"],
            "tensorrt_ratio_vs_fp16": art["sizes"]["tensorrt_ratio_vs_fp16"],
            "bound_gb": round((2 * variant_bytes + 4e9) / 1e9, 3),
            "meets_bound": art["peak_rss_bytes"] <= 2 * variant_bytes + 4e9,
            "validation_passed": all(c["passed"] for checks in art["validation"]["same_weights"].values()
                                     for c in checks),
            "data": {k: art["data"].get(k) for k in ("persons", "decoder_calls", "passes", "layers_per_pass")}
            if art["data"] else None,
            "log": proc.stdout.strip().splitlines()}


# issue #24's 32-layer targets for the peak RSS (the bound itself grows with the variant's bytes)
TARGET_GB_AT_32 = {"rtn": 12.0, "gptq": 16.0}


def _per_layer(runs: dict[int, dict[str, Any]], lo: int, hi: int, method: str = "rtn") -> dict[str, Any]:
    """Linear in the layer count (every layer has the same shapes): slope between two counts, value at 32.

    The peak RSS is extrapolated step by step: each step of quantize has its own per-layer growth (one that holds
    a layer's weights grows by that much a layer while the overall peak may sit in another step at 2 and 4 layers),
    so the 32-layer peak is the largest of the steps' 32-layer values — never less than a step's measured peak."""
    out = {}
    for key in ("peak_rss_gb", "seconds", "variant_weight_bytes", "fp16_weight_bytes"):
        slope = (runs[hi][key] - runs[lo][key]) / (hi - lo)
        out[f"{key}_per_layer"] = round(slope, 4)
        out[f"{key}_at_{FULL_LAYERS}"] = round(runs[hi][key] + slope * (FULL_LAYERS - hi), 3)
    out["ratio_vs_fp16_per_layer"] = round(out["variant_weight_bytes_per_layer"]
                                           / out["fp16_weight_bytes_per_layer"], 4)
    v32 = out[f"variant_weight_bytes_at_{FULL_LAYERS}"]
    out[f"bound_gb_at_{FULL_LAYERS}"] = round((2 * v32 + 4e9) / 1e9, 3)
    steps_lo, steps_hi = runs[lo].get("peak_rss_gb_by_step") or {}, runs[hi].get("peak_rss_gb_by_step") or {}
    by_step = {}
    for step in [s for s in steps_hi if s in steps_lo]:
        slope = (steps_hi[step] - steps_lo[step]) / (hi - lo)
        at_full = max(steps_hi[step], steps_hi[step] + slope * (FULL_LAYERS - hi))
        by_step[step] = {"per_layer": round(slope, 4), f"at_{FULL_LAYERS}": round(at_full, 3)}
    if by_step:
        out[f"peak_rss_gb_by_step_at_{FULL_LAYERS}"] = by_step
        # the overall peak's own straight line (the old estimate: it misses a step that overtakes the others)
        out[f"peak_rss_gb_at_{FULL_LAYERS}_from_overall_peak"] = out[f"peak_rss_gb_at_{FULL_LAYERS}"]
        worst = max(by_step, key=lambda s: by_step[s][f"at_{FULL_LAYERS}"])
        out[f"peak_rss_gb_at_{FULL_LAYERS}"] = by_step[worst][f"at_{FULL_LAYERS}"]
        out[f"peak_step_at_{FULL_LAYERS}"] = worst
    groups = _group_drift(runs[hi].get("rss_gb_by_group"), hi)
    if groups:
        out["per_group_in_run"] = groups
    est = out[f"peak_rss_gb_at_{FULL_LAYERS}"]
    out[f"meets_bound_at_{FULL_LAYERS}"] = est <= out[f"bound_gb_at_{FULL_LAYERS}"]
    if method in TARGET_GB_AT_32:
        out[f"target_gb_at_{FULL_LAYERS}"] = TARGET_GB_AT_32[method]
        out[f"meets_target_at_{FULL_LAYERS}"] = est <= TARGET_GB_AT_32[method]
    return out


def _group_drift(groups: dict[str, list[float]] | None, layers: int) -> dict[str, Any] | None:
    """The per-group step seen within one run: how the RSS at a group's start and the group's peak move from one
    layer to the next (least squares over the groups; the last, lm_head's, only where it is one of two), and the
    largest peak above a group's start (what one layer needs while quantized). The 32-layer value continues the
    peaks' slope: a within-run trend, free of the run-to-run noise a slope between two runs picks up."""
    if not groups or len(groups["start"]) < 2:
        return None
    start, peak = groups["start"], groups["peak"]
    per_layer = (len(start) - 1) / max(1, layers - 1)  # groups per layer (hessian_layers)
    fit = slice(None) if len(peak) < 3 else slice(0, -1)
    slope = {k: float(np.polyfit(np.arange(len(v[fit])), v[fit], 1)[0]) / per_layer for k, v in groups.items()}
    return {"start_drift_gb_per_layer": round(slope["start"], 4), "peak_slope_gb_per_layer": round(slope["peak"], 4),
            "largest_peak_above_start_gb": round(max(p - s for p, s in zip(peak, start)), 3),
            f"at_{FULL_LAYERS}": round(max(peak) + max(0.0, slope["peak"]) * (FULL_LAYERS - layers), 3)}


def memory(a: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {
        "what": "peak RSS (the quantize process's own VmHWM) and seconds of `posellm-edge quantize` int4 (RTN, and "
                "GPTQ on COCO person crops), validation against the PyTorch checkpoint on, each in its own process, "
                f"on a full-width {a.preset} fp32 + fp16 bundle of each layer count (random LocLLM-layout "
                "checkpoint); per-layer slope between the first two counts, linear extrapolation to 32 layers",
        "command": "python -m benchmarks.quant_fullwidth " + " ".join(sys.argv[1:]),
        "bound": "peak RSS <= 2 x the int4 variant's weight bytes (MatMulNBits form) + 4 GB",
        "preset": a.preset, "block_size": a.block_size, "samples": a.samples, "threads": a.threads,
        "segment_layers": a.segment_layers, "hessian_layers": a.hessian_layers, "runs": {}}
    ckpt, bundle = a.work / "ckpt", a.work / "bundle"
    with recorded(a.out, res, a.work):
        for layers in a.layers:
            write_checkpoint(ckpt, a.tokenizer, a.preset, layers)
            export_bundle(ExportConfig(ckpt, bundle, precisions=("fp32", "fp16"), max_persons=1, overwrite=True,
                                       validate=False))
            res["runs"][str(layers)] = runs = {}
            for method in a.methods:
                runs[method] = _quantize_run(a, bundle, ckpt, method)
                r = runs[method]
                print(f"{layers} layers {method}: peak RSS {r['peak_rss_gb']:.2f} GB (bound {r['bound_gb']:.2f}), "
                      f"{r['seconds']:.0f}s, int4/fp16 {r['ratio_vs_fp16']}")
                write_json(a.out, res)
            shutil.rmtree(bundle, ignore_errors=True)
        if len(a.layers) >= 2:
            lo, hi = sorted(a.layers[:2])  # `--layers 4 2` runs the larger first; the slope is from 2 to 4
            res["per_layer"] = {m: _per_layer({lo: res["runs"][str(lo)][m], hi: res["runs"][str(hi)][m]}, lo, hi, m)
                                for m in a.methods}
            for m, p in res["per_layer"].items():
                print(f"{m} at {FULL_LAYERS} layers: peak RSS {p[f'peak_rss_gb_at_{FULL_LAYERS}']:.2f} GB "
                      f"({p.get(f'peak_step_at_{FULL_LAYERS}')}), bound {p[f'bound_gb_at_{FULL_LAYERS}']:.2f} GB, "
                      f"target {p.get(f'target_gb_at_{FULL_LAYERS}')} GB")
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.memory:
        return memory(a)
    a.layers = a.layers[0]
    res: dict[str, Any] = {"preset": a.preset, "layers": a.layers, "persons": a.persons,
                           "block_size": a.block_size, "method": "rtn", "decoding": "template",
                           "backend": "onnxruntime (CPU EP)"}
    ckpt, bundle = a.work / "ckpt", a.work / "bundle"
    with recorded(a.out, res, a.work):
        t0 = time.perf_counter()
        write_checkpoint(ckpt, a.tokenizer, a.preset, a.layers)
        export_bundle(ExportConfig(ckpt, bundle, precisions=("fp32",), max_persons=1, overwrite=True,
                                   validate=False))
        shutil.rmtree(ckpt, ignore_errors=True)
        names = ["fp32"]
        res["quantize"] = quantize = {}  # per variant: seconds and peak RSS of quantize_bundle (RTN) alone
        for level in a.levels:
            for bits in (4, 8):
                name = f"{'int4' if bits == 4 else 'int8wo'}{'' if level == 4 else f'_level{level}'}"
                # as a user runs it: its own process, so its peak RSS is quantize's alone
                cmd = [sys.executable, "-m", "posellm_edge.cli", "quantize", str(bundle), "--bits", str(bits),
                       "--block-size", str(a.block_size), "--method", "rtn", "--name", name,
                       "--accuracy-level", str(level)] + (["--threads", str(a.threads)] if a.threads else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"quantize {name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
                artifact = json.loads((bundle / name / "quantization.json").read_text())
                quantize[name] = {"seconds": artifact["seconds"],
                                  "peak_rss_gb": round(artifact["peak_rss_bytes"] / 1e9, 3),
                                  "decoder_weight_bytes": artifact["sizes"]["onnxruntime_weight_bytes"]}
                names.append(name)
        res["prepare_s"] = round(time.perf_counter() - t0, 1)
        if a.persons == 0:
            return res
        report = benchmark(BenchConfig(bundles=(bundle,), coco=a.coco, images=a.images, precisions=tuple(names),
                                       decodings=("template",), persons=a.persons, warmup=1, batch_sizes=(1,),
                                       interleave=True))
        res["environment"] = report["environment"]
        res["variants"] = _ratios({r["precision"]: r for r in report["results"]})
    for name, v in res.get("variants", {}).items():
        print(f"{name:14s} {v['ms_per_person_p50']:9.1f} ms/person ({v['time_vs_fp32']:.2f}x fp32), decode "
              f"{v['stages_ms_p50']['decode']:8.1f} ms ({v['decode_vs_fp32']:.2f}x), LLM stages "
              f"{v['llm_stages_vs_fp32']:.2f}x")
    return res


if __name__ == "__main__":
    main()
