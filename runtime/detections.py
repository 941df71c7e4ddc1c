"""Person boxes from a detector: a COCO *results* file, as mmpose reads `bbox_file` for top-down evaluation.

`[{"image_id": int, "category_id": 1, "bbox": [x, y, w, h], "score": float}, ...]` — entries of another category
are ignored, those scoring below the threshold dropped (mmpose's `det_bbox_thr`, default 0.0). For a video,
`image_id` is the frame index (0-based).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x, y, w, h in image pixels
    score: float


def read_detections(path: str | Path, score_threshold: float = 0.0) -> dict[int, list[Detection]]:
    """image_id → its person detections with score >= `score_threshold`, best first. One-line InputError for an
    unreadable or malformed file and for a file with no usable person detection."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"detections file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"detections file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise InputError(f"detections file {str(path)!r} holds a {type(data).__name__}: expected a COCO results "
                         "list [{image_id, category_id, bbox, score}, ...]")
    if not data:
        raise InputError(f"detections file {str(path)!r} is empty: expected COCO results with person boxes")
    out: dict[int, list[Detection]] = {}
    persons = 0
    for i, d in enumerate(data):
        try:
            image_id, category = int(d["image_id"]), int(d.get("category_id", 1))
            box = tuple(float(v) for v in d["bbox"])
            score = float(d.get("score", 1.0))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"detections file {str(path)!r} entry {i}: {str(d)[:80]}: expected "
                             "{image_id, category_id, bbox: [x, y, w, h], score}") from None
        if len(box) != 4 or not all(math.isfinite(v) for v in (*box, score)):
            raise InputError(f"detections file {str(path)!r} entry {i}: bbox {list(box)} / score {score}: "
                             "expected four finite numbers [x, y, w, h] and a finite score")
        if category != 1:
            continue
        persons += 1
        if score >= score_threshold and box[2] > 0 and box[3] > 0:
            out.setdefault(image_id, []).append(Detection(box, score))  # type: ignore[arg-type]
    if not out:
        raise InputError(f"detections file {str(path)!r}: none of its {persons} person (category 1) detections "
                         f"has score >= {score_threshold} and a non-empty box")
    for dets in out.values():
        dets.sort(key=lambda d: -d.score)
    return out


def check_image_ids(detections: dict[int, list[Detection]], known: set[int] | range, what: str) -> None:
    """Every image id the detections name must be one of `known` (the video's frame indices, a COCO file's ids)."""
    unknown = sorted(set(detections) - set(known))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        span = f"{min(known)}..{max(known)}" if len(known) else "none"
        raise InputError(f"detections name {len(unknown)} image id(s) not in {what} ({shown}); expected ids "
                         f"{span}")
