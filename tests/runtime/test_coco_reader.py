"""COCO GT reader vs LocLLM's instance filtering (pycocotools + numpy sanitation, when available)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
try:
    import runtime  # noqa: F401
except ImportError:  # a plain checkout without an install: make the repo root importable
    sys.path.insert(0, str(REPO))

from runtime.coco import read_coco_persons  # noqa: E402
from runtime.errors import InputError  # noqa: E402

KPTS = [10, 20, 2] + [0, 0, 0] * 16  # one labelled keypoint


@pytest.fixture(scope="module")
def coco_mini_ann() -> Path:
    ann = COCO_MINI / "person_keypoints.json"
    if not ann.is_file():
        pytest.skip(f"shared coco-mini data not found at {COCO_MINI} (expected ../shared beside the repo)")
    return ann


def locllm_instances(ann_path: Path) -> list[dict]:
    """LocLLM COCODataset.__init__ instance list, through pycocotools as LocLLM reads it."""
    coco_mod = pytest.importorskip("pycocotools.coco", reason="pycocotools is the reference reader")
    coco = coco_mod.COCO(str(ann_path))
    out = []
    for image_id in coco.getImgIds():
        im = coco.loadImgs(image_id)[0]
        for obj in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False)):
            x, y, w, h = obj["bbox"]
            x1, y1 = np.max((0, x)), np.max((0, y))
            x2 = np.min((im["width"] - 1, x1 + np.max((0, w - 1))))
            y2 = np.min((im["height"] - 1, y1 + np.max((0, h - 1))))
            if not (obj["area"] > 0 and x2 >= x1 and y2 >= y1) or obj["category_id"] != 1:
                continue
            if max(obj["keypoints"]) == 0:
                continue
            bw, bh = x2 - x1, y2 - y1
            center = np.array([x1 + bw * 0.5, y1 + bh * 0.5], dtype=np.float32)
            side = max(bw, bh)
            scale = np.array([side / 200, side / 200], dtype=np.float32)
            out.append(dict(ann_id=obj["id"], image_id=image_id, box=(x1, y1, bw, bh), center=center,
                            scale=scale, kpts=np.array(obj["keypoints"], np.float32).reshape(17, 3)))
    return out


def test_coco_mini_keeps_the_12_keypoint_instances(coco_mini_ann):
    data = json.loads(coco_mini_ann.read_text())
    expected = [a["id"] for im in data["images"] for a in data["annotations"]
                if a["image_id"] == im["id"] and max(a["keypoints"]) > 0]
    records = read_coco_persons(coco_mini_ann)
    assert len(records) == 12, f"expected 12 instances with keypoints, got {len(records)}"
    assert [r.ann_id for r in records] == expected
    for r in records:
        assert r.keypoints.shape == (17, 3) and r.keypoints.dtype == np.float32
        assert r.center.dtype == np.float32 and r.scale.dtype == np.float32
        assert (COCO_MINI / "images" / r.file_name).is_file()


def test_coco_mini_matches_locllm_reader(coco_mini_ann):
    ref = locllm_instances(coco_mini_ann)
    records = read_coco_persons(coco_mini_ann)
    assert [(r.image_id, r.ann_id) for r in records] == [(d["image_id"], d["ann_id"]) for d in ref]
    worst = 0.0
    for r, d in zip(records, ref, strict=True):
        assert r.box == tuple(float(v) for v in d["box"]), f"ann {r.ann_id}: box {r.box} != {d['box']} (exact)"
        worst = max(worst, float(np.abs(r.center - d["center"]).max()), float(np.abs(r.scale - d["scale"]).max()))
        assert np.array_equal(r.keypoints, d["kpts"])
    print(f"center/scale max abs diff vs LocLLM: {worst}")
    assert worst == 0.0, f"center/scale max abs diff {worst} (tol 0: bit-exact float32)"


def test_records_crop_like_crop_person(coco_mini_ann):
    from runtime import image_io
    from runtime import preprocess as pp

    for r in read_coco_persons(coco_mini_ann)[:4]:
        image = image_io.load_image(COCO_MINI / "images" / r.file_name)
        crop = pp.crop_person(image, r.raw_box)
        assert crop.box == r.box and np.array_equal(crop.center, r.center) and np.array_equal(crop.scale, r.scale)
        d = np.abs(crop.pixel_values - pp.crop_at_center_scale(image, r.center, r.scale, pp.CropSpec())).max()
        assert d == 0.0, f"ann {r.ann_id}: crop_at_center_scale differs by {d} (tol 0)"
        assert pp.sanitize_box(r.box, r.width, r.height) != r.box  # sanitising twice shrinks the box


def _write(tmp_path: Path, data: object, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _ann(ann_id, image_id, bbox, **kw):
    base = dict(id=ann_id, image_id=image_id, bbox=bbox, area=100.0, iscrowd=0, category_id=1, keypoints=KPTS)
    base.update(kw)
    return base


def synthetic() -> dict:
    return {
        "images": [  # image 2 listed first: records follow the images' order, then the annotations'
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
            {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
        ],
        "annotations": [
            _ann(10, 1, [10, 20, 50, 100]),  # kept
            _ann(11, 1, [10, 20, 50, 100], iscrowd=1),  # crowd
            _ann(12, 1, [10, 20, 50, 100], keypoints=[0] * 51),  # no labelled keypoint
            {k: v for k, v in _ann(13, 1, [10, 20, 50, 100], category_id=2).items() if k != "keypoints"},
            _ann(14, 1, [700, 20, 50, 100]),  # box right of the image: x2 < x1
            _ann(15, 1, [10, 20, 50, 100], area=0),  # area 0
            _ann(16, 2, [-5.5, 60.25, 200, 40]),  # partly outside: clipped
            _ann(17, 3, [10, 20, 50, 100]),  # image 3 is not listed: ignored
            _ann(18, 1, [600, 470, 0.5, 0.5]),  # sub-pixel box: w, h -> 0 but kept (LocLLM keeps it)
        ],
    }


def test_synthetic_filtering(tmp_path):
    records = read_coco_persons(_write(tmp_path, synthetic()))
    assert [r.ann_id for r in records] == [16, 10, 18]
    clipped = records[0]
    assert (clipped.file_name, clipped.width, clipped.height) == ("b.jpg", 100, 80)
    assert clipped.box == (0.0, 60.25, 99.0, 18.75), clipped.box  # y2 = min(H - 1, 60.25 + 39)
    assert clipped.center.tolist() == [49.5, 69.625] and clipped.scale.tolist() == [
        float(np.float32(99 / 200))] * 2
    assert records[1].box == (10.0, 20.0, 49.0, 99.0)
    assert records[2].box == (600.0, 470.0, 0.0, 0.0)
    assert records[1].keypoints[0].tolist() == [10.0, 20.0, 2.0] and records[1].area == 100.0
    assert clipped.raw_box == (-5.5, 60.25, 200.0, 40.0)


def test_synthetic_matches_locllm_reader(tmp_path):
    path = _write(tmp_path, synthetic())
    ref = locllm_instances(path)
    records = read_coco_persons(path)
    assert [r.ann_id for r in records] == [d["ann_id"] for d in ref]
    for r, d in zip(records, ref, strict=True):
        assert r.box == tuple(float(v) for v in d["box"])
        assert np.array_equal(r.center, d["center"]) and np.array_equal(r.scale, d["scale"])


@pytest.mark.parametrize("content,pattern", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"images": []}, "'annotations'"),
    ({"images": [{"id": 1, "width": 5, "height": 5}], "annotations": []}, "'file_name'"),
    ({"images": [{"id": 1, "file_name": "a", "width": 9, "height": 9}],
      "annotations": [{k: v for k, v in _ann(7, 1, [0, 0, 5, 5]).items() if k != "iscrowd"}]}, "'iscrowd'"),
    ({"images": [{"id": 1, "file_name": "a", "width": 9, "height": 9}],
      "annotations": [_ann(7, 1, [0, 0, 5, 5], keypoints=[1, 2, 3])]}, "51 keypoint values"),
    ({"images": [{"id": 1, "file_name": "a", "width": 9, "height": 9}],
      "annotations": [_ann(7, 1, [0, 0, 5])]}, "bbox"),
])
def test_errors_name_the_file_and_problem(tmp_path, content, pattern):
    path = tmp_path / "bad.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=re.escape(str(path)) + ".*" + re.escape(pattern)):
        read_coco_persons(path)
