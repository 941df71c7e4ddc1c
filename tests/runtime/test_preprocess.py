"""Crop preprocessing vs LocLLM semantics; cv2 (when installed) is the reference for the affine and the warp."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
try:
    import runtime  # noqa: F401
except ImportError:  # a plain checkout without an install: make the repo root importable
    sys.path.insert(0, str(REPO))

from runtime import image_io  # noqa: E402
from runtime import preprocess as pp  # noqa: E402
from runtime.errors import InputError  # noqa: E402


# ----------------------------------------------------------------------------- references (LocLLM semantics)
@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2", reason="opencv-python is the warp reference and is not installed")


@pytest.fixture(scope="module")
def coco_mini() -> Path:
    if not (COCO_MINI / "person_keypoints.json").is_file():
        pytest.skip(f"shared coco-mini data not found at {COCO_MINI} (expected ../shared beside the repo)")
    return COCO_MINI


def legacy_cv2(cv2) -> bool:
    """OpenCV < 4.11 warps with a fixed-point kernel; newer ones with float32."""
    return tuple(int(v) for v in cv2.__version__.split(".")[:2]) < (4, 11)


def ref_sanitize(bbox, width, height):
    x, y, w, h = bbox
    x1, y1 = np.max((0, x)), np.max((0, y))
    x2 = np.min((width - 1, x1 + np.max((0, w - 1))))
    y2 = np.min((height - 1, y1 + np.max((0, h - 1))))
    return [x1, y1, x2 - x1, y2 - y1] if (x2 >= x1 and y2 >= y1) else None


def ref_center_scale(box):
    x, y, w, h = box
    center = np.zeros(2, dtype=np.float32)
    center[:] = [x + w * 0.5, y + h * 0.5]
    w, h = max(w, h), max(w, h)  # aspect ratio 1: grow the short side
    return center, np.array([w / 200, h / 200], dtype=np.float32)


def ref_affine(cv2, center, scale, rot, size, inv=False):
    """LocLLM get_affine_transform (shift 0) solved by cv2.getAffineTransform."""
    s = np.asarray(scale, np.float32) * 200.0
    half, r = s[0] * -0.5, np.pi * rot / 180
    c = np.asarray(center, np.float32)
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0], src[1] = c, c + np.array([-half * np.sin(r), half * np.cos(r)])
    dst[0], dst[1] = [size * 0.5, size * 0.5], [size * 0.5, 0.0]
    for pts in (src, dst):
        d = pts[0] - pts[1]
        pts[2] = pts[1] + np.array([-d[1], d[0]], np.float32)
    return cv2.getAffineTransform(dst, src) if inv else cv2.getAffineTransform(src, dst)


def ref_normalize(crop, mean, std):
    x = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]


def assert_close_u8(ours, ref, max_tol, mean_tol, what):
    d = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    print(f"{what}: max abs diff {d.max()} gray levels, mean {d.mean():.2e}")
    assert d.max() <= max_tol and d.mean() <= mean_tol, (
        f"{what}: max {d.max()} (tol {max_tol}), mean {d.mean():.3e} (tol {mean_tol})")


# ------------------------------------------------------------------------------------- affine and warp
def test_affine_matrix_matches_cv2(cv2):
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        center = rng.uniform(-50, 700, 2).astype(np.float32)
        scale = rng.uniform(0.01, 4, 2).astype(np.float32)
        rot, size, inv = float(rng.uniform(-45, 45)), int(rng.integers(16, 400)), bool(rng.integers(2))
        ours = pp.get_affine_transform(center, scale, rot, (size, size), inv=inv)
        worst = max(worst, float(np.abs(ours - ref_affine(cv2, center, scale, rot, size, inv)).max()))
    print(f"affine matrix max abs diff vs cv2.getAffineTransform: {worst:.3e}")
    assert worst <= 1e-6, f"max abs diff {worst:.3e} > tol 1e-6"


def test_crops_match_cv2_on_coco_mini(cv2, coco_mini):
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    spec = pp.CropSpec(fixed_point_warp=legacy_cv2(cv2))
    n = 0
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        path = coco_mini / "images" / im["file_name"]
        ref_img = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION),
                               cv2.COLOR_BGR2RGB)
        ref_box = ref_sanitize(ann["bbox"], im["width"], im["height"])
        if ann["category_id"] != 1 or ref_box is None:
            continue
        center, scale = ref_center_scale(ref_box)
        ref_m = ref_affine(cv2, center, scale, 0, 224)
        ref_crop = cv2.warpAffine(ref_img, ref_m, (224, 224), flags=cv2.INTER_LINEAR)

        image = image_io.load_image(path)
        crop = pp.crop_person(image, ann["bbox"], spec)
        assert crop.box == tuple(float(v) for v in ref_box), f"box {crop.box} != LocLLM {ref_box}"
        assert np.array_equal(crop.center, center) and np.array_equal(crop.scale, scale)
        m = pp.get_affine_transform(crop.center, crop.scale, 0, (224, 224))
        assert np.abs(m - ref_m).max() <= 1e-6, f"matrix diff {np.abs(m - ref_m).max():.3e} > tol 1e-6"
        ours = pp.warp_affine(image, m, 224, fixed_point=spec.fixed_point_warp)
        assert_close_u8(ours, ref_crop, 1, 1e-3, f"ann {ann['id']} crop vs cv2.warpAffine")
        d = np.abs(crop.pixel_values - ref_normalize(ref_crop, pp.CLIP_MEAN, pp.CLIP_STD)).max()
        tol = 1 / (255 * min(pp.CLIP_STD)) + 1e-5  # one gray level after normalisation
        print(f"ann {ann['id']} pixel_values max abs diff {d:.3e}")
        assert d <= tol, f"pixel_values max abs diff {d:.3e} > tol {tol:.3e}"
        n += 1
    assert n == 14, f"expected the 14 person boxes of coco-mini, compared {n}"


def test_load_image_matches_cv2_imread(cv2, coco_mini):
    for path in sorted((coco_mini / "images").glob("*.jpg")):
        ref = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION),
                           cv2.COLOR_BGR2RGB)
        ours = image_io.load_image(path)
        assert ours.shape == ref.shape and ours.dtype == np.uint8
        assert_close_u8(ours, ref, 2, 0.05, f"{path.name} decode (Pillow vs cv2 JPEG decoders)")


def test_warp_matches_cv2_synthetic(cv2):
    rng = np.random.default_rng(1)
    legacy = legacy_cv2(cv2)
    for k in range(60):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if k % 3 == 0:  # arbitrary matrix, non-square output
            m = rng.normal(0, 2, (2, 3))
            m[:, 2] = rng.uniform(-100, 100, 2)
            size = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        else:  # person-style crop, box partly outside the image, optional rotation
            m = pp.get_affine_transform(rng.uniform(-20, w + 20, 2), rng.uniform(0.01, 1.5, 2),
                                        float(rng.uniform(-40, 40)) * (k % 2), (64, 64))
            size = (64, 64)
        ref = cv2.warpAffine(img, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        assert_close_u8(pp.warp_affine(img, m, size, fixed_point=legacy), ref, 1, 1e-3, f"random warp {k}")


def test_warp_exact_cases_without_cv2():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for fixed in (False, True):
        same = pp.warp_affine(img, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (30, 20), fixed_point=fixed)
        assert_close_u8(same, img, 0, 0.0, f"identity warp (fixed_point={fixed})")
        shifted = pp.warp_affine(img, np.array([[1.0, 0, 3], [0, 1.0, -2]]), (30, 20), fixed_point=fixed)
        expected = np.zeros_like(img)
        expected[:18, 3:] = img[2:, :27]  # dst(x, y) = src(x - 3, y + 2); outside reads the 0 border
        assert_close_u8(shifted, expected, 0, 0.0, f"integer translation (fixed_point={fixed})")
        half = pp.warp_affine(img, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), (30, 20), fixed_point=fixed)
        mean2 = (img[:, :-1].astype(np.int64) + img[:, 1:]) / 2  # half-pixel shift = average of neighbours
        assert_close_u8(half[:, :29], np.rint(mean2), 1, 0.5, f"half-pixel shift (fixed_point={fixed})")


def test_fixed_point_kernel_close_to_float_kernel():
    yy, xx = np.mgrid[0:120, 0:160]
    img = np.stack([xx, yy, (xx + yy) // 2], axis=2).astype(np.uint8)  # smooth: 1 gray level per pixel
    m = pp.get_affine_transform(np.array([80.3, 60.1]), np.array([0.4, 0.4]), 17.0, (224, 224))  # inside
    a = pp.warp_affine(img, m, 224)
    b = pp.warp_affine(img, m, 224, fixed_point=True)
    assert_close_u8(a, b, 1, 0.1, "fixed-point vs float kernel on a smooth image")


# ------------------------------------------------------------------------------ coordinates and boxes
def test_crop_image_round_trip():
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(50):
        center = rng.uniform(0, 640, 2).astype(np.float32)
        scale = np.full(2, rng.uniform(0.05, 3), dtype=np.float32)
        pts = rng.uniform(-100, 800, (17, 2))
        back = pp.crop_to_image(pp.image_to_crop(pts, center, scale, 224), center, scale, 224)
        worst = max(worst, float(np.abs(back - pts).max()))
        mid = pp.image_to_crop(center[None].astype(np.float64), center, scale, 224)
        assert np.abs(mid - 112).max() <= 1e-3, f"box centre maps to {mid}, expected (112, 112) tol 1e-3"
    print(f"round trip max abs error {worst:.3e} px")
    assert worst <= 1e-3, f"round trip max abs error {worst:.3e} px > tol 1e-3"


def test_crop_to_image_matches_locllm_transform_preds(cv2):
    rng = np.random.default_rng(4)
    center, scale = np.float32([320.5, 211.25]), np.float32([1.37, 1.37])
    pts = rng.uniform(0, 224, (17, 2))
    ref_m = ref_affine(cv2, center, scale, 0, 224, inv=True)
    ref = np.array([ref_m @ np.array([x, y, 1.0]) for x, y in pts])
    d = float(np.abs(pp.crop_to_image(pts, center, scale, 224) - ref).max())
    print(f"crop_to_image vs transform_preds max abs diff {d:.3e} px")
    assert d <= 1e-6, f"max abs diff {d:.3e} px > tol 1e-6"


def test_sanitize_and_center_scale_match_locllm():
    rng = np.random.default_rng(5)
    for _ in range(500):
        box = [float(v) for v in np.round(rng.uniform(-60, 700, 4) * rng.choice([1, 0.01], 4), 2)]
        ref = ref_sanitize(box, 640, 480)
        ours = pp.sanitize_box(box, 640, 480)
        assert (ours is None) == (ref is None), f"box {box}: ours {ours}, LocLLM {ref}"
        if ref is not None:
            assert ours == tuple(float(v) for v in ref), f"box {box}: ours {ours} != LocLLM {ref} (exact)"
            c, s = pp.box_to_center_scale(ours)
            rc, rs = ref_center_scale(ref)
            assert c.dtype == s.dtype == np.float32
            assert np.array_equal(c, rc) and np.array_equal(s, rs), f"box {box}: {c},{s} != {rc},{rs} (exact)"
    assert pp.sanitize_box([math.nan, 0, 10, 10], 640, 480) is None  # np.max propagates NaN: dropped


@pytest.mark.parametrize("box", [
    (10, 10, 0, 50), (10, 10, 50, -1), (math.nan, 10, 50, 50), (10, 10, math.inf, 50),
    (700, 10, 50, 50), (-80, 10, 50, 50), (10, 500, 50, 50), (10, -90, 50, 80), (1, 2, 3),
])
def test_validate_box_rejects_bad_boxes(box):
    with pytest.raises(InputError, match=re.escape(repr(tuple(box)))):
        pp.validate_box(box, 640, 480)
    with pytest.raises(InputError):
        pp.crop_person(np.zeros((480, 640, 3), np.uint8), box)


def test_validate_box_clips_partly_outside_box():
    assert pp.validate_box([-10, -5, 100, 60], 640, 480) == (0.0, 0.0, 99.0, 59.0)
    assert pp.validate_box([600, 400, 100, 100], 640, 480) == (600.0, 400.0, 39.0, 79.0)


# ------------------------------------------------------------------------------------- image reading
def _mode_image(mode: str) -> Image.Image:
    if mode in ("I;16", "I"):
        arr = np.array([[0x1234, 0xFFFF, 0x00FF, 300]], dtype=np.uint16 if mode == "I;16" else np.int32)
        im = Image.fromarray(arr)
        assert im.mode == mode, f"test setup: fromarray gave mode {im.mode}, wanted {mode}"
        return im
    base = Image.fromarray(np.array([[[10, 200, 30], [255, 0, 128], [0, 0, 0], [90, 90, 90]]], np.uint8))
    return base.convert(mode)


@pytest.mark.parametrize("mode,suffix", [
    ("L", ".png"), ("LA", ".png"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("CMYK", ".tif"),
    ("I;16", ".png"), ("I", ".tif"), ("1", ".png"), ("RGB", ".png"),
])
def test_load_image_modes(tmp_path, mode, suffix):
    im = _mode_image(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}{suffix}"
    im.save(path)
    out = image_io.load_image(path)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3), f"{mode}: got {out.dtype} {out.shape}"
    with Image.open(path) as reread:
        if mode in ("I;16", "I"):  # 16-bit: high byte, not clipped at 255
            expected = np.repeat((np.asarray(reread).astype(np.int64) >> 8)[:, :, None], 3, axis=2)
            assert out[0, :, 0].tolist() == [0x12, 0xFF, 0x00, 0x01]
        elif mode == "1":
            expected = np.repeat((np.asarray(reread).astype(np.uint8) * 255)[:, :, None], 3, axis=2)
        elif mode in ("L", "LA"):
            expected = np.repeat(np.asarray(reread)[..., :1] if mode == "LA" else np.asarray(reread)[..., None], 3, 2)
        else:
            expected = np.asarray(reread.convert("RGBA" if mode == "RGBA" else "RGB"))[:, :, :3]
    assert_close_u8(out, expected, 0, 0.0, f"mode {mode}{suffix}")


def test_ensure_rgb_arrays():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for arr in (g, g[:, :, None], np.stack([g] * 3, 2), np.stack([g] * 4, 2)):
        out = image_io.ensure_rgb(arr)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and np.array_equal(out[:, :, 1], g)
    assert image_io.ensure_rgb(np.full((2, 2, 3), 0xABCD, np.uint16))[0, 0].tolist() == [0xAB] * 3
    for bad in (np.zeros((2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), np.zeros((0, 2, 3), np.uint8)):
        with pytest.raises(InputError):
            image_io.ensure_rgb(bad)


def test_unreadable_files_are_named(tmp_path):
    text = tmp_path / "not_an_image.jpg"
    text.write_text("hello")
    missing = tmp_path / "missing.png"
    truncated = tmp_path / "truncated.jpg"
    buf = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buf)
    truncated.write_bytes(buf.read_bytes()[:400])
    for path in (text, missing, truncated):
        with pytest.raises(InputError, match=re.escape(str(path))):
            image_io.load_image(path)


# --------------------------------------------------------------------------------------------- tensors
def test_normalize_and_crop_persons():
    rng = np.random.default_rng(6)
    crop = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for mean, std in ((pp.CLIP_MEAN, pp.CLIP_STD), (pp.DINO_MEAN, pp.DINO_STD)):
        d = np.abs(pp.normalize(crop, mean, std) - ref_normalize(crop, mean, std)).max()
        assert d <= 1e-6, f"normalize max abs diff {d:.3e} > tol 1e-6"
    image = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    spec = pp.CropSpec(crop_size=32, mean=pp.DINO_MEAN, std=pp.DINO_STD)
    batch, crops = pp.crop_persons(image, [(5, 5, 40, 80), (-10, 30, 60, 50)], spec)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32 and len(crops) == 2
    assert crops[1].box == (0.0, 30.0, 59.0, 49.0) and np.array_equal(batch[0], crops[0].pixel_values)
    empty, none = pp.crop_persons(image, [], spec)
    assert empty.shape == (0, 3, 32, 32) and none == []
    with pytest.raises(InputError):
        pp.CropSpec(crop_size=0)


def test_runtime_modules_import_no_cv2_or_torch():
    code = ("import sys; import runtime.preprocess, runtime.image_io, runtime.coco, runtime.errors; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cv2', 'torch', 'torchvision', 'pycocotools'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"the import probe failed (exit {out.returncode}): {out.stderr[-2000:]}"
    assert out.stdout.strip() == "[]", f"runtime imported heavy modules: {out.stdout} {out.stderr}"
