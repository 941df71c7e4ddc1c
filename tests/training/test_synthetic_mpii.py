"""The synthetic MPII-format set and the nested-folder (Human-Art style) COCO set; COCO output unchanged."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from runtime.coco import read_coco_persons
from runtime.errors import InputError
from training.data.synthetic import ANNOTATION_FILE, SyntheticConfig, build_coco, generate_dataset

# build_coco(SyntheticConfig(num_images=5, seed=7, background="texture")) before MPII support was added: the MPII
# landmarks are computed without a random draw, so every COCO set stays byte-identical
COCO_SHA256 = "df939cecf73b113f0a709a5de297d097b69206a0d688714db8cda4c8b2caa2eb"


def test_coco_sets_are_byte_identical_to_before():
    coco = build_coco(SyntheticConfig(num_images=5, seed=7, background="texture"))
    assert hashlib.sha256(json.dumps(coco, separators=(",", ":")).encode()).hexdigest() == COCO_SHA256


def test_mpii_set_layout_joints_and_head_boxes(tmp_path):
    pytest.importorskip("scipy", reason="gt_valid.mat is written with scipy (the [bench] extra)")
    from benchmarks.mpii_data import read_gt_valid, read_mpii_persons
    from runtime.preprocess import image_to_crop
    from training.data.mpii import generate_mpii
    cfg = SyntheticConfig(num_images=8, seed=4, background="plain", truncation_prob=0.0)
    out = generate_mpii(cfg, tmp_path / "mpii")
    persons = read_mpii_persons(out / "annot" / "valid.json")
    gt = read_gt_valid(out / "annot" / "gt_valid.mat", len(persons))
    assert len(persons) >= cfg.num_images and gt.count == len(persons)
    raw = json.loads((out / "annot" / "valid.json").read_text())
    for p, entry in zip(persons, raw):
        assert (out / "images" / p.file_name).is_file()
        np.testing.assert_allclose(gt.pos_gt[:, :, p.ins_id], np.asarray(entry["joints"]), atol=0)
        assert list(1 - gt.visible[:, p.ins_id]) == [1 - v for v in entry["joints_vis"]]
        (x1, y1), (x2, y2) = gt.headboxes[:, :, p.ins_id]
        top, neck = gt.pos_gt[9, :, p.ins_id], gt.pos_gt[8, :, p.ins_id]
        assert x1 < x2 and y1 < y2 and 0.5 * (y2 - y1) < np.linalg.norm(top - neck) < 2.0 * (y2 - y1)
        # LocLLM's crop (centre lowered by 15·scale, × 1.25) holds every joint of an untruncated figure
        crop = image_to_crop(p.joints[p.joints_vis > 0], p.center, p.scale, 224)
        assert np.all((crop >= 0) & (crop < 224)), crop


def test_nested_coco_set_is_read_with_its_sub_directories(tmp_path):
    out = generate_dataset(SyntheticConfig(num_images=4, seed=2), tmp_path / "art", nested=True)
    records = read_coco_persons(out / ANNOTATION_FILE)
    assert records and all("/" in r.file_name for r in records)
    assert all((out / "images" / r.file_name).is_file() for r in records)
    data = json.loads((out / ANNOTATION_FILE).read_text())
    for bad in ("../outside.jpg", "/abs/x.jpg", "images/../../x.jpg"):
        data["images"][0]["file_name"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(InputError) as e:
            read_coco_persons(tmp_path / "bad.json")
        assert bad in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_nested_set_through_eval_run_and_pycocotools(tmp_path):
    """Human-Art flow without a model: images found in their sub-folders, extra fields ignored by the scorer."""
    pytest.importorskip("pycocotools", reason="COCO AP needs pycocotools (the [bench] extra)")
    from benchmarks.evaluate import CocoBenchmark, persons_by_image, run_variant
    from runtime.results import PersonResult

    class Oracle:  # answers every person with its ground truth
        def estimate_records(self, image, records):
            assert image.ndim == 3
            return [PersonResult(box=r.box, names=(), keypoints=np.c_[r.keypoints[:, :2], np.ones(17)], score=1.0,
                                 answers=(), flags=()) for r in records]

    out = generate_dataset(SyntheticConfig(num_images=3, seed=5), tmp_path / "art", nested=True)
    bench = CocoBenchmark(out / ANNOTATION_FILE, persons_by_image(out / ANNOTATION_FILE))
    run = run_variant("oracle", Oracle(), bench.by_image(), out / "images")
    ap = bench.metrics(run.predictions)["AP"]
    print(f"oracle AP on the nested set: {ap}")
    assert ap == 100.0
