"""`posellm-edge quantize BUNDLE [--bits 4|8] [--block-size N] [--method gptq|rtn] --coco ANN --images DIR`."""
from __future__ import annotations

import argparse
from pathlib import Path

from .blockwise import BITS, BLOCK_SIZES
from .weight_only import ACCURACY_LEVELS
from .quantize import METHODS, QuantizeConfig, quantize_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = QuantizeConfig.__dataclass_fields__
    parser.add_argument("bundle", type=Path, help="bundle directory with fp32 (and ideally fp16) variants")
    parser.add_argument("--bits", type=int, choices=BITS, default=d["bits"].default,
                        help="weight bits; the variant is int4 or int8wo (default: %(default)s)")
    parser.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=d["block_size"].default,
                        help="input features per fp16 scale (default: %(default)s)")
    parser.add_argument("--method", choices=METHODS, default=d["method"].default,
                        help="gptq (uses calibration crops) or round-to-nearest (default: %(default)s)")
    parser.add_argument("--coco", type=Path, help="COCO person-keypoints file; its GT boxes give the crops")
    parser.add_argument("--images", type=Path, help="folder with the annotation file's images")
    parser.add_argument("--samples", type=int, default=d["samples"].default,
                        help="persons decoded through the fp32 graphs for GPTQ's statistics (default: %(default)s)")
    parser.add_argument("--no-lm-head", dest="lm_head", action="store_false",
                        help="keep lm_head in float (quantized by default)")
    parser.add_argument("--lm-head-bits", type=int, choices=BITS, default=d["lm_head_bits"].default,
                        help="lm_head's weight bits, the most sensitive matrix (default: %(default)s; "
                             "--bits 4 --lm-head-bits 4 quantizes everything to 4 bits)")
    parser.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=d["accuracy_level"].default,
                        help="MatMulNBits' CPU kernel: 4 quantizes activations to int8 per block (fast: onnxruntime's "
                             "8-bit float path is far slower than fp32), 0 keeps float math (exactly weight-only); "
                             "the TensorRT form and the CUDA EP are unaffected (default: %(default)s)")
    parser.add_argument("--name", help="variant name (default: int4 or int8wo)")
    parser.add_argument("--checkpoint", type=Path,
                        help="validate against the PyTorch model carrying the dequantized weights (needs torch)")
    parser.add_argument("--seed", type=int, default=d["seed"].default, help="seed of the crop subset")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing variant of that name")
    parser.add_argument("--segment-layers", type=int, default=d["segment_layers"].default,
                        help="LLM layers per onnxruntime session of the fp32 / MatMulNBits decoders: bounds memory "
                             "at 7B (default: %(default)s)")
    parser.add_argument("--hessian-layers", type=int, default=d["hessian_layers"].default,
                        help="GPTQ: LLM layers whose input statistics one calibration pass collects (float64, "
                             "1.4 GB per 7B layer); the crops are decoded layers / this times (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    cfg = QuantizeConfig(bundle=args.bundle, coco=args.coco, images=args.images, bits=args.bits,
                         block_size=args.block_size, method=args.method, samples=args.samples, lm_head=args.lm_head,
                         lm_head_bits=args.lm_head_bits,
                         accuracy_level=args.accuracy_level, name=args.name, checkpoint=args.checkpoint,
                         seed=args.seed, overwrite=args.overwrite, threads=args.threads,
                         segment_layers=args.segment_layers, hessian_layers=args.hessian_layers)
    result = quantize_bundle(cfg)
    print(f"{result.variant.precision} variant added to {result.bundle} in {result.seconds:.1f}s")
    return 0
