"""`posellm-edge eval --checkpoint CKPT --bundle B [--bundle B2] (--coco ANN | --mpii valid.json --headboxes
gt_valid.mat) --images DIR [--out REPORT.json] [--predictions DIR] [--max-ap-drop X]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.backends import BACKENDS

from .evaluate import DECODINGS, EvalConfig, evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="the PyTorch reference checkpoint")
    p.add_argument("--bundle", type=Path, action="append", required=True, help="bundle(s) to evaluate")
    p.add_argument("--coco", type=Path, help="COCO-format person-keypoint annotations, GT boxes (COCO val, "
                                             "Human-Art: file_names may have sub-directories)")
    p.add_argument("--mpii", type=Path, help="MPII valid.json (LocLLM/HRNet layout): zero-shot PCKh with the 16 "
                                             "MPII joints asked by name")
    p.add_argument("--headboxes", type=Path, help="with --mpii: MPII's annot/gt_valid.mat")
    p.add_argument("--images", type=Path, required=True, help="the folder the file names are relative to "
                                                              "(MPII: its images/)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", action="append", help="only these variants (default: all in the bundle)")
    p.add_argument("--decoding", action="append", choices=DECODINGS, help="default: free and template")
    p.add_argument("--max-ap-drop", type=float, default=None,
                   help="fail when a variant's AP (MPII: PCKh Mean) is this far below the reference's")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--out", type=Path, help="REPORT.json (a Markdown table is written beside it)")
    p.add_argument("--predictions", type=Path, help="write every variant's predictions to DIR/<variant>/ "
                                                    "(MPII: LocLLM's pred_kpt.json; COCO: keypoints_results.json)")
    p.add_argument("--detections", type=Path, metavar="DETS.json",
                   help="a person detector's COCO results instead of GT boxes (rescored, OKS-NMS 0.9 as HRNet/mmpose)")
    p.add_argument("--det-score", type=float, default=0.0, help="with --detections: keep boxes scoring at least this")


def run(args: argparse.Namespace) -> int:
    report = evaluate(EvalConfig(
        checkpoint=args.checkpoint, bundles=tuple(args.bundle), coco=args.coco, mpii=args.mpii,
        headboxes=args.headboxes, images=args.images, backend=args.backend,
        precisions=tuple(args.precision) if args.precision else None,
        decodings=tuple(args.decoding) if args.decoding else DECODINGS, max_ap_drop=args.max_ap_drop,
        out=args.out, predictions=args.predictions, max_images=args.max_images,
        detections=args.detections, det_score=args.det_score))
    print(report["markdown"])
    failed = report.get("failed")
    if failed:
        print(f"{'PCKh' if report['metric'] == 'Mean' else 'AP'} dropped more than {args.max_ap_drop} below the "
              f"reference for: {', '.join(failed)}")
        return 1
    return 0
