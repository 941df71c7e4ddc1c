"""Synthetic COCO person-keypoint datasets: scenes of procedural figures.

    python -m training.data.synthetic --out DIR --num-images N --seed S [--preview PNG]

writes DIR/images/NNNNNN.jpg and DIR/person_keypoints.json (COCO format).  Image i is
rendered from ``np.random.default_rng([seed, i])`` alone, so the same config gives
byte-identical annotations and identical pixels, and images can be rendered in any
order (``render_image``) for on-the-fly training.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .figure import (KEYPOINT_NAMES, KEYPOINT_PARTS, NOMINAL_HEIGHT, NUM_PARTS, SKELETON,
                     draw_figure, sample_figure, transform)

ANNOTATION_FILE = "person_keypoints.json"
CATEGORY = {"id": 1, "name": "person", "supercategory": "person",
            "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(e) for e in SKELETON]}
OCCLUDER_LABEL = 255
# 'plain': a noisy two-colour gradient only (no shapes, stripes or photos) — the low-clutter domain of the
# shipped small model; 'texture' adds shapes/stripes/colour noise, 'photo' sample photos, 'mixed' both.
BACKGROUNDS = ("texture", "photo", "mixed", "plain")
# The SyntheticConfig fields a training config may set (training.train.TrainConfig.domain); same names as the flags.
DOMAIN_KEYS = ("background", "occluder_prob", "truncation_prob", "max_persons")
# `--nested`: Human-Art-style sub-folders (images/<scenario>/...)
NESTED_SCENARIOS = ("2D_virtual_human/cartoon", "3D_virtual_human/garage_kits", "real_human/dance")


@dataclass(frozen=True)
class SyntheticConfig:
    num_images: int
    seed: int
    image_size: tuple[int, int] = (320, 320)        # (width, height)
    max_image_size: tuple[int, int] | None = None   # if set, sizes vary in [image_size, this]
    min_persons: int = 1
    max_persons: int = 3
    occluder_prob: float = 0.3                      # per person
    truncation_prob: float = 0.15                   # per person: may stick out of the image
    background: str = "mixed"                       # 'texture' | 'photo' | 'mixed' | 'plain'
    jpeg_quality: int = 92

    def __post_init__(self):
        if self.num_images < 0 or not 1 <= self.min_persons <= self.max_persons <= 12:
            raise ValueError("need num_images >= 0 and 1 <= min_persons <= max_persons <= 12")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, not {self.background!r}")
        if min(self.image_size) < 64 or (self.max_image_size and min(self.max_image_size) < 64):
            raise ValueError("images must be at least 64x64")


# ----------------------------------------------------------------------------- backgrounds
_PHOTOS: list | None = None


def _photos() -> list:
    """Sample photos shipped with matplotlib (if installed), found without importing it."""
    global _PHOTOS
    if _PHOTOS is None:
        _PHOTOS = []
        spec = importlib.util.find_spec("matplotlib")
        for root in (spec.submodule_search_locations or []) if spec else []:
            d = Path(root) / "mpl-data" / "sample_data"
            try:
                _PHOTOS.append(Image.open(d / "grace_hopper.jpg").convert("RGB"))
                for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
                    _PHOTOS.append(_hillshade(np.load(d / name)[key].astype(np.float32)))
            except (OSError, KeyError, ValueError):
                continue
            break
    return _PHOTOS


def _hillshade(dem: np.ndarray) -> Image.Image:
    """A terrain 'photo' from an elevation grid."""
    gy, gx = np.gradient(dem / (np.ptp(dem) + 1e-6) * max(dem.shape))
    shade = np.clip(0.75 + 0.08 * (gx - gy), 0.35, 1)
    elev = (dem - dem.min()) / (np.ptp(dem) + 1e-6)
    rgb = np.stack([0.45 + 0.4 * elev, 0.55 + 0.2 * elev, 0.35 + 0.1 * elev], -1)
    return Image.fromarray((255 * rgb * shade[..., None]).astype(np.uint8))


def _rand_colour(rng, lo=0, hi=256):
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _texture(rng, w: int, h: int, plain: bool = False) -> Image.Image:
    kind = 1 if plain else rng.integers(4)
    if kind == 0:  # smooth colour noise with a finer layer
        g = rng.integers(2, 9)
        f = int(rng.integers(12, 40))
        coarse, fine = (Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8)).resize((w, h), m)
                        for n, m in ((g, Image.BICUBIC), (f, Image.BILINEAR)))
        return Image.blend(coarse, fine, float(rng.uniform(0.1, 0.4)))
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    a = rng.uniform(0, math.pi)
    t = xx * math.cos(a) + yy * math.sin(a)
    c0, c1 = (np.array(_rand_colour(rng), np.float32) for _ in range(2))
    if kind == 1:  # gradient
        s = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == 2:  # stripes / checks
        s = 0.5 + 0.5 * np.sin(t * rng.uniform(0.05, 0.5))
        if rng.random() < 0.4:
            s = s * (0.5 + 0.5 * np.sin((xx * math.sin(a) - yy * math.cos(a)) * rng.uniform(0.05, 0.4)))
    else:  # random shapes on a flat colour
        img = Image.new("RGB", (w, h), _rand_colour(rng))
        dr = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(8, 30))):
            x, y = rng.uniform(-0.2, 1.1, 2) * (w, h)
            sw, sh = rng.uniform(0.05, 0.5, 2) * (w, h)
            box, c = (x, y, x + sw, y + sh), _rand_colour(rng, 30, 230)
            kind = rng.integers(3)
            if kind == 2:
                dr.line(box, fill=c, width=int(rng.integers(2, 12)))
            else:
                (dr.rectangle if kind == 0 else dr.ellipse)(box, fill=c)
        return img
    noise = rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(2, 15))
    arr = c0 + s[..., None].astype(np.float32) * (c1 - c0) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _photo(rng, w: int, h: int) -> Image.Image:
    src = _PHOTOS[rng.integers(len(_PHOTOS))]
    sw, sh = src.size
    frac = rng.uniform(0.25, 0.8)
    cw, ch = min(sw, frac * sw), min(sh, frac * sw * h / w)
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    img = src.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    tint = rng.uniform(0.6, 1.2, 3).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(img, np.float32) * tint, 0, 255).astype(np.uint8))


def _background(rng, cfg: SyntheticConfig, w: int, h: int) -> Image.Image:
    if cfg.background == "plain":
        return _texture(rng, w, h, plain=True)
    use_photo = cfg.background == "photo" or (cfg.background == "mixed" and rng.random() < 0.5)
    return _photo(rng, w, h) if use_photo and _photos() else _texture(rng, w, h)


# ----------------------------------------------------------------------------- scenes
def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


def _place(rng, cfg, ext, n, w, h, boxes):
    """Picks scale and offset for a figure whose body-unit extent is ext."""
    hi_frac = (0.45, 0.92) if n == 1 else (0.3, 0.65)
    scale = rng.uniform(*hi_frac) * h / NOMINAL_HEIGHT
    ew, eh = ext[2] - ext[0], ext[3] - ext[1]
    scale = min(scale, 0.95 * w / ew, 0.98 * h / eh) if rng.random() >= cfg.truncation_prob else scale
    bw, bh = ew * scale, eh * scale
    slack = 0.35 if bw > w or bh > h or rng.random() < cfg.truncation_prob else 0.0
    best = None
    for _ in range(20):
        x0 = rng.uniform(-slack * bw, max(-slack * bw, w - bw + slack * bw))
        y0 = rng.uniform(-slack * bh, max(-slack * bh, h - bh + slack * bh))
        box = (x0, y0, x0 + bw, y0 + bh)
        overlap = max([_iou(box, b) for b in boxes], default=0.0)
        if best is None or overlap < best[0]:
            best = (overlap, box)
        if overlap < 0.15:
            break
    x0, y0 = best[1][:2]
    return scale, np.array([x0 - ext[0] * scale, y0 - ext[1] * scale]), best[1]


def render_image(cfg: SyntheticConfig, index: int) -> tuple[Image.Image, list[dict]]:
    """Renders image `index` of the dataset; returns it with its person annotations
    (COCO fields except id/image_id)."""
    img, anns, _ = render_scene(cfg, index)
    return img, anns


def render_scene(cfg: SyntheticConfig, index: int) -> tuple[Image.Image, list[dict], list]:
    """`render_image` plus each annotation's figure in image pixels (for MPII's extra joints and head box)."""
    rng = np.random.default_rng([cfg.seed, index])
    w, h = cfg.image_size
    if cfg.max_image_size:
        w = int(rng.integers(min(w, cfg.max_image_size[0]), max(w, cfg.max_image_size[0]) + 1))
        h = int(rng.integers(min(h, cfg.max_image_size[1]), max(h, cfg.max_image_size[1]) + 1))
    img = _background(rng, cfg, w, h)
    n = int(rng.integers(cfg.min_persons, cfg.max_persons + 1))
    people, boxes = [], []
    for _ in range(n):
        fig = sample_figure(rng)
        scale, off, box = _place(rng, cfg, fig.extent(), n, w, h, boxes)
        boxes.append(box)
        people.append((transform(fig, np.eye(2) * scale, off, scale), scale))
    people.sort(key=lambda p: p[0].keypoints[15:, 1].max())  # nearer (lower feet) in front

    lab = Image.new("L", (w, h), 0)
    rgb_d, lab_d = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    masks = []
    for i, (fig, scale) in enumerate(people):
        mask = Image.new("L", (w, h), 0)
        draw_figure(fig, rgb_d, lab_d, ImageDraw.Draw(mask), 1 + i * NUM_PARTS, round(0.05 * scale))
        masks.append(mask)
    for fig, scale in people:  # occluders: boxes/ellipses over part of a person
        if rng.random() >= cfg.occluder_prob:
            continue
        kp = fig.keypoints
        x0, y0 = kp.min(0)
        x1, y1 = kp.max(0)
        cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
        ow, oh = rng.uniform(0.25, 0.7) * max(x1 - x0, 2 * scale), rng.uniform(0.15, 0.45) * (y1 - y0)
        box = (cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2)
        shape = "rectangle" if rng.random() < 0.6 else "ellipse"
        c = _rand_colour(rng, 20, 236)
        getattr(rgb_d, shape)(box, fill=c, outline=_rand_colour(rng), width=max(1, round(0.05 * scale)))
        getattr(lab_d, shape)(box, fill=OCCLUDER_LABEL)

    labels = np.asarray(lab)
    anns = []
    for i, ((fig, _), mask) in enumerate(zip(people, masks)):
        kps = []
        for k, (x, y) in enumerate(fig.keypoints):
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                kps += [0, 0, 0]
                continue
            part = int(labels[int(round(y)), int(round(x))]) - 1 - i * NUM_PARTS
            v = 2 if part in KEYPOINT_PARTS[k] and not fig.self_hidden[k] else 1
            kps += [round(float(x), 2), round(float(y), 2), v]
        bx = mask.getbbox() or (w, h, w, h)
        area = float(np.count_nonzero(np.asarray(mask.crop(bx))))
        lab_xy = np.array([kps[3 * k:3 * k + 2] for k in range(17) if kps[3 * k + 2] > 0]).reshape(-1, 2)
        x0, y0 = min([bx[0], *lab_xy[:, 0]]), min([bx[1], *lab_xy[:, 1]])
        x1, y1 = max([bx[2], *lab_xy[:, 0]]), max([bx[3], *lab_xy[:, 1]])
        anns.append({"category_id": 1, "iscrowd": 0, "num_keypoints": len(lab_xy), "keypoints": kps,
                     "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                     "area": area})
    return img, anns, [fig for fig, _ in people]


# ----------------------------------------------------------------------------- dataset
def build_coco(cfg: SyntheticConfig, image_dir: Path | None = None, ext: str = "jpg", nested: bool = False) -> dict:
    """Renders all images (saving them to image_dir if given) and returns the COCO dict. `nested`: a Human-Art-style
    set, images in scenario sub-folders and extra per-image / per-annotation fields a reader must ignore."""
    images, annotations = [], []
    for index in range(cfg.num_images):
        img, anns = render_image(cfg, index)
        name = f"{index + 1:06d}.{ext}"
        scenario = NESTED_SCENARIOS[index % len(NESTED_SCENARIOS)]
        if nested:
            name = f"{scenario}/{name}"
        if image_dir is not None:
            kw = {"quality": cfg.jpeg_quality, "subsampling": 0} if ext == "jpg" else {}
            (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
            img.save(image_dir / name, **kw)
        extra = {"category": scenario.split("/")[-1], "description": "synthetic figures"} if nested else {}
        images.append({"id": index + 1, "file_name": name, "width": img.width, "height": img.height, **extra})
        for a in anns:
            extra = {"keypoints_21": a["keypoints"] + [0] * 12, "self_contact": []} if nested else {}
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **a, **extra})
    info = {"description": "posellm synthetic persons", "version": "1",
            "config": json.loads(json.dumps(asdict(cfg))),
            "photo_backgrounds": bool(cfg.background != "texture" and _photos())}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [CATEGORY]}


def generate_dataset(cfg: SyntheticConfig, out_dir: str | os.PathLike, nested: bool = False) -> Path:
    """Writes out_dir/images/*.jpg and out_dir/person_keypoints.json atomically: everything
    goes to a temporary sibling directory that then replaces out_dir."""
    return write_atomically(out_dir, lambda tmp: _write_coco(cfg, tmp, nested))


def _write_coco(cfg: SyntheticConfig, tmp: Path, nested: bool) -> None:
    (tmp / "images").mkdir()
    coco = build_coco(cfg, tmp / "images", nested=nested)
    (tmp / ANNOTATION_FILE).write_text(json.dumps(coco, separators=(",", ":")))


def write_atomically(out_dir: str | os.PathLike, fill) -> Path:
    """`fill(tmp)` writes a dataset into a temporary sibling directory that then replaces out_dir."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def draw_preview(dataset_dir: str | os.PathLike, out_path: str | os.PathLike, n: int = 8,
                 cols: int = 4, tile: int = 320) -> Path:
    """Contact sheet of the first n images with keypoints (left = cyan, right = magenta,
    hollow = occluded) and boxes drawn on."""
    root = Path(dataset_dir)
    coco = json.loads((root / ANNOTATION_FILE).read_text())
    by_img: dict = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    ims = coco["images"][:n]
    rows = max(1, math.ceil(len(ims) / cols))
    sheet = Image.new("RGB", (cols * tile, rows * tile), (40, 40, 40))
    for t, im in enumerate(ims):
        img = Image.open(root / "images" / im["file_name"]).convert("RGB")
        s = tile / max(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)))
        d = ImageDraw.Draw(img)
        for a in by_img.get(im["id"], []):
            x, y, bw, bh = (v * s for v in a["bbox"])
            d.rectangle((x, y, x + bw, y + bh), outline=(255, 255, 0))
            k = np.array(a["keypoints"], float).reshape(17, 3)
            for i, j in SKELETON:
                if k[i - 1, 2] > 0 and k[j - 1, 2] > 0:
                    d.line((*(k[i - 1, :2] * s), *(k[j - 1, :2] * s)), fill=(255, 255, 255), width=1)
            for idx, (kx, ky, v) in enumerate(k):
                if v > 0:
                    c = (0, 255, 255) if "left" in KEYPOINT_NAMES[idx] else (255, 0, 255) \
                        if "right" in KEYPOINT_NAMES[idx] else (255, 255, 0)
                    d.ellipse((kx * s - 3, ky * s - 3, kx * s + 3, ky * s + 3),
                              fill=c if v == 2 else None, outline=c)
        sheet.paste(img, ((t % cols) * tile, (t // cols) * tile))
    sheet.save(out_path)
    return Path(out_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--num-images", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, nargs=2, default=(320, 320), metavar=("W", "H"))
    ap.add_argument("--max-image-size", type=int, nargs=2, default=None, metavar=("W", "H"))
    ap.add_argument("--min-persons", type=int, default=1)
    ap.add_argument("--max-persons", type=int, default=3)
    ap.add_argument("--occluder-prob", type=float, default=0.3)
    ap.add_argument("--truncation-prob", type=float, default=0.15)
    ap.add_argument("--background", choices=BACKGROUNDS, default="mixed")
    ap.add_argument("--preview", default=None, help="also write a contact sheet PNG here")
    ap.add_argument("--nested", action="store_true",
                    help="Human-Art style: images in scenario sub-folders, extra annotation fields")
    ap.add_argument("--mpii", action="store_true",
                    help="write an MPII-format set instead (images/, annot/valid.json, annot/gt_valid.mat; "
                         "needs scipy)")
    ap.add_argument("--domain-of", default=None, metavar="TRAIN_CONFIG_JSON",
                    help="take background / occluder / truncation / max-persons from a training.train config "
                         "(e.g. a model's train_config.json), so a val set has its training domain")
    args = ap.parse_args(argv)
    if args.domain_of:
        train_cfg = json.loads(Path(args.domain_of).read_text())
        for key in DOMAIN_KEYS:
            if key in train_cfg:
                setattr(args, key, train_cfg[key])
    cfg = SyntheticConfig(num_images=args.num_images, seed=args.seed, image_size=tuple(args.image_size),
                          max_image_size=tuple(args.max_image_size) if args.max_image_size else None,
                          min_persons=args.min_persons, max_persons=args.max_persons,
                          occluder_prob=args.occluder_prob, truncation_prob=args.truncation_prob,
                          background=args.background)
    t0 = time.perf_counter()
    if args.mpii:
        from .mpii import generate_mpii
        out = generate_mpii(cfg, args.out)
    else:
        out = generate_dataset(cfg, args.out, nested=args.nested)
    dt = time.perf_counter() - t0
    print(f"wrote {cfg.num_images} images to {out} in {dt:.1f}s ({cfg.num_images / max(dt, 1e-9):.0f} img/s)")
    if args.preview:
        print(f"preview: {draw_preview(out, args.preview)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
