"""`posellm-edge export CHECKPOINT OUT_DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.memory import peak_rss_context

from .bundle import PRECISIONS, ExportConfig, export_bundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="native, LocLLM-format or PEFT-adapter checkpoint directory")
    p.add_argument("out_dir", type=Path, help="bundle directory to write")
    p.add_argument("--precision", default="fp32", help=f"comma-separated subset of {','.join(PRECISIONS)}")
    p.add_argument("--max-persons", type=int, default=8, help="persons per batch the graphs are sized for")
    p.add_argument("--max-context", type=int, default=512, help="longest KV context (tokens)")
    p.add_argument("--logits-positions", type=int, default=4, help="K: logits for the last K positions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--skip-validate", action="store_true", help="skip the onnxruntime-vs-PyTorch validation")


def run(args: argparse.Namespace) -> int:
    cfg = ExportConfig(checkpoint=args.checkpoint, out_dir=args.out_dir,
                       precisions=tuple(p.strip() for p in args.precision.split(",") if p.strip()),
                       max_persons=args.max_persons, max_context=args.max_context,
                       logits_positions=args.logits_positions, overwrite=args.overwrite,
                       validate=not args.skip_validate)
    result = export_bundle(cfg)
    print(f"bundle written to {result.bundle} in {result.seconds:.1f}s (peak RSS {result.peak_rss_mb:.0f} MB)")
    for name, size in result.file_sizes.items():
        print(f"  {name:<28} {size / 1e6:9.3f} MB")
    for precision, stats in result.variants.items():  # also in manifest.json: variants.<precision>.export
        print(f"  {precision}: {stats.bytes / 1e6:.1f} MB written, peak RSS {stats.peak_rss_bytes / 1e6:.1f} MB "
              f"({peak_rss_context(stats.peak_rss_bytes, stats.bytes, result.baseline_rss_bytes)}), "
              f"export {stats.export_seconds:.1f}s"
              + ("" if stats.validation_seconds is None else f", validation {stats.validation_seconds:.1f}s"))
    return 0
