"""Issue 15: export time and peak RSS at the real model's width, and their slopes per LLM layer.

For each layer count a random posellm-7b-width checkpoint (ViT-L/14 + mlp2x_gelu + Vicuna-7B width, the real
tokenizer) is written as LocLLM's trainer writes it: LLM base weights bf16, ViT / projector / LoRA factors fp32
(non-zero LoRA B, so merging matters), `pytorch_model-0000k-of-0000n.bin` shards + index. Each export runs as its own
`posellm-edge export` process, one at a time; its peak RSS is the child's own VmHWM as the manifest records it
(wait4's figure is kept beside it but over-reports, see WAIT4_NOTE). From two layer counts: per-layer slopes and
the 32-layer extrapolation (linear: a layer is the same bytes and work whatever its index), and the targets checked.

    python -m benchmarks.export_memory --tokenizer ../shared/fixtures/llama-tokenizer \\
        --runs 2:fp16:on 2:fp32:off 4:fp16:on --out benchmarks/results/cpu-fullwidth-export.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from posellm.checkpoint import copy_tokenizer
from posellm.checkpoint_locllm import is_llm_base, locllm_config, to_locllm
from posellm.config import preset
from posellm.lazy_weights import expected_shapes
from benchmarks.recorded import recorded
from runtime.results import write_json

GB = 1e9
FULL_LAYERS = 32
SHARD_BYTES = 2 << 30
TARGETS = {"validated": (2.0, 2 * GB), "skip_validate": (1.2, 2 * GB)}  # peak <= a * variant bytes + b
MACHINE_GB = 32
WAIT4_NOTE = ("wait4's ru_maxrss of a child also counts the parent's memory image it was spawned from (Linux folds "
              "the pre-exec mm's high-water mark into it; Python spawns with vfork), so after this script has written "
              "a multi-GB checkpoint it over-reports; peak_rss_gb is the child's own VmHWM from the manifest")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, help="dir with tokenizer.json (LLaMA's, 32000 ids)")
    p.add_argument("--merge", type=Path, nargs="+", help="combine the runs of earlier result files into --out "
                                                          "(slopes over all of them) instead of measuring")
    p.add_argument("--runs", nargs="+", default=[f"{n}:{p}:{v}" for n in (2, 4) for p in ("fp32", "fp16")
                                                 for v in ("on", "off")],
                   help="LAYERS:PRECISION:VALIDATE(on|off) per export, in order (default: all 8 combinations "
                        "of 2/4 layers, fp32/fp16, validation on/off)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/export_memory"))
    p.add_argument("--preset", default="posellm-7b")
    p.add_argument("--min-free-gb", type=float, default=3.0, help="refuse to start an export below this")
    p.add_argument("--note", default="", help="free text recorded in the JSON (e.g. that the CPU was shared)")
    return p.parse_args(argv)


def write_checkpoint(out: Path, tokenizer: Path, preset_name: str, layers: int, seed: int = 0) -> int:
    """Random LocLLM-layout checkpoint, tensor by tensor in its stored dtype (never an fp32 model of it all)."""
    from runtime.prompts import PromptTokenizer
    from exporter.tokenizer import bundle_tokenizer
    image = PromptTokenizer(bundle_tokenizer(tokenizer)).special.image
    cfg = preset(preset_name, vocab_size=image, image_token_id=image)
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=layers),
                      lora=dataclasses.replace(cfg.lora, llm_enable=True, vision_enable=True))
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, meta in expected_shapes(cfg).items():
        key = to_locllm(name)
        dtype = torch.bfloat16 if is_llm_base(key) else torch.float32
        last = name.rsplit(".", 1)[-1]
        if last in ("bias", "mask_token"):
            value = torch.zeros(meta.shape, dtype=dtype)
        elif "norm" in name or last == "gamma":
            value = torch.ones(meta.shape, dtype=dtype) * (0.1 if last == "gamma" else 1.0)
        else:
            value = (torch.randn(meta.shape, generator=g) * 0.02).to(dtype)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
        total += nbytes
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(locllm_config(cfg), indent=2) + "\n")
    names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        torch.save(shard, out / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copy_tokenizer(tokenizer, out)
    return total


def free_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return float("inf")


def run_export(ckpt: Path, out: Path, precision: str, validate: bool) -> dict[str, Any]:
    """One `posellm-edge export` child; its wall time and kernel-reported peak RSS."""
    cmd = [sys.executable, "-m", "posellm_edge.cli", "export", str(ckpt), str(out), "--precision", precision,
           "--overwrite"] + ([] if validate else ["--skip-validate"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"export failed ({proc.returncode}):\n{log[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["variants"][precision]["export"]
    written = sum(f.stat().st_size for f in (out / precision).rglob("*") if f.is_file())  # graphs, data, table
    res = {"precision": precision, "validated": validate, "wall_s": round(seconds, 1),
           "peak_rss_gb": round(stats["peak_rss_bytes"] / GB, 3),  # the child's own VmHWM
           "wait4_maxrss_gb": round(usage.ru_maxrss * 1024 / GB, 3),  # see WAIT4_NOTE
           "variant_gb": round(written / GB, 3), "export_s": stats["export_seconds"],
           "validation_s": stats["validation_seconds"]}
    if stats["bytes"] != written:
        raise RuntimeError(f"manifest says {stats['bytes']} bytes for {precision}, the files hold {written}")
    a, b = TARGETS["validated" if validate else "skip_validate"]
    res["target_gb"] = round((a * written + b) / GB, 3)
    res["peak_over_variant"] = round(res["peak_rss_gb"] / res["variant_gb"], 3)
    res["meets_target"] = res["peak_rss_gb"] <= res["target_gb"]
    if validate:
        res["validation_passed"] = json.loads((out / "validation.json").read_text())["passed"]
    return res


def slopes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer slope and 32-layer extrapolation of each (precision, validated) series, from its two extremes."""
    out: dict[str, Any] = {}
    keys = sorted({(r["precision"], r["validated"]) for r in runs})
    for precision, validated in keys:
        series = sorted((r for r in runs if (r["precision"], r["validated"]) == (precision, validated)),
                        key=lambda r: r["layers"])
        if len(series) < 2:
            continue
        lo, hi = series[0], series[-1]
        dl = hi["layers"] - lo["layers"]
        entry: dict[str, Any] = {"from_layers": [lo["layers"], hi["layers"]]}
        for field in ("peak_rss_gb", "variant_gb", "wall_s", "export_s"):
            per_layer = (hi[field] - lo[field]) / dl
            entry[f"{field}_per_layer"] = round(per_layer, 4)
            entry[f"{field}_at_{FULL_LAYERS}"] = round(hi[field] + per_layer * (FULL_LAYERS - hi["layers"]), 2)
        a, b = TARGETS["validated" if validated else "skip_validate"]
        entry[f"target_gb_at_{FULL_LAYERS}"] = round(a * entry[f"variant_gb_at_{FULL_LAYERS}"] + b / GB, 2)
        entry[f"fits_{MACHINE_GB}gb_at_{FULL_LAYERS}"] = entry[f"peak_rss_gb_at_{FULL_LAYERS}"] <= MACHINE_GB
        out[f"{precision}{'' if validated else '-skip-validate'}"] = entry
    return out


