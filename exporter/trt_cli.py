"""`posellm-edge build BUNDLE --precision fp16|int8 [--max-persons N] [--workspace GB] [--timing-cache FILE]`.

Thin by design: `run` builds a BuildConfig and calls `build_engines`; typed errors (InputError, BundleError,
BuildError) propagate to the top-level CLI, which maps them to exit codes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .trt_build import PRECISIONS, BuildConfig, build_engines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory written by `posellm-edge export`")
    parser.add_argument("--precision", choices=PRECISIONS, required=True,
                        help="which variant's ONNX graphs to build (int8 needs `posellm-edge calibrate` first)")
    parser.add_argument("--max-persons", type=int, default=None,
                        help="largest person batch the engines accept (default: the bundle's max_persons)")
    parser.add_argument("--workspace", type=float, default=None, metavar="GB",
                        help="TensorRT workspace memory pool limit in GiB (default: TensorRT's)")
    parser.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                        help="TensorRT timing cache: read if it exists, updated after the build")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--commands-only", action="store_true",
                      help="only write trtexec_<precision>.sh into the bundle (for building on the device; "
                           "TensorRT not needed here)")
    mode.add_argument("--register", action="store_true",
                      help="record engines that trtexec_<precision>.sh built (checks they load with this TensorRT)")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(bundle=args.bundle, precision=args.precision, max_persons=args.max_persons,
                       workspace_gb=args.workspace, timing_cache=args.timing_cache,
                       commands_only=args.commands_only, register=args.register)


def run(args: argparse.Namespace) -> int:
    result = build_engines(config_from_args(args))
    if result.engines:
        print(f"{len(result.engines)} engine(s) recorded in {result.bundle}/manifest.json "
              f"(TensorRT {result.tensorrt_version})")
    else:
        print(f"trtexec commands written to {result.script}")
    return 0
