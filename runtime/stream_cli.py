"""`posellm-edge run BUNDLE --video IN.mp4 | --camera N [--box x,y,w,h | --detections DETS.json] --out OUT.mp4
--json OUT.jsonl`: the CLI side of runtime/stream.py (flags → configs, progress bar, the summary lines)."""
from __future__ import annotations

import argparse
import sys

from .detections import read_detections
from .errors import InputError
from .estimator import Estimator, EstimatorConfig
from .results import write_json
from .stream import run_stream
from .tracking import TrackConfig, Tracker


def run_video(args: argparse.Namespace, cfg: EstimatorConfig) -> int:
    from .cli import parse_box
    from .video import VideoSink, VideoSource
    if args.video is not None and args.camera is not None:
        raise InputError("give --video FILE or --camera N, not both")
    if args.detections is not None and args.box:
        raise InputError("give --box (tracked from there) or --detections, not both")
    if args.detections is None and not args.box:
        raise InputError("a stream needs person boxes: --box x,y,w,h (repeatable; then tracked) or --detections F")
    if args.keypoint:
        raise InputError("--keypoint is not supported with --video/--camera (the 17 COCO keypoints are used)")
    track = TrackConfig(keypoint_score=args.keypoint_score, lost_score=args.lost_score, margin=args.track_margin)
    detections = read_detections(args.detections, args.det_score) if args.detections is not None else None
    tracker = Tracker.from_boxes([parse_box(b) for b in args.box], track)
    source = VideoSource(camera=args.camera) if args.camera is not None else VideoSource(args.video)
    estimator = Estimator(args.bundle, cfg)
    sink = (lambda w, h: VideoSink(args.out, source.fps, w, h)) if args.out is not None else None
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 — the JSONL may go to stdout's neighbour
    try:
        summary = run_stream(estimator, source, tracker, detections, args.json, sink, log,
                             _progress(source.frames, source.name), source.frames, args.max_frames)
    finally:
        source.close()
    s = summary.to_json()
    acc = ", ".join("-" if a is None else f"{a:.2f}" for a in s["draft_acceptance"])
    print(f"{s['frames']} frames, {s['persons']} person estimates in {s['seconds']:.1f} s: {s['fps']:.2f} frames/s, "
          f"{s['ms_per_person']:.1f} ms/person ({cfg.decoding}, {s['passes_per_person']:.2f} decoder passes per "
          f"person; draft acceptance per digit [{acc}])")
    for name, path in (("video", args.out), ("frames", args.json)):
        if path is not None:
            print(f"{name}: {path}")
    if args.json is not None:
        write_json(args.json.with_name(args.json.stem + ".summary.json"), {"decoding": cfg.decoding, **s})
    return 0


def _progress(total: int | None, name: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional on edge installs
        return lambda it: it
    return lambda it: tqdm(it, total=total, desc=name, unit="frame", file=sys.stderr)