def merge(files: list[Path], out: Path, note: str) -> dict[str, Any]:
    """Runs of several invocations (e.g. one layer count each) as one result, slopes over all of them."""
    parts = [json.loads(f.read_text()) for f in files]
    res = {k: v for k, v in parts[0].items() if k not in ("runs", "per_layer", "all_runs_meet_target", "status")}
    res["wait4_note"] = WAIT4_NOTE
    res["merged_from"] = [{"file": f.name, "status": p["status"], "runs": len(p["runs"])} for f, p in zip(files, parts)]
    res["note"] = " ".join(x for x in (res.get("note", ""), note) if x)
    res["runs"] = [r for p in parts for r in p["runs"]]
    res["per_layer"] = slopes(res["runs"])
    res["all_runs_meet_target"] = all(r["meets_target"] for r in res["runs"])
    res["status"] = "ok" if all(p["status"] == "ok" for p in parts) else "partial"
    write_json(out, res)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out, a.note)
    if a.tokenizer is None:
        raise SystemExit("--tokenizer is required to measure")
    res: dict[str, Any] = {"preset": a.preset, "note": a.note, "units": "GB (1e9 bytes), s",
                           "wait4_note": WAIT4_NOTE,
                           "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                           "checkpoint_layout": "LocLLM trainer: bf16 LLM base, fp32 ViT/projector/LoRA, .bin "
                                                "shards of <= 2 GiB + index, LoRA on (non-zero B)",
                           "targets": {"validated": "peak <= 2 x variant + 2 GB",
                                       "skip_validate": "peak <= 1.2 x variant + 2 GB",
                                       f"fp16 validated at {FULL_LAYERS} layers": f"peak <= {MACHINE_GB} GB"},
                           "runs": []}
    with recorded(a.out, res, a.work):
        runs = [(int(n), p, v == "on") for n, p, v in (r.split(":") for r in a.runs)]
        for layers in dict.fromkeys(n for n, _, _ in runs):  # one checkpoint per layer count, in order
            ckpt, bundle = a.work / f"ckpt-{layers}", a.work / "bundle"
            t0 = time.perf_counter()
            ckpt_bytes = write_checkpoint(ckpt, a.tokenizer, a.preset, layers)
            gc.collect()
            print(f"checkpoint {layers} layers: {ckpt_bytes / GB:.2f} GB in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            for precision, validate in [(p, v) for n, p, v in runs if n == layers]:
                if free_gb() < a.min_free_gb:
                    raise RuntimeError(f"only {free_gb():.1f} GB available (< {a.min_free_gb}): not starting")
                run = {"layers": layers, "checkpoint_gb": round(ckpt_bytes / GB, 3),
                       **run_export(ckpt, bundle, precision, validate)}
                res["runs"].append(run)
                print(json.dumps(run), flush=True)
                shutil.rmtree(bundle, ignore_errors=True)
                write_json(a.out, res)
            shutil.rmtree(ckpt, ignore_errors=True)
        res["per_layer"] = slopes(res["runs"])
        res["all_runs_meet_target"] = all(r["meets_target"] for r in res["runs"])
    return res


if __name__ == "__main__":
    main()
