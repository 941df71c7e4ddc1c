"""`posellm-edge eval`: the accuracy of the PyTorch reference and of every bundle variant (precision × decoding) on
one benchmark — COCO-format keypoint AP (COCO val, Human-Art) or MPII PCKh with LocLLM's zero-shot keypoint set —
with token agreement with the reference and pixel error, as JSON + a Markdown table.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.coco import read_coco_persons
from runtime.errors import InputError
from runtime.estimator import Estimator, EstimatorConfig
from runtime.manifest import load_manifest
from runtime.image_io import load_image
from runtime.results import write_json

from . import ap_bootstrap
from .coco_metrics import METRICS, coco_keypoint_metrics

DECODINGS = ("free", "template")


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path
    bundles: tuple[Path, ...]
    images: Path
    coco: Path | None = None  # a COCO-format keypoint file (COCO val, Human-Art, ...)
    mpii: Path | None = None  # or MPII's valid.json, with
    headboxes: Path | None = None  # its gt_valid.mat
    backend: str = "onnxruntime"
    precisions: tuple[str, ...] | None = None  # default: every variant in each bundle
    decodings: tuple[str, ...] = DECODINGS
    max_ap_drop: float | None = None  # on the benchmark's headline metric: AP, or PCKh Mean
    out: Path | None = None
    predictions: Path | None = None  # a folder: <variant>/keypoints_results.json or pred_kpt.json
    max_images: int | None = None
    detections: Path | None = None  # COCO results of a person detector instead of GT boxes (detected_persons.py)
    det_score: float = 0.0

    def __post_init__(self) -> None:
        if (self.coco is None) == (self.mpii is None):
            raise InputError("give exactly one benchmark: --coco ANN.json or --mpii valid.json --headboxes "
                             "gt_valid.mat")
        if self.mpii is not None and self.headboxes is None:
            raise InputError(f"--mpii {self.mpii} needs --headboxes gt_valid.mat (MPII's annot/gt_valid.mat)")
        if self.detections is not None and self.coco is None:
            raise InputError(f"--detections {self.detections} scores COCO-format sets; expected --coco with it")
        if self.coco is not None and self.headboxes is not None:
            raise InputError(f"--headboxes {self.headboxes} belongs to --mpii; expected no --headboxes with --coco")


@dataclass
class VariantRun:
    name: str
    predictions: list[dict]
    results: list = field(repr=False)
    seconds: float


@dataclass(frozen=True)
class CocoBenchmark:
    ann: Path
    groups: "OrderedDict[int, list]"
    keypoints: None = None  # the bundle's 17 COCO keypoints
    primary: str = "AP"
    columns: tuple[str, ...] = METRICS
    predictions_file: str = "keypoints_results.json"  # COCO results format

    def describe(self) -> str:
        return f"{len(self.groups)} images, {sum(len(v) for v in self.groups.values())} persons from {self.ann}"

    def by_image(self) -> "OrderedDict[int, list]":
        return self.groups

    @staticmethod
    def prediction(record, result) -> dict:
        return result.to_coco(record.image_id)

    def scored(self, predictions: list[dict]) -> tuple[list[dict], list[int]]:
        """The predictions pycocotools scores, and over which images."""
        return predictions, list(self.groups)

    def metrics(self, predictions: list[dict]) -> dict:
        return coco_keypoint_metrics(self.ann, *self.scored(predictions))

    def evaluated(self, predictions: list[dict]):
        """pycocotools' per-image matching, for the ΔAP bootstrap (ap_bootstrap.py)."""
        return ap_bootstrap.evaluated(self.ann, *self.scored(predictions))


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


@dataclass(frozen=True)
class DetectedCocoBenchmark(CocoBenchmark):
    """COCO AP on a person detector's boxes (top-down protocol of HRNet/mmpose): each person's score is rescored
    by its keypoint scores and the box score, then OKS-NMS at 0.9, before pycocotools (detected_persons.py)."""
    detections: Path | None = None
    det_score: float = 0.0
    box_scores: tuple[float, ...] = ()
    image_ids: tuple[int, ...] = ()

    def describe(self) -> str:
        return (f"{len(self.groups)} images, {sum(len(v) for v in self.groups.values())} detected persons from "
                f"{self.detections} (score >= {self.det_score})")

    def scored(self, predictions: list[dict]) -> tuple[list[dict], list[int]]:
        from .detected_persons import rescore_and_nms
        records = [r for recs in self.groups.values() for r in recs]  # run_variant's order
        return rescore_and_nms(predictions, records, list(self.box_scores)), list(self.image_ids)


