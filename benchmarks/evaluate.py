"""`posellm-edge eval`: COCO AP of the PyTorch reference and of every bundle variant (precision × decoding),
token agreement with the reference and pixel error, as JSON + a Markdown table.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.coco import read_coco_persons
from runtime.estimator import Estimator, EstimatorConfig
from runtime.keypoints import KEYPOINT_NAMES
from runtime.preprocess import load_image
from runtime.results import write_json

from .coco_metrics import METRICS, coco_keypoint_metrics

DECODINGS = ("free", "template")


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path
    bundles: tuple[Path, ...]
    coco: Path
    images: Path
    backend: str = "onnxruntime"
    precisions: tuple[str, ...] | None = None  # default: every variant in each bundle
    decodings: tuple[str, ...] = DECODINGS
    max_ap_drop: float | None = None
    out: Path | None = None
    max_images: int | None = None
    detections: Path | None = None  # COCO results of a person detector instead of GT boxes (detected_persons.py)
    det_score: float = 0.0


@dataclass
class VariantRun:
    name: str
    predictions: list[dict]
    results: list = field(repr=False)
    seconds: float


def variant_name(bundle: Path, precision: str, decoding: str, several_bundles: bool) -> str:
    """`fp16-template`, or `<bundle dir>:fp16-template` when several bundles are compared; bench joins its rows to an
    eval report by this name."""
    name = f"{precision}-{decoding}"
    return f"{Path(bundle).name}:{name}" if several_bundles else name


def persons_by_image(coco: Path, max_images: int | None = None) -> "OrderedDict[int, list]":
    """The annotation file's person records grouped by image, in file order (the first `max_images` images)."""
    by_image: OrderedDict[int, list] = OrderedDict()
    for rec in read_coco_persons(coco):
        by_image.setdefault(rec.image_id, []).append(rec)
    if max_images:
        by_image = OrderedDict(list(by_image.items())[:max_images])
    return by_image


def run_variant(name: str, estimator, by_image, image_dir: Path) -> VariantRun:
    """Every person of `by_image` through `estimator` (GT centre/scale crops): COCO predictions and results."""
    t0 = time.perf_counter()
    preds, results = [], []
    for image_id, records in by_image.items():
        image = load_image(image_dir / records[0].file_name)
        for res in estimator.estimate_records(image, records):
            preds.append(res.to_coco(image_id))
            results.append(res)
    return VariantRun(name, preds, results, time.perf_counter() - t0)


def _agreement(ref: VariantRun, run: VariantRun) -> dict:
    same = total = 0
    errors = []
    for a, b in zip(ref.results, run.results, strict=True):
        for ta, tb in zip(a.tokens, b.tokens, strict=True):
            same += ta == tb
            total += 1
        errors.append(np.linalg.norm(a.keypoints[:, :2] - b.keypoints[:, :2], axis=1))
    err = np.stack(errors) if errors else np.zeros((0, len(KEYPOINT_NAMES)))
    return {"token_agreement": round(same / total, 6) if total else None,
            "mean_pixel_error": round(float(err.mean()), 4) if err.size else None,
            "pixel_error_per_keypoint": ({n: round(float(e), 4) for n, e in zip(KEYPOINT_NAMES, err.mean(0))}
                                         if err.size else {})}


def evaluate(cfg: EvalConfig, log=print) -> dict:
    from posellm.checkpoint import load_checkpoint
    from posellm.reference import ReferenceEstimator
    from runtime.prompts import PromptTokenizer
    from tokenizers import Tokenizer

    if cfg.detections is not None:
        from .detected_persons import detected_records, rescore_and_nms
        by_image, box_scores, ids = detected_records(cfg.coco, cfg.detections, cfg.det_score, cfg.max_images)
        records = [r for recs in by_image.values() for r in recs]
        finish = lambda preds: rescore_and_nms(preds, records, box_scores)  # noqa: E731
    else:
        by_image = persons_by_image(cfg.coco, cfg.max_images)
        ids = list(by_image)
        finish = lambda preds: preds  # noqa: E731 — GT boxes: LocLLM's protocol, no rescoring / NMS
    persons = sum(len(v) for v in by_image.values())
    log(f"{len(by_image)} images, {persons} persons from "
        f"{cfg.detections if cfg.detections is not None else cfg.coco}")
    first = Path(cfg.bundles[0])
    tokenizer = PromptTokenizer(Tokenizer.from_file(str(first / "tokenizer.json")))
    model = load_checkpoint(cfg.checkpoint)
    reference = ReferenceEstimator(model.merge_lora() if model.has_lora() else model, tokenizer)
    ref = run_variant("reference", reference, by_image, cfg.images)
    report: dict = {"coco": str(cfg.coco), "persons": persons, "checkpoint": str(cfg.checkpoint),
                    "boxes": ({"detections": str(cfg.detections), "det_score": cfg.det_score,
                               "rescoring": "mean keypoint score > 0.2 × box score", "nms": "OKS-NMS 0.9"}
                              if cfg.detections is not None else "ground truth"),
                    "reference": {"name": "reference", **coco_keypoint_metrics(cfg.coco, finish(ref.predictions),
                                                                              ids),
                                  "token_agreement": 1.0, "seconds": round(ref.seconds, 3)},
                    "variants": []}
    log(f"reference: AP {report['reference']['AP']:.2f} ({ref.seconds:.1f}s)")
    for bundle in cfg.bundles:
        est_probe = Estimator(bundle, EstimatorConfig(verify=True))
        precisions = cfg.precisions or tuple(est_probe.manifest.variants)
        for precision in precisions:
            for decoding in cfg.decodings:
                name = variant_name(bundle, precision, decoding, len(cfg.bundles) > 1)
                est = Estimator(bundle, EstimatorConfig(precision=precision, decoding=decoding,
                                                        backend=cfg.backend, verify=False))
                run = run_variant(name, est, by_image, cfg.images)
                entry = {"name": name, "bundle": str(bundle), "precision": precision, "decoding": decoding,
                         **coco_keypoint_metrics(cfg.coco, finish(run.predictions), ids), **_agreement(ref, run),
                         "seconds": round(run.seconds, 3)}
                entry["delta_AP"] = round(entry["AP"] - report["reference"]["AP"], 3)
                report["variants"].append(entry)
                log(f"{name}: AP {entry['AP']:.2f} (ΔAP {entry['delta_AP']:+.2f}), token agreement "
                    f"{entry['token_agreement']:.4f}, mean px error {entry['mean_pixel_error']}")
    report["markdown"] = markdown_table(report)
    if cfg.max_ap_drop is not None:
        report["max_ap_drop"] = cfg.max_ap_drop
        report["failed"] = [v["name"] for v in report["variants"] if -v["delta_AP"] > cfg.max_ap_drop]
    if cfg.out:
        write_json(cfg.out, report)
        Path(cfg.out).with_suffix(".md").write_text(report["markdown"] + "\n")
    return report


def markdown_table(report: dict) -> str:
    cols = ["name", *METRICS, "delta_AP", "token_agreement", "mean_pixel_error"]
    rows = [dict(report["reference"], delta_AP=0.0, mean_pixel_error=0.0)] + report["variants"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
