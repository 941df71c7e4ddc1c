"""COCO keypoint metrics with pycocotools (the official OKS evaluation), quietly."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

METRICS = ("AP", "AP50", "AP75", "APM", "APL", "AR")


def coco_keypoint_metrics(ann_path: str | Path, predictions: list[dict],
                          image_ids: list[int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APM, APL, AR in percent (COCOeval 'keypoints' stats 0–5) over `image_ids` (default: every
    image of the annotation file). No predictions → zeros."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not predictions:
        return {m: 0.0 for m in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        dt = gt.loadRes(predictions)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.imgIds = sorted(image_ids) if image_ids is not None else sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: round(100.0 * max(float(v), 0.0), 3) for m, v in zip(METRICS, ev.stats[:6])}
