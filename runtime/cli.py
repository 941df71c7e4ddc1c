"""`posellm-edge run BUNDLE --image IMG --box x,y,w,h ...` and the COCO batch mode (`--coco ANN --images DIR`)."""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from pathlib import Path

from .backends import BACKENDS
from .coco import read_coco_persons
from .draw import draw_results
from .errors import InputError
from .estimator import DECODINGS, Estimator, EstimatorConfig
from .keypoint_sets import SET_NAMES
from .image_io import load_image
from .prompts import parse_keypoint_spec
from .results import write_json


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InputError(f"--box {text!r}: expected x,y,w,h (four numbers)")
    return values  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--image", type=Path, help="an image file")
    p.add_argument("--box", action="append", default=[], metavar="X,Y,W,H", help="person box (repeatable)")
    p.add_argument("--keypoint", action="append", default=[], metavar="'NAME: DESCRIPTION'",
                   help="custom keypoint (repeatable); default: the 17 COCO keypoints")
    p.add_argument("--keypoint-set", choices=SET_NAMES, default=None,
                   help="a named LocLLM keypoint set instead: coco (17), mpii (16), h36m (17)")
    p.add_argument("--decoding", choices=DECODINGS, default=None,
                   help="default: speculative for --video/--camera (exact: equals template), else template")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--precision", default="fp32", help="bundle variant: fp32, fp16 or int8")
    p.add_argument("--max-batch", type=int, default=None, help="sequences per decoder batch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, help="write per-person results here")
    p.add_argument("--draw", type=Path, help="render skeleton, points and scores to this PNG")
    p.add_argument("--coco", type=Path, help="batch mode: COCO keypoint annotations (GT boxes)")
    p.add_argument("--images", type=Path, help="batch mode: image folder")
    p.add_argument("--out", type=Path, help="batch mode: COCO results JSON; video mode: the drawn video (MP4)")
    v = p.add_argument_group("video / camera (pip install 'posellm-edge[video]')")
    v.add_argument("--video", type=Path, help="a video file; --json writes one JSON line per frame")
    v.add_argument("--camera", type=int, metavar="N", help="camera N (V4L2 /dev/videoN on Linux)")
    v.add_argument("--detections", type=Path, metavar="DETS.json",
                   help="COCO results of a person detector, image_id = frame index (else: --box, then tracked)")
    v.add_argument("--det-score", type=float, default=0.0, help="keep detections scoring at least this")
    v.add_argument("--keypoint-score", type=float, default=0.3, help="tracking: keypoints that define the next box")
    v.add_argument("--lost-score", type=float, default=0.2, help="tracking: drop a person below this mean score")
    v.add_argument("--track-margin", type=float, default=1.25, help="tracking: keypoint box × this")
    v.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (a camera: Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    streaming = args.video is not None or args.camera is not None
    decoding = args.decoding or ("speculative" if streaming else "template")
    cfg = EstimatorConfig(precision=args.precision, backend=args.backend, decoding=decoding,
                          max_batch=args.max_batch, threads=args.threads)
    if streaming:
        from .stream_cli import run_video
        return run_video(args, cfg)
    if args.coco is not None:
        if args.images is None or args.out is None:
            raise InputError("--coco needs --images DIR and --out RESULTS.json")
        return run_coco(Estimator(args.bundle, cfg), args.coco, args.images, args.out)
    if args.image is None or not args.box:
        raise InputError("give --image IMG and at least one --box x,y,w,h (or --coco ANN --images DIR --out F)")
    boxes = [parse_box(b) for b in args.box]
    if args.keypoint and args.keypoint_set:
        raise InputError(f"--keypoint and --keypoint-set {args.keypoint_set} both given; expected one of them")
    keypoints = [parse_keypoint_spec(k) for k in args.keypoint] or args.keypoint_set
    image = load_image(args.image)
    estimator = Estimator(args.bundle, cfg)
    results = estimator.estimate(image, boxes, keypoints)
    payload = {"image": str(args.image), "precision": cfg.precision, "decoding": cfg.decoding,
               "persons": [r.to_json() for r in results]}
    if args.json:
        write_json(args.json, payload)
    if args.draw:
        draw_results(image, results, args.draw)
    for i, r in enumerate(results):
        bad = sum(1 for f in r.flags if f)
        print(f"person {i}: score {r.score:.3f}, {len(r.names)} keypoints" + (f", {bad} flagged" if bad else ""))
        for name, (x, y, s), answer in zip(r.names, r.keypoints, r.answers):
            print(f"  {name:<15} x={x:8.1f} y={y:8.1f} score={s:.3f}  {answer!r}")
    return 0


def _progress(items, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional on edge installs
        return items
    return tqdm(items, total=total, desc=desc, unit="img")


def run_coco(estimator: Estimator, ann: Path, image_dir: Path, out: Path) -> int:
    """Every GT person of a COCO file → COCO results (LocLLM evaluation: GT boxes, no flip)."""
    by_image: OrderedDict[int, list] = OrderedDict()
    for rec in read_coco_persons(ann):
        by_image.setdefault(rec.image_id, []).append(rec)
    predictions = predict_coco(estimator, by_image, image_dir)
    write_json(out, predictions)
    print(f"{len(predictions)} person results for {len(by_image)} images written to {out}")
    return 0


def predict_coco(estimator, by_image: "OrderedDict[int, list]", image_dir: Path) -> list[dict]:
    """Shared with eval: any object with `estimate_records(image, records)` (the runtime or the reference)."""
    predictions = []
    for image_id, records in _progress(by_image.items(), len(by_image), "persons"):
        image = load_image(Path(image_dir) / records[0].file_name)
        for rec, result in zip(records, estimator.estimate_records(image, records)):
            entry = result.to_coco(image_id)
            if not all(math.isfinite(v) for v in entry["keypoints"]):
                raise InputError(f"non-finite keypoints for image {image_id}")
            predictions.append(entry)
    return predictions