def load_benchmark(cfg: EvalConfig):
    if cfg.mpii is not None:
        from .mpii_eval import MpiiBenchmark  # scipy only for MPII
        return MpiiBenchmark.load(cfg.mpii, cfg.headboxes, cfg.max_images)
    if cfg.detections is not None:
        from .detected_persons import detected_records
        by_image, box_scores, ids = detected_records(cfg.coco, cfg.detections, cfg.det_score, cfg.max_images)
        return DetectedCocoBenchmark(cfg.coco, by_image, detections=cfg.detections, det_score=cfg.det_score,
                                     box_scores=tuple(box_scores), image_ids=tuple(ids))
    return CocoBenchmark(cfg.coco, persons_by_image(cfg.coco, cfg.max_images))


def run_variant(name: str, estimator, by_image, image_dir: Path, keypoints=None,
                prediction=CocoBenchmark.prediction) -> VariantRun:
    """Every person of `by_image` through `estimator` (GT centre/scale crops): predictions and results.
    `keypoints` (a set name or pairs) goes to the runtime; the reference is built with its own."""
    t0 = time.perf_counter()
    kw = {} if keypoints is None else {"keypoints": keypoints}
    preds, results = [], []
    for records in by_image.values():
        image = load_image(Path(image_dir) / records[0].file_name)
        for rec, res in zip(records, estimator.estimate_records(image, records, **kw), strict=True):
            preds.append(prediction(rec, res))
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
    names = ref.results[0].names if ref.results else ()
    err = np.stack(errors) if errors else np.zeros((0, len(names)))
    return {"token_agreement": round(same / total, 6) if total else None,
            "mean_pixel_error": round(float(err.mean()), 4) if err.size else None,
            "pixel_error_per_keypoint": ({n: round(float(e), 4) for n, e in zip(names, err.mean(0))}
                                         if err.size else {})}


def _scores(bench, run: VariantRun, predictions_dir: Path | None) -> dict:
    """The benchmark's metrics, flattened so the headline columns sit at the top level of a report row."""
    if predictions_dir is not None:  # one folder per variant (`bundle:fp16-free` → `bundle_fp16-free`)
        write_json(Path(predictions_dir) / re.sub(r"[^\w.+-]", "_", run.name) / bench.predictions_file,
                   run.predictions)
    metrics = bench.metrics(run.predictions)
    return {**metrics.pop("PCKh", {}), **metrics}


def _check_precisions(cfg: EvalConfig) -> None:
    if not cfg.precisions:
        return
    for bundle in cfg.bundles:
        have = load_manifest(bundle).variants
        for precision in cfg.precisions:
            if precision not in have:
                hint = " (the flag repeats: --precision a --precision b)" if "," in precision else ""
                raise InputError(f"--precision {precision!r}: {bundle} has no such variant; expected one of "
                                 f"{sorted(have)}{hint}")


def evaluate(cfg: EvalConfig, log=print) -> dict:
    from posellm.checkpoint import load_checkpoint
    from posellm.reference import ReferenceEstimator
    from runtime.keypoint_sets import resolve_keypoints
    from runtime.prompts import PromptTokenizer
    from tokenizers import Tokenizer

    _check_precisions(cfg)  # before the reference run (tens of seconds to hours), not after it
    bench = load_benchmark(cfg)
    by_image = bench.by_image()
    log(bench.describe())
    first = Path(cfg.bundles[0])
    tokenizer = PromptTokenizer(Tokenizer.from_file(str(first / "tokenizer.json")))
    model = load_checkpoint(cfg.checkpoint)
    reference = ReferenceEstimator(model.merge_lora() if model.has_lora() else model, tokenizer,
                                   keypoints=resolve_keypoints(bench.keypoints))
    ref = run_variant("reference", reference, by_image, cfg.images, prediction=bench.prediction)
    key = bench.primary
    benchmark = {"coco": str(cfg.coco)} if cfg.coco else {"mpii": str(cfg.mpii), "headboxes": str(cfg.headboxes)}
    if cfg.detections is not None:
        benchmark["boxes"] = {"detections": str(cfg.detections), "det_score": cfg.det_score,
                              "rescoring": "mean keypoint score > 0.2 x box score", "nms": "OKS-NMS 0.9"}
    elif cfg.coco:
        benchmark["boxes"] = "ground truth"
    report: dict = {"benchmark": "mpii" if cfg.mpii else "coco", **benchmark,
                    "persons": sum(len(v) for v in by_image.values()), "checkpoint": str(cfg.checkpoint),
                    "metric": key, "reference": {"name": "reference", **_scores(bench, ref, cfg.predictions),
                                                 "token_agreement": 1.0, "seconds": round(ref.seconds, 3)},
                    "variants": []}
    log(f"reference: {_headline(report['reference'], key)} ({ref.seconds:.1f}s)")
    interval = _DeltaInterval(bench, ref.predictions) if hasattr(bench, "evaluated") else None  # COCO AP only
    if interval is not None:
        report["delta_interval"] = {"level": ap_bootstrap.LEVEL, "resamples": ap_bootstrap.RESAMPLES,
                                    "what": "paired bootstrap over images (benchmarks/ap_bootstrap.py)"}
    for bundle in cfg.bundles:
        est_probe = Estimator(bundle, EstimatorConfig(verify=True))
        precisions = cfg.precisions or tuple(est_probe.manifest.variants)
        for precision in precisions:
            for decoding in cfg.decodings:
                name = variant_name(bundle, precision, decoding, len(cfg.bundles) > 1)
                est = Estimator(bundle, EstimatorConfig(precision=precision, decoding=decoding,
                                                        backend=cfg.backend, verify=False))
                run = run_variant(name, est, by_image, cfg.images, bench.keypoints, bench.prediction)
                entry = {"name": name, "bundle": str(bundle), "precision": precision, "decoding": decoding,
                         **_scores(bench, run, cfg.predictions), **_agreement(ref, run),
                         "seconds": round(run.seconds, 3)}
                entry.update(_deltas(entry, report["reference"], key))
                if interval is not None:
                    entry[CI_KEY] = interval(run.predictions)
                report["variants"].append(entry)
                log(f"{name}: {_headline(entry, key)} (Δ{_label(key)} {_fmt_delta(entry[_delta_key(key)])}"
                    f"{_fmt_interval(entry.get(CI_KEY))}), "
                    f"token agreement {entry['token_agreement']:.4f}, mean px error {entry['mean_pixel_error']}")
    report["markdown"] = markdown_table(report, bench.columns)
    if cfg.max_ap_drop is not None:
        report["max_ap_drop"] = cfg.max_ap_drop
        report["failed"] = [v["name"] for v in report["variants"]
                            if v[_delta_key(key)] is None or -v[_delta_key(key)] > cfg.max_ap_drop]
    if cfg.out:
        write_json(cfg.out, report)
        md = Path(cfg.out).with_suffix(".md")
        tmp = md.with_name(md.name + ".tmp")
        tmp.write_text(report["markdown"] + "\n")
        tmp.replace(md)
    return report


