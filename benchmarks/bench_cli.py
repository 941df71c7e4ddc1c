"""`posellm-edge bench BUNDLE [BUNDLE ...] [--checkpoint CKPT] [--out BENCH.json] [--plot OUT.png]`."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from runtime.backends import BACKENDS

from .bench import BenchConfig, benchmark


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--checkpoint", type=Path, help="PyTorch reference checkpoint: the baseline, same run")
    p.add_argument("--coco", type=Path, help="persons to time (GT boxes); default: a small synthetic set")
    p.add_argument("--images", type=Path)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", action="append")
    p.add_argument("--decoding", action="append", choices=("template", "free", "speculative"))
    p.add_argument("--persons", type=int, default=12, help="timed persons per variant")
    p.add_argument("--reference-persons", type=int, default=6, help="timed persons for the (slow) reference")
    p.add_argument("--batch-sizes", default="1,4,8", help="persons per call for the throughput figures")
    p.add_argument("--eval", type=Path, action="append", default=[],
                   help="an eval REPORT.json (repeatable: COCO AP and MPII PCKh side by side in the table and plot)")
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--video", nargs="?", const="synthetic", default=None, metavar="IN.mp4",
                   help="ms/person template vs speculative on a video, interleaved per frame (no file: the "
                        "synthetic walking figure); boxes from --detections")
    p.add_argument("--detections", type=Path, help="with --video FILE: COCO results, image_id = frame index")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--min-rate", type=float, action="append",
                   help="with --video: speculative decoding's acceptance gate (repeatable, each timed; 0: draft every "
                        "frame; default: AcceptanceConfig's 0.5)")
    p.add_argument("--oracle-drafts", action="store_true",
                   help="with --video: also time speculative decoding given each frame's own answers as drafts (the "
                        "bound no draft can beat)")
    p.add_argument("--interleave", action="store_true",
                   help="time the variants in turn on each person (fair ratios on a shared machine; peak RSS is then "
                        "the whole process's)")


def run(args: argparse.Namespace) -> int:
    if args.video is not None:
        from runtime.acceptance import AcceptanceConfig

        from .video_bench import VideoBenchConfig, video_benchmark
        decodings = tuple(args.decoding) if args.decoding else ("template", "speculative")
        video_benchmark(VideoBenchConfig(
            bundles=tuple(args.bundles), video=None if args.video == "synthetic" else Path(args.video),
            detections=args.detections, precision=(args.precision or ["fp32"])[0], backend=args.backend,
            decodings=decodings, max_frames=args.max_frames, out=args.out, oracle=args.oracle_drafts,
            acceptance=tuple(AcceptanceConfig(min_rate=r) for r in args.min_rate) if args.min_rate
            else (AcceptanceConfig(),)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        coco, images = args.coco, args.images
        if coco is None:
            from training.data.synthetic import SyntheticConfig, generate_dataset
            root = generate_dataset(SyntheticConfig(num_images=8, seed=7), Path(tmp) / "synthetic")
            coco, images = root / "person_keypoints.json", root / "images"
        elif images is None:
            raise SystemExit("--coco needs --images")
        report = benchmark(BenchConfig(
            bundles=tuple(args.bundles), coco=coco, images=images, checkpoint=args.checkpoint,
            backend=args.backend, precisions=tuple(args.precision) if args.precision else None,
            decodings=tuple(args.decoding) if args.decoding else ("template", "free"), persons=args.persons,
            reference_persons=args.reference_persons,
            batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), eval_reports=tuple(args.eval),
            out=args.out, plot=args.plot, interleave=args.interleave))
    print(report["markdown"])
    return 0
