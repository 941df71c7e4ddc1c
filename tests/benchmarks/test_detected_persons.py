"""eval --detections: detector boxes, HRNet/mmpose rescoring and OKS-NMS; bench --video: interleaved decodings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.detected_persons import detected_records, oks_nms, rescore_and_nms
from runtime.errors import InputError


def test_oks_nms_drops_duplicates_keeps_distinct():
    a = np.zeros((17, 3))
    a[:, 0], a[:, 1] = np.arange(17) * 5, np.arange(17) * 3
    near, far = a + [0.5, 0.5, 0], a + [60, 0, 0]
    keep = oks_nms([a, near, far], np.array([0.5, 0.9, 0.4]), np.full(3, 100.0 ** 2), 0.9)
    assert keep == [1, 2]  # the best of the duplicate pair, and the distinct person


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
    from training.data.synthetic import SyntheticConfig, generate_dataset
    root = generate_dataset(SyntheticConfig(num_images=2, seed=3, max_persons=2), tmp_path_factory.mktemp("d"))
    return root / "person_keypoints.json", root / "images"


def test_detected_records_and_rescoring(small_coco, tmp_path):
    ann, _ = small_coco
    gt = json.loads(ann.read_text())
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.8} for a in gt["annotations"]]
    dets.append({**dets[0], "score": 0.01})
    f = tmp_path / "dets.json"
    f.write_text(json.dumps(dets))
    by_image, scores, ids = detected_records(ann, f, score_threshold=0.1)
    assert sum(len(v) for v in by_image.values()) == len(gt["annotations"]) == len(scores)
    assert ids == [i["id"] for i in gt["images"]]
    records = [r for v in by_image.values() for r in v]
    preds = [{"image_id": r.image_id, "category_id": 1, "score": 0.0,
              "keypoints": [v for k in range(17) for v in (r.box[0] + k, r.box[1] + k, 0.1 if k else 0.5)]}
             for r in records]
    out = rescore_and_nms(preds, records, scores)
    assert out[0]["score"] == pytest.approx(0.5 * 0.8)  # only the keypoint above 0.2 counts, × the box score
    f.write_text(json.dumps(dets + [{**dets[0], "image_id": 999}]))
    with pytest.raises(InputError, match=r"not in person_keypoints.json's images \(999\)"):
        detected_records(ann, f)


def test_eval_with_detections(small_coco, tiny_checkpoint, tiny_bundle, tmp_path):
    from benchmarks.evaluate import EvalConfig, evaluate
    ann, images = small_coco
    gt = json.loads(ann.read_text())
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    report = evaluate(EvalConfig(tiny_checkpoint, (tiny_bundle,), images, coco=ann, precisions=("fp32",),
                                 decodings=("template",), detections=tmp_path / "dets.json", det_score=0.5))
    (v,) = report["variants"]
    print(f"detections: reference AP {report['reference']['AP']}, fp32-template AP {v['AP']}, token agreement "
          f"{v['token_agreement']}")
    assert report["boxes"]["nms"] == "OKS-NMS 0.9" and 0.0 <= v["AP"] <= 100.0 and v["token_agreement"] is not None


def test_video_bench_interleaves_identical_decodings(tiny_bundle, tmp_path):
    pytest.importorskip("av", reason="PyAV not installed (pip install 'posellm-edge[video]')")
    from benchmarks.video_bench import VideoBenchConfig, video_benchmark
    from training.data.video import VideoConfig, generate_video
    root = generate_video(VideoConfig(seconds=0.6, fps=5, size=(160, 120)), tmp_path / "v")
    report = video_benchmark(VideoBenchConfig((tiny_bundle,), video=root / "video.mp4",
                                              detections=root / "detections.json", warmup=1,
                                              out=tmp_path / "vb.json"))
    assert report["identical"] and report["compared_keypoints"] == 17 * 3
    assert [r["decoding"] for r in report["results"]] == ["template", "speculative"]
    assert report["results"][0]["passes_per_person"] == 6.0
    assert json.loads((tmp_path / "vb.json").read_text())["frames"] == 3
