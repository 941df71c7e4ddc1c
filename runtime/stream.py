"""A stream of frames (video file or camera) through the Estimator: boxes per frame from a Tracker, last frame's
answers as speculative drafts, one JSON line per frame, drawn frames to a video, a summary at the end.

The JSONL is written one complete line per frame and flushed, so a failure mid-stream (a corrupt frame, Ctrl-C)
leaves every line before it valid; the video is finalised with the frames drawn so far (runtime/video.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .acceptance import AcceptanceTracker
from .backends.base import Stopwatch
from .detections import Detection, check_image_ids
from .draw import render_results
from .errors import InputError
from .estimator import Estimator
from .preprocess import validate_box
from .tracking import Tracker

DIGITS = 6


@dataclass
class StreamSummary:
    frames: int = 0
    persons: int = 0  # person estimates over all frames
    seconds: float = 0.0  # wall time of the whole loop (decode, estimate, draw, encode)
    estimate_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    speculation: dict = field(default_factory=dict)  # AcceptanceTracker.to_json(): who got drafts, shadow rates

    def add(self, watch: Stopwatch) -> None:
        for k, v in watch.seconds.items():
            self.stages[k] = self.stages.get(k, 0.0) + v
        for k, v in watch.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def to_json(self) -> dict:
        c, persons = self.counts, max(self.persons, 1)
        return {
            "frames": self.frames, "persons": self.persons, "seconds": self.seconds,
            "fps": self.frames / self.seconds if self.seconds else 0.0,
            "ms_per_person": 1e3 * self.estimate_seconds / persons,
            "stage_ms_per_person": {k: 1e3 * v / persons for k, v in self.stages.items()},
            "passes_per_person": c.get("person_passes", 0) / max(c.get("persons", 0), 1),
            # rows (keypoint sequences) × passes: what compaction shrinks (template: 6 per keypoint)
            "row_passes_per_person": c.get("row_passes", 0) / max(c.get("persons", 0), 1),
            "draft_acceptance": [c.get(f"accepted_digit{j}", 0) / c[f"draft_digit{j}"]
                                 if c.get(f"draft_digit{j}") else None for j in range(DIGITS)],
            "lost": self.lost,
            **({"speculation": self.speculation} if self.speculation else {}),
        }


def _usable(box, width: int, height: int) -> bool:
    """A detector may report boxes outside the frame (or under a pixel inside it): those are skipped, not errors."""
    try:
        validate_box(box, width, height)
    except InputError:
        return False
    return True


def frame_counts(watch: Stopwatch) -> dict:
    c = watch.counts
    out = {"passes_per_person": c.get("person_passes", 0) / max(c.get("persons", 0), 1)}
    if any(f"draft_digit{j}" in c for j in range(DIGITS)):
        out["drafted_digits"] = [c.get(f"draft_digit{j}", 0) for j in range(DIGITS)]
        out["accepted_digits"] = [c.get(f"accepted_digit{j}", 0) for j in range(DIGITS)]
    return out


def run_stream(estimator: Estimator, frames: Iterable, tracker: Tracker,
               detections: dict[int, list[Detection]] | None = None, jsonl: Path | None = None,
               video_sink_factory: Callable | None = None, log: Callable[[str], None] = print,
               progress: Callable[[Iterable], Iterable] = lambda it: it, known_frames: int | None = None,
               max_frames: int | None = None, acceptance: AcceptanceTracker | None = None) -> StreamSummary:
    """Estimate every frame. `detections` (frame index → boxes) replace tracking; `video_sink_factory(width,
    height)` gives the sink for drawn frames; `acceptance` picks the persons given a draft (default: a tracker with
    AcceptanceConfig's defaults). Raises InputError on a bad frame after closing the outputs."""
    p = estimator.manifest.prompts
    gate = acceptance or AcceptanceTracker(tuple(p.digit_ids or ()), tuple(p.digit_positions or ()))
    if detections is not None and known_frames is not None:
        check_image_ids(detections, range(known_frames), f"the video's {known_frames} frames")
    summary = StreamSummary()
    sink = None
    out = open(jsonl, "w") if jsonl is not None else None
    start = time.perf_counter()
    seen = -1
    try:
        for frame in progress(frames):
            if max_frames is not None and summary.frames >= max_frames:
                break
            seen = frame.index
            h, w = frame.rgb.shape[:2]
            if detections is not None:
                tracker.assign([d for d in detections.get(frame.index, []) if _usable(d.box, w, h)])
            tracks = list(tracker.tracks)
            watch = Stopwatch()
            t0 = time.perf_counter()
            ids, lasts = [t.id for t in tracks], [t.last for t in tracks]
            results = estimator.estimate(frame.rgb, [t.box for t in tracks], watch=watch,
                                         drafts=gate.drafts(ids, lasts)) if tracks else []
            gate.update(ids, lasts, results)
            summary.estimate_seconds += time.perf_counter() - t0
            summary.add(watch)
            summary.frames += 1
            summary.persons += len(results)
            line = {"frame": frame.index, "time": round(frame.time, 6),
                    "persons": [{"id": t.id, **r.to_json()} for t, r in zip(tracks, results)],
                    "timings_ms": {k: round(1e3 * v, 3) for k, v in watch.seconds.items()}, **frame_counts(watch)}
            lost = tracker.update(results, w, h, follow=detections is None)
            gate.forget([t.id for t in tracker.tracks])
            for msg in lost:
                log(f"frame {frame.index}: {msg}")
            summary.lost += [f"frame {frame.index}: {m}" for m in lost]
            if out is not None:
                out.write(json.dumps(line) + "\n")
                out.flush()
            if video_sink_factory is not None:
                if sink is None:
                    sink = video_sink_factory(w, h)
                labels = [f"{t.id}: {r.score:.2f}" for t, r in zip(tracks, results)]
                sink.write(np.asarray(render_results(frame.rgb, results, labels=labels)))
    finally:
        summary.seconds = time.perf_counter() - start
        if estimator.config.decoding == "speculative":
            summary.speculation = gate.to_json()
        if out is not None:
            out.close()
        if sink is not None:
            sink.close()
    if detections is not None:
        check_image_ids(detections, range(seen + 1), f"the {seen + 1} frames read")
    if summary.frames == 0:
        raise InputError("the stream held no frame")
    return summary
