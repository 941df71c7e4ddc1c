"""posellm-edge: export, calibrate, build, run, evaluate and benchmark PoseLLM/LocLLM pose models.

One console script; each subcommand lives with its package and is imported lazily, so an edge install (runtime
only: no torch) can still `posellm-edge run`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# subcommand → (module with add_arguments/run, one-line help)
COMMANDS = {
    "export": ("exporter.cli", "merge LoRA and export a checkpoint to an ONNX bundle"),
    "calibrate": ("calibration.cli", "INT8 calibration: write the int8 (Q/DQ) variant into a bundle"),
    "quantize": ("calibration.quantize_cli", "weight-only INT4/INT8 decoder (GPTQ or RTN): add int4 / int8wo"),
    "build": ("exporter.trt_cli", "build TensorRT engines from a bundle's ONNX graphs"),
    "run": ("runtime.cli", "estimate keypoints on an image or a COCO file with a bundle"),
    "eval": ("benchmarks.eval_cli", "COCO AP or MPII PCKh of the PyTorch reference and every bundle variant"),
    "bench": ("benchmarks.bench_cli", "latency / throughput / memory benchmark with the reference baseline"),
    "serve": ("serve.cli", "HTTP pose service on Ray Serve, persons batched across requests"),
    "loadtest": ("serve.loadtest", "closed-loop HTTP load on a running service: latency percentiles, persons/s"),
}
# which extra brings a subcommand's optional dependencies
EXTRAS = {"serve": "serve", "loadtest": "serve"}
EXPECTED_ERRORS = ("PoseLLMEdgeError", "ConfigError", "CheckpointError", "ValidationError", "FileNotFoundError")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posellm-edge", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
        if name == wanted:  # import only the subcommand in use (keeps `run` free of torch)
            try:
                importlib.import_module(module).add_arguments(p)
            except ImportError as exc:
                print(f"posellm-edge {name}: needs an optional dependency that is not installed ({exc.name}); "
                      f"install posellm-edge[{EXTRAS.get(name, 'export')}]", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # map the library's typed errors to one clear line; anything else is a bug
        if args.debug or not any(c.__name__ in EXPECTED_ERRORS for c in type(exc).__mro__):
            traceback.print_exc()
        else:
            print(f"posellm-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
