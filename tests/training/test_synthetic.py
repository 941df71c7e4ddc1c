"""Tests for the procedural synthetic COCO person-keypoint generator."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from training.data import figure as F
from training.data.synthetic import (ANNOTATION_FILE, SyntheticConfig, generate_dataset, main,
                                    render_image)


def _load(d):
    return json.loads((d / ANNOTATION_FILE).read_text())


def test_same_seed_is_identical_and_other_seed_differs(tmp_path):
    cfg = SyntheticConfig(num_images=6, seed=11)
    a, b = generate_dataset(cfg, tmp_path / "a"), generate_dataset(cfg, tmp_path / "b")
    assert (a / ANNOTATION_FILE).read_bytes() == (b / ANNOTATION_FILE).read_bytes()
    names = sorted(p.name for p in (a / "images").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (b / "images").iterdir())
    for n in names:
        assert (a / "images" / n).read_bytes() == (b / "images" / n).read_bytes()
    # In-memory rendering gives the same pixels as on-disk generation (before JPEG).
    img1, anns1 = render_image(cfg, 3)
    img2, anns2 = render_image(cfg, 3)
    assert np.array_equal(np.asarray(img1), np.asarray(img2)) and anns1 == anns2

    c = generate_dataset(SyntheticConfig(num_images=6, seed=12), tmp_path / "c")
    assert _load(c)["annotations"] != _load(a)["annotations"]
    assert any((a / "images" / n).read_bytes() != (c / "images" / n).read_bytes() for n in names)


def test_annotation_invariants():
    cfg = SyntheticConfig(num_images=40, seed=3, min_persons=1, max_persons=4, occluder_prob=0.5,
                          truncation_prob=0.4, background="mixed")
    seen_v = set()
    for i in range(cfg.num_images):
        img, anns = render_image(cfg, i)
        w, h = img.size
        assert img.mode == "RGB" and (w, h) == (320, 320)
        assert cfg.min_persons <= len(anns) <= cfg.max_persons
        for a in anns:
            assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["area"] > 0
            x, y, bw, bh = a["bbox"]
            assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
            k = np.asarray(a["keypoints"], float).reshape(17, 3)
            v = k[:, 2]
            seen_v |= set(v.tolist())
            assert set(v.tolist()) <= {0, 1, 2}
            assert a["num_keypoints"] == int((v > 0).sum()) > 0
            assert np.all(k[v == 0, :2] == 0)
            lab = k[v > 0, :2]
            assert np.all((lab >= 0) & (lab <= [w - 1, h - 1]))
            assert np.all((lab >= [x, y]) & (lab <= [x + bw, y + bh]))
    assert seen_v == {0, 1, 2}


def test_coco_format_and_gt_as_prediction_ap_is_one(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = generate_dataset(SyntheticConfig(num_images=10, seed=7), tmp_path / "ds")
    data = _load(out)
    cat = data["categories"][0]
    assert cat["name"] == "person" and cat["keypoints"] == list(F.KEYPOINT_NAMES)
    assert len(cat["skeleton"]) == 19
    for im in data["images"]:
        with Image.open(out / "images" / im["file_name"]) as pil:
            assert pil.size == (im["width"], im["height"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / ANNOTATION_FILE))
        preds = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
                 for a in data["annotations"]]
        ev = COCOeval(gt, gt.loadRes(preds), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert len(data["annotations"]) >= 10
    assert ev.stats[0] == pytest.approx(1.0)


def test_left_side_is_lighter_than_right():
    rng = np.random.default_rng(0)
    for _ in range(5):
        fills = {part: fill for _, part, fill, _ in F.sample_figure(rng).prims}
        for left, right in ((F.L_UARM, F.R_UARM), (F.L_THIGH, F.R_THIGH), (F.L_FOOT, F.R_FOOT)):
            assert sum(fills[left]) > sum(fills[right])


def test_overwrite_is_atomic_and_cli(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--out", str(out), "--num-images", "2", "--seed", "1", "--background", "texture",
                     "--preview", str(tmp_path / "preview.png")]) == 0
    assert not (out / "stale.txt").exists()
    assert len(list((out / "images").iterdir())) == 2 and len(_load(out)["images"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "preview.png"]  # no temp dirs left


def test_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig(num_images=1, seed=0, min_persons=3, max_persons=2)
    with pytest.raises(ValueError):
        SyntheticConfig(num_images=1, seed=0, background="video")
