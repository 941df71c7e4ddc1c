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

from benchmarks.bench import BenchConfig, benchmark
from benchmarks.export_memory import write_checkpoint
from benchmarks.recorded import recorded
from exporter.bundle import ExportConfig, export_bundle


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path, help="dir with tokenizer.json (LLaMA's, 32000 ids)")
    p.add_argument("--coco", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--preset", default="posellm-7b", help="model shapes (tiny: the CPU smoke test)")
    p.add_argument("--layers", type=int, default=2)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
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
