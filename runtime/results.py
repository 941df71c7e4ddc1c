"""Per-person results: keypoints back-projected to the image, LocLLM instance score, COCO result entries."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .answer import KeypointAnswer
from .preprocess import crop_to_image


@dataclass(frozen=True)
class PersonResult:
    box: tuple[float, float, float, float]  # the box as given (x, y, w, h)
    names: tuple[str, ...]
    keypoints: np.ndarray  # [K, 3] x, y (image pixels), score
    score: float  # instance score = mean keypoint score (LocLLM)
    answers: tuple[str, ...]  # decoded answer text per keypoint
    flags: tuple[str, ...]  # "" per well-formed answer, else why not
    tokens: tuple[tuple[int, ...], ...] = field(default=(), repr=False)  # generated ids per keypoint

    def to_json(self) -> dict:
        return {
            "box": [float(v) for v in self.box],
            "keypoint_names": list(self.names),
            "keypoints": [[float(x), float(y), float(s)] for x, y, s in self.keypoints],
            "score": float(self.score),
            "answers": list(self.answers),
            "flags": list(self.flags),
        }

    def to_coco(self, image_id: int) -> dict:
        return {"image_id": int(image_id), "category_id": 1,
                "keypoints": [float(v) for v in self.keypoints.reshape(-1)], "score": float(self.score)}


class Estimate(list):
    """What one `Estimator.estimate*` call returns: its `PersonResult`s (a plain list to every existing caller) and
    that call's own seconds per stage (preprocess, vision, prefill, decode) and decoder counters. The timings travel with the result
    rather than living on the shared estimator, where concurrent callers would read each other's figures."""

    def __init__(self, persons=(), timings: dict[str, float] | None = None, counts: dict[str, int] | None = None
                 ) -> None:
        super().__init__(persons)
        self.timings: dict[str, float] = dict(timings or {})
        self.counts: dict[str, int] = dict(counts or {})  # decoder passes, draft digits offered/accepted


def person_result(box, center: np.ndarray, scale: np.ndarray, crop_size: int, names: list[str] | tuple[str, ...],
                  answers: list[KeypointAnswer], tokens: list[list[int]] | None = None) -> PersonResult:
    """Back-project every keypoint (absent ones too, from crop (0,0), exactly as LocLLM does)."""
    kpts = np.zeros((len(answers), 3), dtype=np.float64)
    kpts[:, 0] = [a.x for a in answers]
    kpts[:, 1] = [a.y for a in answers]
    kpts[:, 2] = [a.score for a in answers]
    kpts[:, :2] = crop_to_image(kpts[:, :2], center, scale, crop_size)
    return PersonResult(
        box=tuple(float(v) for v in box), names=tuple(names), keypoints=kpts, score=float(kpts[:, 2].mean()),
        answers=tuple(a.text for a in answers), flags=tuple(a.flag for a in answers),
        tokens=tuple(tuple(int(t) for t in ids) for ids in (tokens or [])),
    )


def write_json(path: str | Path, data) -> None:
    """Write atomically (temp file + rename): a report is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
