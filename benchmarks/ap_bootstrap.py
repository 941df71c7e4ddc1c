"""How much of a variant's ΔAP is the persons it was measured on: a paired bootstrap over images.

A validation set of 60 persons moves AP by about a point between two variants whose keypoints differ from the
reference's by the same fraction of a pixel (issue #21's recipe selection): a ΔAP alone does not say whether a
precision costs accuracy. Here the images are resampled with replacement, the *same* draw for the reference and the
variant (paired), and ΔAP is recomputed per draw: its 5th–95th percentiles are the interval eval reports.

Fast because it reuses pycocotools' own per-image matching: `COCOeval.evaluate()` runs once per variant, and each
draw only re-runs `accumulate()` over the drawn images' entries (duplicates allowed), then reads AP as `summarize()`
does (mean precision over OKS thresholds and recall, area 'all', the last maxDets).
"""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np

RESAMPLES = 300  # draws: the 5th/95th percentiles settle to ~0.1 AP at this count (60–300 persons)
LEVEL = 0.90


def evaluated(ann_path: str | Path, predictions: list[dict], image_ids: list[int]):
    """COCOeval after evaluate(): per-image OKS matching of `predictions` over `image_ids`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        ev = COCOeval(gt, gt.loadRes(predictions), "keypoints")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
    return ev


def draws(num_images: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, num_images] image positions drawn with replacement (fixed seed: the same draws for every
    variant of a report)."""
    return np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))


def resampled_ap(ev, picks: np.ndarray) -> np.ndarray:
    """AP (percent) of each draw: accumulate() over the drawn images' per-image results."""
    p = ev.params
    k0, a0, i0 = len(p.catIds), len(p.areaRng), len(p.imgIds)
    out = np.empty(len(picks))
    for d, pick in enumerate(picks):
        e = copy.copy(ev)  # shallow: shares the ground truth and detections, gets its own evalImgs and params
        e.evalImgs = [ev.evalImgs[k * a0 * i0 + a * i0 + i] for k in range(k0) for a in range(a0) for i in pick]
        e.params = copy.copy(p)
        e.params.imgIds = list(range(len(pick)))  # drawn positions: a duplicate image counts twice
        e._paramsEval = copy.copy(e.params)
        with contextlib.redirect_stdout(io.StringIO()):
            e.accumulate()
        prec = e.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area 'all', the last maxDets (summarize's AP)
        valid = prec[prec > -1]
        out[d] = 100.0 * float(valid.mean()) if valid.size else 0.0
    return out


def delta_interval(ref_ap: np.ndarray, var_ap: np.ndarray, level: float = LEVEL) -> list[float]:
    """[low, high] of the paired per-draw ΔAP (variant − reference)."""
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(var_ap - ref_ap, [tail, 100.0 - tail])
    return [round(float(lo), 3), round(float(hi), 3)]


def format_interval(ci: list[float]) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def subset_report(ann: Path, predictions: Path, sizes: list[int]) -> dict:
    """ΔAP and its interval for every variant folder of `eval --predictions DIR`, on the first N images of the
    annotation file for each N in `sizes`: how many images a ΔAP target needs."""
    import json

    from .coco_metrics import coco_keypoint_metrics
    images = [i["id"] for i in json.loads(Path(ann).read_text())["images"]]
    variants = sorted(d.name for d in Path(predictions).iterdir() if d.is_dir() and d.name != "reference")
    report: dict = {}
    for n in sizes:
        ids = images[:n]
        keep = set(ids)

        def load(name: str) -> list[dict]:
            rows = json.loads((Path(predictions) / name / "keypoints_results.json").read_text())
            return [r for r in rows if r["image_id"] in keep]
        ref = load("reference")
        picks = draws(len(ids))
        ref_ap = resampled_ap(evaluated(ann, ref, ids), picks)
        base = coco_keypoint_metrics(ann, ref, ids)["AP"]
        rows = {}
        for name in variants:
            preds = load(name)
            rows[name] = {"delta_AP": round(coco_keypoint_metrics(ann, preds, ids)["AP"] - base, 3),
                          "delta_AP_ci90": delta_interval(ref_ap, resampled_ap(evaluated(ann, preds, ids), picks))}
        report[str(n)] = {"images": len(ids), "persons": len(ref), "reference_AP": base, "variants": rows}
    return report


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.ap_bootstrap ANN PREDICTIONS_DIR --images 40 100 200 [--out JSON]"""
    import argparse

    from runtime.results import write_json
    p = argparse.ArgumentParser(description="ΔAP and its 90% interval on the first N images, per variant")
    p.add_argument("ann", type=Path, help="the COCO annotation file eval ran on")
    p.add_argument("predictions", type=Path, help="eval's --predictions folder (reference/ and one per variant)")
    p.add_argument("--images", type=int, nargs="+", required=True, help="subset sizes (first N images)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = subset_report(args.ann, args.predictions, args.images)
    for n, r in report.items():
        print(f"first {n} images ({r['persons']} persons), reference AP {r['reference_AP']:.2f}")
        for name, v in r["variants"].items():
            print(f"  {name:28s} ΔAP {v['delta_AP']:+.2f}  90% {format_interval(v['delta_AP_ci90'])}")
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
