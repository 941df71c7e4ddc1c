"""Top-down COCO evaluation on a detector's boxes instead of the ground-truth ones (`eval --detections`).

What HRNet's `lib/dataset/coco.py` and mmpose's `TopDownCocoDataset` do, with their defaults:
- read the COCO results file (`bbox_file`), keep category 1 with score >= `det_bbox_thr` (default 0.0 here as
  there; the main job's synthetic detections use 0.5 to drop their spurious boxes);
- crop each box with LocLLM's rule (`_xywh2cs`: the box made square, no padding, as for GT boxes);
- rescore: instance score = (mean of the keypoint scores above `vis_thr` = 0.2) × the box's score;
- OKS-NMS per image at `nms_thr` = 0.9 (greedy, COCO's sigmas, the area of the crop's scale × 200²), not soft-NMS.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from runtime.coco import NUM_KEYPOINTS, PersonRecord
from runtime.detections import check_image_ids, read_detections
from runtime.errors import InputError
from runtime.preprocess import box_to_center_scale, sanitize_box

VIS_THR = 0.2
NMS_THR = 0.9
SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0


def detected_records(coco: Path, detections: Path, score_threshold: float = 0.0, max_images: int | None = None
                     ) -> tuple["OrderedDict[int, list[PersonRecord]]", list[float], list[int]]:
    """Person records from detections, grouped by image in the annotation file's order; their box scores in the
    same order; and the evaluated image ids (every image of the file, or the first `max_images`)."""
    data = json.loads(Path(coco).read_text())
    images = OrderedDict((img["id"], img) for img in data["images"])
    dets = read_detections(detections, score_threshold)
    check_image_ids(dets, set(images), f"{Path(coco).name}'s images")
    ids = list(images)[:max_images] if max_images else list(images)
    by_image: OrderedDict[int, list[PersonRecord]] = OrderedDict()
    scores: list[float] = []
    for image_id in ids:
        img = images[image_id]
        for n, d in enumerate(dets.get(image_id, [])):
            box = sanitize_box(d.box, img["width"], img["height"])
            if box is None:
                continue
            center, scale = box_to_center_scale(box)
            by_image.setdefault(image_id, []).append(PersonRecord(
                image_id=image_id, file_name=img["file_name"], width=img["width"], height=img["height"], box=box,
                center=center, scale=scale, keypoints=np.zeros((NUM_KEYPOINTS, 3), np.float32),
                area=float(box[2] * box[3]), ann_id=-(n + 1), raw_box=d.box))
            scores.append(d.score)
    if not by_image:
        raise InputError(f"no detection of {detections} lies inside its image")
    return by_image, scores, ids


def rescore_and_nms(predictions: list[dict], records: list[PersonRecord], box_scores: list[float]) -> list[dict]:
    """HRNet/mmpose: score = mean keypoint score above VIS_THR × box score, then OKS-NMS at NMS_THR per image."""
    if not (len(predictions) == len(records) == len(box_scores)):
        raise ValueError("predictions, records and box scores must align")
    by_image: dict[int, list[tuple[dict, float]]] = {}
    for p, r, s in zip(predictions, records, box_scores):
        k = np.asarray(p["keypoints"], float).reshape(-1, 3)
        vis = k[:, 2][k[:, 2] > VIS_THR]
        rescored = {**p, "score": float((vis.mean() if vis.size else 0.0) * s)}
        area = float(r.scale[0] * r.scale[1] * 200.0 ** 2)
        by_image.setdefault(p["image_id"], []).append((rescored, area))
    out = []
    for items in by_image.values():
        keep = oks_nms([np.asarray(p["keypoints"], float).reshape(-1, 3) for p, _ in items],
                       np.array([p["score"] for p, _ in items]), np.array([a for _, a in items]), NMS_THR)
        out += [items[i][0] for i in keep]
    return out


def oks_nms(kpts: list[np.ndarray], scores: np.ndarray, areas: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS on object keypoint similarity (HRNet `nms/nms.py` oks_nms): keep the best, drop those with
    OKS > threshold to it, repeat."""
    order = list(np.argsort(-scores))
    var = (SIGMAS * 2) ** 2
    keep = []
    while order:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        if not rest:
            break
        a = kpts[i]
        ious = []
        for j in rest:
            b = kpts[j]
            d2 = (a[:, 0] - b[:, 0]) ** 2 + (a[:, 1] - b[:, 1]) ** 2
            e = d2 / var / ((areas[i] + areas[j]) / 2 + np.spacing(1)) / 2
            ious.append(float(np.mean(np.exp(-e))))
        order = [j for j, o in zip(rest, ious) if o <= threshold]
    return keep
