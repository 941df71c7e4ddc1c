"""Which boxes to estimate in each frame of a stream, and whose last answers are each box's draft.

Two sources of boxes:
- tracked (`--box`): each person's next box comes from this frame's confident keypoints — their enclosing box
  grown by a margin around its centre, then made square as LocLLM's crop does (`_xywh2cs`, aspect ratio 1.0:
  the short side grows to the long one) — so the crop follows the person. A person whose instance score (mean
  keypoint score) falls below `lost_score`, who keeps too few confident keypoints, or whose box leaves the image
  is dropped with a log line.
- detected (`--detections`): the detector's boxes of this frame (a COCO results file); each is matched to last
  frame's persons by IoU only to pick its track id and its draft (a wrong match costs speed, never accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .detections import Detection
from .errors import InputError
from .results import PersonResult

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TrackConfig:
    keypoint_score: float = 0.3  # keypoints at least this confident define a person's next box
    lost_score: float = 0.2  # a tracked person whose mean keypoint score is below this is dropped
    min_keypoints: int = 3  # fewer confident keypoints than this: the person is dropped
    margin: float = 1.25  # enclosing box of the confident keypoints × this (mmpose's bbox padding)
    match_iou: float = 0.3  # a detection continues last frame's person it overlaps at least this much

    def __post_init__(self) -> None:
        if not 0.0 <= self.keypoint_score <= 1.0 or not 0.0 <= self.lost_score <= 1.0:
            raise InputError(f"keypoint_score={self.keypoint_score}, lost_score={self.lost_score}: expected 0..1")
        if self.margin < 1.0 or self.min_keypoints < 1:
            raise InputError(f"margin={self.margin}, min_keypoints={self.min_keypoints}: expected >= 1 each")


@dataclass
class Track:
    id: int
    box: Box
    last: PersonResult | None = None  # last frame's result: the draft of this frame's answers


@dataclass
class Tracker:
    config: TrackConfig = field(default_factory=TrackConfig)
    tracks: list[Track] = field(default_factory=list)
    next_id: int = 0

    @classmethod
    def from_boxes(cls, boxes: list[Box], config: TrackConfig | None = None) -> "Tracker":
        t = cls(config or TrackConfig())
        for b in boxes:
            t.tracks.append(Track(t.next_id, tuple(float(v) for v in b)))  # type: ignore[arg-type]
            t.next_id += 1
        return t

    # -- detections ----------------------------------------------------------------------------------------------
    def assign(self, detections: list[Detection]) -> list[Track]:
        """This frame's persons from its detections: greedy IoU matching against last frame's tracks (best
        detection first), a new id for every unmatched detection. Replaces the tracks."""
        free = list(self.tracks)
        out: list[Track] = []
        for d in detections:
            ious = [iou(d.box, t.box) for t in free]
            j = int(np.argmax(ious)) if ious else -1
            if j >= 0 and ious[j] >= self.config.match_iou:
                t = free.pop(j)
                out.append(Track(t.id, d.box, t.last))
            else:
                out.append(Track(self.next_id, d.box))
                self.next_id += 1
        self.tracks = out
        return out

    # -- results -------------------------------------------------------------------------------------------------
    def update(self, results: list[PersonResult], width: int, height: int, follow: bool) -> list[str]:
        """Record this frame's results (the next frame's drafts); with `follow`, move each box to its person's
        confident keypoints and drop lost persons. Returns one log line per dropped person."""
        log, kept = [], []
        for track, r in zip(self.tracks, results, strict=True):
            track.last = r
            if not follow:
                kept.append(track)
                continue
            if r.score < self.config.lost_score:
                log.append(f"person {track.id} lost: mean keypoint score {r.score:.3f} < {self.config.lost_score}")
                continue
            box = keypoint_box(r.keypoints, self.config)
            if box is None:
                log.append(f"person {track.id} lost: fewer than {self.config.min_keypoints} keypoints scored "
                           f">= {self.config.keypoint_score}")
                continue
            x, y, w, h = box
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                log.append(f"person {track.id} lost: its box {[round(v, 1) for v in box]} left the {width}x{height} "
                           "frame")
                continue
            track.box = box
            kept.append(track)
        self.tracks = kept
        return log


def keypoint_box(keypoints: np.ndarray, cfg: TrackConfig) -> Box | None:
    """Square box around the confident keypoints ([K, 3] x, y, score), grown by cfg.margin; None if too few."""
    pts = keypoints[keypoints[:, 2] >= cfg.keypoint_score, :2]
    if len(pts) < cfg.min_keypoints:
        return None
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    side = max(x1 - x0, y1 - y0, 1.0) * cfg.margin  # LocLLM's aspect rule (1.0): the short side grows
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (float(cx - side / 2), float(cy - side / 2), float(side), float(side))


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
