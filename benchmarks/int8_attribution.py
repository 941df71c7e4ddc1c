"""Which graph costs the int8 variant its accuracy: COCO AP of fp32, int8, and the two mixes (int8 vision W8A8 +
fp32 decoder; fp32 vision + int8 weight-only decoder) on the same persons, template decoding, onnxruntime CPU.

    python -m benchmarks.int8_attribution BUNDLE --coco ANN --images DIR [--max-images N] [--out JSON]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.estimator import Estimator, EstimatorConfig
from runtime.results import write_json

from .coco_metrics import coco_keypoint_metrics
from .evaluate import persons_by_image, run_variant


def estimators(bundle: Path, threads: int | None) -> dict[str, Estimator]:
    """fp32, int8 and the two one-graph-int8 mixes (runners swapped between two estimators of the same bundle)."""
    def make(precision: str) -> Estimator:
        return Estimator(bundle, EstimatorConfig(precision=precision, decoding="template", threads=threads))
    fp32, int8 = make("fp32"), make("int8")
    vision_only, decoder_only = make("fp32"), make("int8")
    vision_only.vision = int8.vision  # int8 vision, fp32 decoder
    decoder_only.vision = fp32.vision  # fp32 vision, int8 decoder
    return {"fp32": fp32, "int8 vision + fp32 decoder": vision_only, "fp32 vision + int8 decoder": decoder_only,
            "int8": int8}


def attribute(bundle: Path, coco: Path, images: Path, max_images: int | None = None,
              threads: int | None = None) -> dict[str, dict[str, float]]:
    by_image = persons_by_image(coco, max_images)
    ids = list(by_image)
    report = {}
    for name, est in estimators(bundle, threads).items():
        run = run_variant(name, est, by_image, images)
        report[name] = coco_keypoint_metrics(coco, run.predictions, image_ids=ids)
    base = report["fp32"]["AP"]
    for metrics in report.values():
        metrics["dAP_vs_fp32"] = round(metrics["AP"] - base, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.int8_attribution", description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--coco", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = attribute(args.bundle, args.coco, args.images, args.max_images, args.threads)
    for name, m in report.items():
        print(f"{name:<28} AP {m['AP']:6.2f}  ΔAP {m['dAP_vs_fp32']:+.2f}  AP50 {m['AP50']:6.2f}")
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
