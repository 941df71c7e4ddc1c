"""A synthetic video: one procedural figure (figure.py) walking across a plain background, for the video tests and
the main job's video step.

    python -m training.data.video --out DIR [--seconds 3 --fps 10 --seed 0 --size 320 240]

writes DIR/video.mp4 (H.264 via PyAV), DIR/person_keypoints.json (COCO ground truth, one image per frame, image
id = frame index) and DIR/detections.json (COCO results: the ground-truth box of every frame with score 0.9, plus a
spurious low-score box every 5th frame, so a score threshold has something to drop). Frames are a pure function
of (config, index), like the still-image generator.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .figure import KEYPOINT_NAMES, NOMINAL_HEIGHT, NUM_PARTS, draw_figure, sample_figure, transform
from .synthetic import CATEGORY, _texture


@dataclass(frozen=True)
class VideoConfig:
    seconds: float = 3.0
    fps: int = 10
    seed: int = 0
    size: tuple[int, int] = (320, 240)  # (width, height)
    height_frac: float = 0.75  # the figure's height / the frame's
    travel: float = 0.4  # frame widths walked from one end to the other
    period: float = 6.0  # seconds to walk there and back
    spurious_score: float = 0.05  # score of the false detection every 5th frame

    @property
    def frames(self) -> int:
        return max(1, round(self.seconds * self.fps))


def _scene(cfg: VideoConfig):
    rng = np.random.default_rng([cfg.seed, 27])
    w, h = cfg.size
    return _texture(rng, w, h, plain=True), sample_figure(rng)


def render_frame(cfg: VideoConfig, index: int, scene=None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Frame `index`: RGB [H, W, 3], keypoints [17, 2] and the figure's box [x, y, w, h] (its silhouette)."""
    background, fig = scene or _scene(cfg)
    w, h = cfg.size
    t = index / cfg.fps
    ext = fig.extent()
    scale = cfg.height_frac * h / NOMINAL_HEIGHT
    scale = min(scale, 0.9 * h / (ext[3] - ext[1]))
    sway = 0.06 * math.sin(2 * math.pi * 0.8 * t)  # a gentle rock while walking
    rot = np.array([[math.cos(sway), -math.sin(sway)], [math.sin(sway), math.cos(sway)]]) * scale
    cx = w * (0.5 - cfg.travel / 2 * math.cos(2 * math.pi * t / cfg.period))  # walks across and back
    cy = h * 0.5 + 0.02 * h * math.sin(2 * math.pi * 1.6 * t)  # and a bob
    mid = np.array([(ext[0] + ext[2]) / 2, (ext[1] + ext[3]) / 2])
    placed = transform(fig, rot, np.array([cx, cy]) - rot @ mid, scale)
    img = background.copy()
    lab, mask = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    draw_figure(placed, ImageDraw.Draw(img), ImageDraw.Draw(lab), ImageDraw.Draw(mask), 1, round(0.05 * scale))
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, w, h)
    return np.asarray(img), placed.keypoints, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def render_video(cfg: VideoConfig) -> tuple[list[np.ndarray], dict, list[dict]]:
    """All frames, the COCO ground truth and the detections (see the module docstring)."""
    scene = _scene(cfg)
    frames, images, anns, dets = [], [], [], []
    w, h = cfg.size
    for i in range(cfg.frames):
        rgb, kp, box = render_frame(cfg, i, scene)
        frames.append(rgb)
        inside = (kp[:, 0] >= 0) & (kp[:, 0] <= w - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h - 1)
        kps = [v for (x, y), ok in zip(kp, inside) for v in ((round(float(x), 2), round(float(y), 2), 2)
                                                             if ok else (0, 0, 0))]
        images.append({"id": i, "file_name": f"frame{i:05d}", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "keypoints": kps,
                     "num_keypoints": int(inside.sum()), "bbox": [round(v, 2) for v in box],
                     "area": float(box[2] * box[3])})
        dets.append({"image_id": i, "category_id": 1, "bbox": [round(v, 2) for v in box], "score": 0.9})
        if i % 5 == 0:
            dets.append({"image_id": i, "category_id": 1, "bbox": [2.0, 2.0, w / 4, h / 4],
                         "score": cfg.spurious_score})
    coco = {"info": {"description": "posellm synthetic video", "fps": cfg.fps}, "licenses": [], "images": images,
            "annotations": anns, "categories": [CATEGORY]}
    assert len(KEYPOINT_NAMES) == 17 and NUM_PARTS == 17
    return frames, coco, dets


def write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    """Encode RGB frames as H.264 (yuv420p, even sizes) with PyAV."""
    import av
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        h, w = frames[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        stream.options = {"crf": "18"} if stream.codec_context.name == "libx264" else {}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:stream.height, :stream.width]),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def generate_video(cfg: VideoConfig, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames, coco, dets = render_video(cfg)
    write_mp4(frames, out / "video.mp4", cfg.fps)
    (out / "person_keypoints.json").write_text(json.dumps(coco) + "\n")
    (out / "detections.json").write_text(json.dumps(dets) + "\n")
    first = coco["annotations"][0]["bbox"]
    (out / "first_box.txt").write_text(",".join(f"{v:.1f}" for v in first) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.video", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    args = ap.parse_args(argv)
    cfg = VideoConfig(seconds=args.seconds, fps=args.fps, seed=args.seed, size=tuple(args.size))
    out = generate_video(cfg, args.out)
    print(f"wrote {cfg.frames} frames ({cfg.seconds:g} s at {cfg.fps} fps) to {out}/video.mp4, "
          f"person_keypoints.json, detections.json, first_box.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
