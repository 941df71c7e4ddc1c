"""MPII PCKh (LocLLM's scorer) against hand-computed cases, LocLLM's crop transform, and bad MPII inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("scipy", reason="MPII's gt_valid.mat is read with scipy (the [bench] extra)")

from benchmarks.mpii_data import MpiiGroundTruth, locllm_center_scale, read_gt_valid, read_mpii_persons  # noqa: E402
from benchmarks.mpii_eval import predictions_array  # noqa: E402
from benchmarks.pckh import MEAN_AT_01_INDEX, THRESHOLDS, pckh_table  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from training.data.mpii import write_gt_valid  # noqa: E402

TOL = 1e-4  # the table rounds to 4 decimals (0.5e-4); the arithmetic itself is exact here


def _gt(n: int = 2) -> MpiiGroundTruth:
    """n persons, every joint at (101, 201) 1-based, head box 30×40 → diagonal 50, head size 0.6·50 = 30 px."""
    pos = np.zeros((16, 2, n))
    pos[:, 0], pos[:, 1] = 101.0, 201.0
    heads = np.zeros((2, 2, n))
    heads[1, 0], heads[1, 1] = 30.0, 40.0
    return MpiiGroundTruth(pos_gt=pos, visible=np.ones((16, n)), headboxes=heads)


def _pred(n: int = 2) -> np.ndarray:
    """Predictions exactly on the GT (0-based: GT - 1)."""
    p = np.zeros((n, 16, 2))
    p[..., 0], p[..., 1] = 100.0, 200.0
    return p


def test_perfect_predictions_score_100():
    t = pckh_table(_pred(), _gt())
    assert all(abs(v - 100.0) < TOL for v in t["PCKh"].values()), t["PCKh"]


def test_a_joint_exactly_at_the_threshold_counts_and_just_beyond_does_not():
    pred = _pred()
    pred[0, 0, 0] += 15.0  # right ankle of person 0: 15 px = 0.5 × 30 px head size → counted (≤)
    pred[1, 0, 0] += 15.01  # person 1: just beyond → missed
    t = pckh_table(pred, _gt())
    assert abs(t["PCKh_per_joint"][0] - 50.0) < TOL
    assert abs(t["PCKh"]["Ankle"] - 0.5 * (100.0 + 50.0)) < TOL
    # Mean over the 12 COCO joints (2 persons each): 23 of 24 correct
    assert abs(t["PCKh"]["Mean"] - 100.0 * 23 / 24) < TOL


def test_an_invisible_joint_is_not_counted():
    gt = _gt()
    gt.visible[13, 1] = 0  # left shoulder of person 1 missing
    pred = _pred()
    pred[1, 13] += 1000.0  # far off, but not visible: ignored
    pred[0, 12, 1] += 100.0  # right shoulder of person 0 wrong
    t = pckh_table(pred, gt)
    assert t["joint_counts"][13] == 1 and abs(t["PCKh_per_joint"][13] - 100.0) < TOL
    assert abs(t["PCKh"]["Shoulder"] - 0.5 * (100.0 + 50.0)) < TOL
    # counts: 11 joints × 2 + 1 = 23 visible COCO joints, 1 wrong
    assert abs(t["PCKh"]["Mean"] - 100.0 * 22 / 23) < TOL


def test_masked_joints_stay_out_of_mean_and_are_the_zero_shot_columns():
    pred = _pred()
    pred[:, 6:10] += 500.0  # pelvis, thorax, neck, head top all wrong
    t = pckh_table(pred, _gt())
    assert abs(t["PCKh"]["Mean"] - 100.0) < TOL and abs(t["PCKh"]["Mean@0.1"] - 100.0) < TOL
    for col in ("Pelvis", "Thorax", "Neck", "Head top", "Zero-shot mean"):
        assert abs(t["PCKh"][col]) < TOL, col


def test_mean_at_01_is_read_at_threshold_011_like_locllm():
    assert abs(THRESHOLDS[MEAN_AT_01_INDEX] - 0.11) < 1e-12
    pred = _pred()
    pred[:, :, 0] += 0.105 * 30.0  # every joint 0.105 head sizes off: beyond 0.1, within 0.11
    t = pckh_table(pred, _gt())
    assert abs(t["PCKh"]["Mean@0.1"] - 100.0) < TOL
    pred[:, :, 0] += 0.01 * 30.0  # 0.115: beyond 0.11
    assert abs(pckh_table(pred, _gt())["PCKh"]["Mean@0.1"]) < TOL


def test_mean_weights_joints_by_visible_count():
    gt = _gt(4)
    gt.visible[0, :3] = 0  # right ankle visible once, wrong there
    pred = _pred(4)
    pred[3, 0] += 100.0
    t = pckh_table(pred, gt)
    visible = 4 * 12 - 3
    assert abs(t["PCKh"]["Mean"] - 100.0 * (visible - 1) / visible) < TOL


def test_the_crop_is_locllms_center_scale_transform():
    c, s = locllm_center_scale([594.0, 257.0], 3.021046)
    s32 = np.float32(3.021046)
    expect_c = np.array([594.0, np.float32(257.0) + 15 * s32], np.float32) - 1
    assert c.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_array_equal(c, expect_c)
    np.testing.assert_array_equal(s, np.array([s32, s32], np.float32) * 1.25)
    print(f"centre {c.tolist()}, scale {s.tolist()} (exact float32)")


def _files(tmp_path, entries, n=None):
    (tmp_path / "valid.json").write_text(json.dumps(entries))
    gt = _gt(len(entries) if n is None else n)
    write_gt_valid(tmp_path / "gt.mat", gt.pos_gt, 1 - gt.visible, gt.headboxes)
    return tmp_path / "valid.json", tmp_path / "gt.mat"


def _entry(**kw):
    e = {"image": "a.jpg", "center": [101.0, 201.0], "scale": 1.0, "joints": [[101.0, 201.0]] * 16,
         "joints_vis": [1] * 16}
    e.update(kw)
    return e


def test_reader_and_mat_round_trip(tmp_path):
    valid, mat = _files(tmp_path, [_entry(), _entry(image="sub/b.jpg")])
    persons = read_mpii_persons(valid)
    gt = read_gt_valid(mat, len(persons))
    assert [p.ins_id for p in persons] == [0, 1] and persons[1].file_name == "sub/b.jpg"
    np.testing.assert_array_equal(persons[0].joints, np.full((16, 2), [100.0, 200.0], np.float32))
    preds = [{"ins_id": i, "score": 1.0, "keypoints": np.c_[p.joints, np.ones(16)].reshape(-1).tolist()}
             for i, p in enumerate(persons)]
    assert pckh_table(predictions_array(preds, gt.count), gt)["PCKh"]["Mean"] == 100.0


@pytest.mark.parametrize("entry, message", [
    (_entry(joints=[[1.0, 1.0]] * 15, joints_vis=[1] * 15), "15 joints"),
    (_entry(center=[-1, -1]), "centre [-1, -1]"),
    (_entry(scale=0), "scale 0"),
    (_entry(image="../x.jpg"), "'..'"),
    (_entry(image="/etc/x.jpg"), "absolute"),
])
def test_bad_valid_json_gives_one_line(tmp_path, entry, message):
    (tmp_path / "valid.json").write_text(json.dumps([entry]))
    with pytest.raises(InputError) as e:
        read_mpii_persons(tmp_path / "valid.json")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_mat_files_give_one_line(tmp_path):
    valid, mat = _files(tmp_path, [_entry()], n=3)
    with pytest.raises(InputError, match="has 3 persons but the MPII annotation file has 1"):
        read_gt_valid(mat, 1)
    with pytest.raises(InputError, match="does not exist"):
        read_gt_valid(tmp_path / "missing.mat", 1)
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(InputError, match="junk.mat"):
        read_gt_valid(tmp_path / "junk.mat", 1)
    gt = _gt(1)
    write_gt_valid(tmp_path / "order.mat", gt.pos_gt, 1 - gt.visible, gt.headboxes,
                   joints=("lank", "rkne", *("x",) * 14))
    with pytest.raises(InputError, match="dataset_joints"):
        read_gt_valid(tmp_path / "order.mat", 1)
    from scipy.io import savemat
    savemat(tmp_path / "partial.mat", {"pos_gt_src": gt.pos_gt})
    with pytest.raises(InputError, match="lacks.*jnt_missing"):
        read_gt_valid(tmp_path / "partial.mat", 1)


def test_predictions_must_cover_every_person_once():
    with pytest.raises(InputError, match="1 of 2 persons have no prediction"):
        predictions_array([{"ins_id": 0, "score": 1.0, "keypoints": [0.0] * 48}], 2)
    with pytest.raises(InputError, match="ins_id 5"):
        predictions_array([{"ins_id": 5, "score": 1.0, "keypoints": [0.0] * 48}], 2)
