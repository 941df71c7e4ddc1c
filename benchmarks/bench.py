"""`posellm-edge bench`: per-person latency (p50/p90/p99, end to end and per stage), persons/s at several batch
sizes and peak RSS for every bundle variant, with the PyTorch reference measured in the same run on the same crops.

Warm-up calls are excluded. Peak RSS per variant uses Linux's resettable high-water mark (`/proc/self/clear_refs`
"5" resets VmHWM), so each variant's figure is its own peak, in one process.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.backends.base import Stopwatch
from runtime.coco import read_coco_persons
from runtime.estimator import Estimator, EstimatorConfig
from runtime.manifest import TENSORRT_BACKENDS, sha256_file
from runtime.memory import peak_rss_bytes, reset_peak_rss
from runtime.image_io import load_image
from runtime.results import write_json

from .accuracy_summary import accuracy_by_variant, plot_accuracy, read_reports
from .ap_bootstrap import format_interval
from .evaluate import variant_name

STAGES = ("preprocess", "vision", "prefix_prefill", "suffix_prefill", "decode")


@dataclass(frozen=True)
class BenchConfig:
    bundles: tuple[Path, ...]
    coco: Path
    images: Path
    checkpoint: Path | None = None  # the PyTorch reference baseline
    backend: str = "onnxruntime"
    precisions: tuple[str, ...] | None = None
    decodings: tuple[str, ...] = ("template", "free")
    persons: int = 12  # timed single-person calls per variant
    warmup: int = 2
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    reference_persons: int = 6
    interleave: bool = False  # time the variants in turn on each person: on a shared machine all see the same load
    eval_reports: tuple[Path, ...] = ()  # eval REPORT.json files (COCO AP and/or MPII PCKh) joined by variant name
    out: Path | None = None
    plot: Path | None = None


def _peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3)}


def _persons(cfg: BenchConfig):
    """(image, record) pairs of real crops, cycled to the number needed."""
    recs = read_coco_persons(cfg.coco)
    cache: dict[str, np.ndarray] = {}
    out = []
    for rec in recs[: max(cfg.persons + cfg.warmup, max(cfg.batch_sizes))]:
        if rec.file_name not in cache:
            cache[rec.file_name] = load_image(cfg.images / rec.file_name)
        out.append((cache[rec.file_name], rec))
    return out


def _time(estimator, persons, cfg: BenchConfig, n: int) -> dict:
    return _time_interleaved([estimator], persons, cfg, n)[0]


def _time_interleaved(estimators: list, persons, cfg: BenchConfig, n: int) -> list[dict]:
    """Single-person calls, each person run by every estimator in turn (the order rotates per person)."""
    e2e = [[] for _ in estimators]
    stages = [{s: [] for s in STAGES} for _ in estimators]
    for i in range(cfg.warmup + n):
        image, rec = persons[i % len(persons)]
        for j in np.roll(np.arange(len(estimators)), -i):
            watch = Stopwatch()
            t0 = time.perf_counter()
            if isinstance(estimators[j], Estimator):
                estimators[j].estimate_records(image, [rec], watch=watch)
            else:
                estimators[j].estimate_records(image, [rec])
            if i >= cfg.warmup:
                e2e[j].append(time.perf_counter() - t0)
                for s in STAGES:
                    stages[j][s].append(watch.seconds.get(s, 0.0))
    return [{"ms_per_person": _pct(e2e[j]), "stages_ms": {s: _pct(v) for s, v in stages[j].items()} if
             isinstance(est, Estimator) else {}} for j, est in enumerate(estimators)]


def _throughput(estimator: Estimator, persons, cfg: BenchConfig) -> dict[str, float]:
    out = {}
    for bs in cfg.batch_sizes:
        image, _ = persons[0]
        recs = [rec for img, rec in persons if img is image][:bs] or [persons[0][1]]
        recs = (recs * bs)[:bs]  # one image's persons, repeated to the batch size
        estimator.estimate_records(image, recs)  # warm-up at this shape
        t0 = time.perf_counter()
        estimator.estimate_records(image, recs)
        out[str(bs)] = round(bs / (time.perf_counter() - t0), 3)
    return out


def environment() -> dict:
    import onnxruntime as ort
    from exporter.versions import library_versions
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime_providers": ort.get_available_providers(), "libraries": library_versions()}


def benchmark(cfg: BenchConfig, log=print) -> dict:
    persons = _persons(cfg)
    results = []
    if cfg.checkpoint is not None:
        results.append(_bench_reference(cfg, persons, log))
    pending = []  # interleaved: (entry without timings, estimator), timed together below
    for bundle in cfg.bundles:
        probe = Estimator(bundle, EstimatorConfig())
        for precision in cfg.precisions or tuple(probe.manifest.variants):
            for decoding in cfg.decodings:
                reset_peak_rss()
                est = Estimator(bundle, EstimatorConfig(precision=precision, decoding=decoding,
                                                        backend=cfg.backend, verify=False))
                name = variant_name(bundle, precision, decoding, len(cfg.bundles) > 1)
                entry = {"name": name, "backend": cfg.backend, "precision": precision, "decoding": decoding,
                         "bundle": str(bundle), "bundle_sha256": sha256_file(Path(bundle) / "manifest.json"),
                         "bundle_bytes": _bundle_bytes(Path(bundle), est.manifest.variant(precision)),
                         "graphs": _graphs(est.manifest.variant(precision), cfg.backend)}
                if cfg.interleave:
                    pending.append((entry, est))
                    continue
                entry.update(_time(est, persons, cfg, cfg.persons), persons_per_s=_throughput(est, persons, cfg),
                             peak_rss_mb=round(_peak_rss_mb(), 1))
                results.append(entry)
                log(f"{name}: {entry['ms_per_person']['p50']:.1f} ms/person p50")
    if pending:
        timings = _time_interleaved([est for _, est in pending], persons, cfg, cfg.persons)
        for (entry, est), timing in zip(pending, timings):
            # one process holds every variant: its peak RSS is shared, not per variant
            entry.update(timing, persons_per_s=_throughput(est, persons, cfg), peak_rss_mb=round(_peak_rss_mb(), 1),
                         interleaved=True)
            results.append(entry)
            log(f"{entry['name']}: {entry['ms_per_person']['p50']:.1f} ms/person p50 (interleaved)")
    ref = next((r for r in results if r["name"] == "reference"), None)
    for r in results:
        if ref is not None:
            r["speedup_vs_reference"] = round(ref["ms_per_person"]["p50"] / r["ms_per_person"]["p50"], 2)
    accuracy_columns = _attach_accuracy(results, cfg.eval_reports)
    report = {"environment": environment(), "config": {k: str(v) for k, v in cfg.__dict__.items()},
              "results": results}
    report["markdown"] = markdown_table(results, accuracy_columns)
    if cfg.out:
        write_json(cfg.out, report)
    if cfg.plot:
        plot(results, cfg.plot)
    return report


def _bench_reference(cfg: BenchConfig, persons, log) -> dict:
    from posellm.checkpoint import load_checkpoint
    from posellm.reference import ReferenceEstimator
    from runtime.prompts import PromptTokenizer
    from tokenizers import Tokenizer
    reset_peak_rss()
    model = load_checkpoint(cfg.checkpoint)
    ref = ReferenceEstimator(model.merge_lora() if model.has_lora() else model,
                             PromptTokenizer(Tokenizer.from_file(str(Path(cfg.bundles[0]) / "tokenizer.json"))))
    timing = _time(ref, persons, cfg, cfg.reference_persons)
    log(f"reference: {timing['ms_per_person']['p50']:.1f} ms/person p50")
    return {"name": "reference", "backend": "pytorch", "precision": "fp32", "decoding": "free", **timing,
            "persons_per_s": {"1": round(1000.0 / timing["ms_per_person"]["p50"], 3)},
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _bundle_bytes(bundle: Path, variant) -> int:
    files = [variant.vision.file, variant.decoder.file, variant.embedding, *variant.vision.external_data,
             *variant.decoder.external_data]
    return sum((bundle / f).stat().st_size for f in files)


def _attach_accuracy(results: list[dict], eval_reports: tuple[Path, ...]) -> list[str]:
    """AP / ΔAP (COCO-format reports) and PCKh / ΔPCKh (MPII reports) onto the rows of the same variant name."""
    if not eval_reports:
        return []
    columns, by_name = accuracy_by_variant(read_reports(eval_reports))
    for r in results:
        for col, value in by_name.get(r["name"], {}).items():
            r[col] = value
        if "ΔAP" in r:  # the field name earlier bench reports used
            r["delta_AP"] = r.pop("ΔAP")
    return ["delta_AP" if c == "ΔAP" else c for c in columns]


def _graphs(variant, backend: str) -> dict[str, str]:
    """The graph files this backend runs for the variant (weight-only and int8 variants have a TensorRT form)."""
    form = variant.form(backend)
    return {"vision": form.vision.file, "decoder": form.decoder.file}


NOTES = {  # what the quantized variants run, per backend family
    "tensorrt": "int8 / int4 on TensorRT run their `tensorrt` graph form: fp16 activations with int8 (per channel) "
                "or int4 (blocked) weights as Q/DQ, derived from the fp16 graphs, so no layer falls back to FP32 "
                "under strong typing; every decode pass streams all decoder weights, so they are meant to beat fp16 "
                "there. int8wo's blocked-int8 Q/DQ is outside TensorRT's documented support (`build` refuses it).",
    "onnxruntime": "On onnxruntime (CPU/CUDA EPs) int4 / int8wo run MatMulNBits: on the CPU EP at the accuracy level "
                   "`quantize` wrote (default 4: activations quantized to int8 per block, int8 dot products; 0: fp32 "
                   "math), on the CUDA EP in float; int8 runs the fp32 Q/DQ graphs (DequantizeLinear re-expands "
                   "every weight per call).",
}


def markdown_table(results: list[dict], accuracy_columns: list[str] | None = None) -> str:
    """Latency columns, then the accuracy of each eval report given (AP | ΔAP | PCKh | ΔPCKh | ...)."""
    acc = accuracy_columns or ["AP", "delta_AP"]
    titles = ["ΔAP" if c == "delta_AP" else c for c in acc]
    lines = ["| variant | backend | ms/person p50 | p90 | p99 | decode ms p50 | speed-up | persons/s (max batch) "
             "| peak RSS MB | " + " | ".join(titles) + " |", "|---|" * 9 + "---|" * len(acc)]
    for r in results:
        ms = r["ms_per_person"]
        pps = max(r["persons_per_s"].values())
        decode = r.get("stages_ms", {}).get("decode", {}).get("p50")
        lines.append(f"| {r['name']} | {r['backend']} | {ms['p50']:.1f} | {ms['p90']:.1f} | {ms['p99']:.1f} | "
                     f"{'' if decode is None else f'{decode:.1f}'} | {r.get('speedup_vs_reference', '')}× | "
                     f"{pps:.2f} | {r['peak_rss_mb']:.0f} | "
                     + " | ".join(_cell(r.get(c)) for c in acc) + " |")
    quantized = {r["backend"] for r in results if r.get("precision") in ("int8", "int8wo", "int4")}
    notes = sorted({NOTES["tensorrt" if b in TENSORRT_BACKENDS else "onnxruntime"] for b in quantized})
    return "\n".join(lines + ([""] + [f"Note: {n}" for n in notes] if notes else []))


def plot(results: list[dict], out: Path) -> None:
    """Accuracy vs ms/person: one panel per benchmark given (COCO AP, MPII PCKh)."""
    plot_accuracy(results, out, x_key=lambda r: r["ms_per_person"]["p50"])


def _cell(v) -> str:
    if isinstance(v, list):  # ΔAP 90%
        return format_interval(v)
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