CI_KEY = "delta_AP_ci90"


class _DeltaInterval:
    """ΔAP's 90% interval of each variant: the reference's AP on fixed image draws, computed once."""

    def __init__(self, bench, ref_predictions: list[dict]) -> None:
        self.bench = bench
        ref = bench.evaluated(ref_predictions)
        self.picks = ap_bootstrap.draws(len(ref.params.imgIds))
        self.ref_ap = ap_bootstrap.resampled_ap(ref, self.picks)

    def __call__(self, predictions: list[dict]) -> list[float]:
        return ap_bootstrap.delta_interval(self.ref_ap,
                                           ap_bootstrap.resampled_ap(self.bench.evaluated(predictions), self.picks))


def _fmt_interval(ci) -> str:
    return "" if ci is None else f", 90% {ap_bootstrap.format_interval(ci)}"


def _label(key: str) -> str:
    return "PCKh" if key == "Mean" else key


def _delta_key(key: str) -> str:
    return f"delta_{_label(key)}"


def _deltas(entry: dict, ref: dict, key: str) -> dict:
    """ΔAP, or ΔPCKh (Mean) and ΔPCKh@0.1 (Mean@0.1), against the reference."""
    pairs = [(key, _delta_key(key))] + ([("Mean@0.1", "delta_PCKh@0.1")] if key == "Mean" else [])
    return {d: (None if entry[k] is None or ref[k] is None else round(entry[k] - ref[k], 3)) for k, d in pairs}


def _headline(row: dict, key: str) -> str:
    if key == "Mean":
        return f"PCKh@0.5 {_fmt(row['Mean'])}, @0.1 {_fmt(row['Mean@0.1'])}"
    return f"AP {row['AP']:.2f}"


def _fmt_delta(v) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def markdown_table(report: dict, columns=METRICS) -> str:
    key = report.get("metric", "AP")
    deltas = [_delta_key(key)] + (["delta_PCKh@0.1"] if key == "Mean" else [])
    intervals = [CI_KEY] if any(CI_KEY in v for v in report["variants"]) else []
    cols = ["name", *columns, *deltas, *intervals, "token_agreement", "mean_pixel_error"]
    rows = [dict(report["reference"], mean_pixel_error=0.0, **{d: 0.0 for d in deltas})] + report["variants"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if intervals:
        lines.append(f"\n{CI_KEY}: 5th–95th percentile of ΔAP over {ap_bootstrap.RESAMPLES} paired resamples of the "
                     "images (the reference and the variant on the same draw): the part of ΔAP that is the persons.")
    if key == "Mean":
        lines.append("\nPCKh (MPII, LocLLM's protocol): Mean over the COCO joints (pelvis, thorax, neck, head top "
                     "masked); Mean@0.1 read at threshold 0.11 as LocLLM/HRNet compute it; Pelvis/Thorax/Neck/Head "
                     "top: the zero-shot joints.")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, list):
        return ap_bootstrap.format_interval(v)
    return f"{v:.3f}" if isinstance(v, float) else ("–" if v is None else str(v))
