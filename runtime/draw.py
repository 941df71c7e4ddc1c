"""Render predictions: skeleton, points coloured by score, per-keypoint scores, box."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .keypoints import KEYPOINT_NAMES, SKELETON
from .results import PersonResult


def _colour(score: float) -> tuple[int, int, int]:
    s = float(np.clip(score, 0.0, 1.0))
    return int(255 * (1 - s)), int(255 * s), 40  # red (unsure) → green (confident)


def draw_results(image: np.ndarray, results: list[PersonResult], out: str | Path, min_score: float = 0.0) -> Path:
    out = Path(out)
    render_results(image, results, min_score).save(out)
    return out


def render_results(image: np.ndarray, results: list[PersonResult], min_score: float = 0.0,
                   labels: list[str] | None = None) -> Image.Image:
    """The image with every person drawn (video frames are drawn in memory, then encoded); `labels` replace the
    score written at each box's corner (a stream writes the track id and score)."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    radius = max(2, round(min(canvas.size) / 150))
    for i, person in enumerate(results):
        x, y, w, h = person.box
        draw.rectangle([x, y, x + w, y + h], outline=(255, 200, 0), width=max(1, radius // 2))
        label = labels[i] if labels is not None else f"{person.score:.2f}"
        draw.text((x + 2, y + 2), label, fill=(255, 200, 0))
        pts = person.keypoints
        if tuple(person.names) == KEYPOINT_NAMES:  # skeleton only for the standard 17
            for a, b in SKELETON:
                if pts[a, 2] > min_score and pts[b, 2] > min_score:
                    draw.line([tuple(pts[a, :2]), tuple(pts[b, :2])], fill=(0, 170, 255), width=radius)
        for (px, py, s) in pts:
            if s <= min_score:
                continue
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=_colour(s))
            draw.text((px + radius + 1, py - radius), f"{s:.2f}", fill=_colour(s))
    return canvas
