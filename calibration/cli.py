"""`posellm-edge calibrate BUNDLE --coco ANN --images DIR [--method ...] [--samples N]`: flags → CalibrationConfig.

Thin by design: `run` builds the config and calls `calibrate_bundle`; typed errors (InputError, BundleError,
QuantizationError) propagate to the top-level CLI, which maps them to exit codes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .calibrate import DECODER_DTYPES, METHODS, CalibrationConfig, calibrate_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CalibrationConfig.__dataclass_fields__
    parser.add_argument("bundle", type=Path, help="bundle directory written by `posellm-edge export`")
    parser.add_argument("--coco", type=Path, required=True,
                        help="COCO person-keypoints annotation file; its GT person boxes give the calibration crops")
    parser.add_argument("--images", type=Path, required=True, help="folder with the annotation file's images")
    parser.add_argument("--method", choices=METHODS, default=d["method"].default,
                        help="onnxruntime activation calibrator for the vision graph (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=d["samples"].default,
                        help="person crops to calibrate on (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                        help="crops per calibration inference; bounds memory (default: %(default)s)")
    parser.add_argument("--percentile", type=float, default=d["percentile"].default,
                        help="percentile of the `percentile` method (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"].default,
                        help="seed of the random person subset (default: %(default)s)")
    parser.add_argument("--eval-persons", type=int, default=d["eval_persons"].default,
                        help="crops used for the int8-vs-fp32 check and the recorded decoder inputs; 0 skips "
                             "(default: %(default)s)")
    parser.add_argument("--decoder-dtype", choices=DECODER_DTYPES, default=d["decoder_dtype"].default,
                        help="activation dtype of the weight-only int8 decoder; fp16 needs the bundle's fp16 "
                             "variant and suits TensorRT on Jetson (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for the check")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing int8 variant")


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    return CalibrationConfig(bundle=args.bundle, coco=args.coco, images=args.images, method=args.method,
                             samples=args.samples, batch_size=args.batch_size, percentile=args.percentile,
                             seed=args.seed, eval_persons=args.eval_persons, decoder_dtype=args.decoder_dtype,
                             overwrite=args.overwrite, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    result = calibrate_bundle(config_from_args(args))
    print(f"int8 variant added to {result.bundle} ({result.samples} samples, {args.method}); "
          f"calibration time {result.calibration_seconds:.1f}s")
    return 0
