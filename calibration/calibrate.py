"""`posellm-edge calibrate`: add an explicit-quantization `int8` variant to a bundle.

vision W8A8 (onnxruntime static quantization, calibrated on real COCO person crops) + decoder weight-only int8 per
output channel, a calibration artifact (`int8/calibration.json`: method, samples, per-tensor scales, data hashes,
an int8-vs-fp32 check), and an atomic manifest update. Precision lives in the ONNX graphs, so TensorRT builds them
strongly typed on 10.x (Jetson) and 11.x alike.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.backends.base import Stopwatch
from runtime.backends.onnxruntime import OrtRunner
from runtime.decoding import Decoder
from runtime.errors import InputError
from runtime.manifest import (SCHEMA_VERSION, GraphForm, GraphSpec, Manifest, Variant, load_manifest, sha256_file,
                              write_manifest)
from runtime.preprocess import CropSpec

from .data import PersonCrops, RecordingRunner, VisionReader, load_person_crops
from .qdq import qdq_scales, quantize_decoder_weights, quantize_vision, vision_to_fp16

METHODS = ("entropy", "percentile", "minmax")
DECODER_DTYPES = ("fp32", "fp16")
PRECISION = "int8"
ARTIFACT = f"{PRECISION}/calibration.json"
ARTIFACT_SCHEMA = 1


@dataclass(frozen=True)
class CalibrationConfig:
    bundle: Path
    coco: Path  # COCO person-keypoints annotation file (GT boxes give the crops)
    images: Path  # folder holding the file's images
    method: str = "entropy"  # onnxruntime calibrator for the vision activations
    samples: int = 64  # person crops (a seeded random subset of the file's instances)
    batch_size: int = 4  # crops per calibration inference (bounds the calibrator's memory)
    percentile: float = 99.999  # `percentile` method only
    seed: int = 0
    eval_persons: int = 2  # crops whose induced decoder inputs are recorded and used for the int8-vs-fp32 check
    decoder_dtype: str = "fp32"  # activation dtype of the weight-only decoder (fp16 needs the bundle's fp16 graphs)
    overwrite: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method={self.method!r}: expected one of {list(METHODS)}")
        if self.samples < 1 or self.batch_size < 1:
            raise InputError(f"samples={self.samples}, batch_size={self.batch_size}: both must be >= 1")
        if not 0.0 < self.percentile <= 100.0:
            raise InputError(f"percentile={self.percentile}: expected a value in (0, 100]")
        if self.eval_persons < 0:
            raise InputError(f"eval_persons={self.eval_persons}: expected >= 0")
        if self.decoder_dtype not in DECODER_DTYPES:
            raise InputError(f"decoder_dtype={self.decoder_dtype!r}: expected one of {list(DECODER_DTYPES)}")


@dataclass(frozen=True)
class CalibrationResult:
    bundle: Path
    variant: Variant
    artifact: dict[str, Any]
    samples: int
    calibration_seconds: float  # onnxruntime calibration + vision quantization
    seconds: float  # the whole command
    sizes: dict[str, int | None]  # on-disk bytes (graph + external data) and weight (initializer) bytes
    decoder_weight_ratio_vs_fp16: float | None  # int8 decoder weight bytes / fp16 decoder weight bytes
    decoder_file_ratio_vs_fp16: float | None


def calibrate_bundle(cfg: CalibrationConfig, log: Callable[[str], None] = print) -> CalibrationResult:
    start = time.perf_counter()
    bundle = Path(cfg.bundle)
    manifest = load_manifest(bundle, verify=True)
    fp32 = manifest.variant("fp32")
    source = manifest.variant(cfg.decoder_dtype)
    if PRECISION in manifest.variants and not cfg.overwrite:
        raise InputError(f"{bundle} already has an int8 variant; pass --overwrite to recalibrate it")
    spec = CropSpec(crop_size=manifest.preprocess.crop_size, mean=tuple(manifest.preprocess.mean),
                    std=tuple(manifest.preprocess.std))
    crops = load_person_crops(Path(cfg.coco), Path(cfg.images), cfg.samples, cfg.seed, spec)
    n = len(crops.pixel_values)
    if n < cfg.samples:
        log(f"calibrate: {cfg.coco} has only {n} person instances; using all of them (asked for {cfg.samples})")

    tmp = bundle / f".{PRECISION}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        reader = VisionReader(crops.pixel_values, cfg.batch_size)
        quantize_vision(bundle / fp32.vision.file, tmp / "vision.onnx", reader, cfg.method, cfg.percentile,
                        external_data=bool(fp32.vision.external_data))
        calibration_seconds = time.perf_counter() - t0
        log(f"calibrated the vision graph ({cfg.method}, {n} person crops) in {calibration_seconds:.1f}s")
        t1 = time.perf_counter()
        decoder_summary = quantize_decoder_weights(bundle / source.decoder.file, tmp / "decoder.onnx")
        log(f"quantized {decoder_summary['weights']} decoder weights (int8 per output channel, "
            f"{cfg.decoder_dtype} activations) in {time.perf_counter() - t1:.1f}s")
        vision_spec = _int8_spec(fp32.vision, tmp / "vision.onnx")
        decoder_spec = _int8_spec(source.decoder, tmp / "decoder.onnx")
        trt_form = _tensorrt_form(manifest, bundle, tmp, cfg, vision_spec, decoder_spec, log)
        persons = min(cfg.eval_persons, fp32.vision.dynamic_ranges.get("batch", (1, cfg.eval_persons))[1])
        evaluation, decoder_data = _evaluate(manifest, bundle, fp32, crops.pixel_values[:persons],
                                             tmp, vision_spec, decoder_spec, source.embedding, cfg.threads, trt_form)
        for line in _format_evaluation(evaluation):
            log(line)
        artifact = _artifact(cfg, crops, calibration_seconds, tmp, decoder_summary, decoder_data, evaluation)
        (tmp / "calibration.json").write_text(json.dumps(artifact, indent=1, sort_keys=True) + "\n")
        variant = Variant(
            precision=PRECISION, vision=vision_spec, decoder=decoder_spec, embedding=source.embedding,
            calibration={"artifact": ARTIFACT, "sha256": sha256_file(tmp / "calibration.json"),
                         "method": cfg.method, "samples": n, "data_sha256": artifact["data"]["sha256"],
                         "vision": artifact["vision"]["scheme"], "decoder": artifact["decoder"]["scheme"]},
            tensorrt=trt_form)
        manifest = _publish(bundle, manifest, tmp, variant)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = _sizes(bundle, manifest)
    weight_ratio = (sizes["int8_decoder_weights"] / sizes["fp16_decoder_weights"]
                    if sizes["fp16_decoder_weights"] else None)
    file_ratio = sizes["int8_decoder_bytes"] / sizes["fp16_decoder_bytes"] if sizes["fp16_decoder_bytes"] else None
    if weight_ratio is not None:
        log(f"int8 decoder: {sizes['int8_decoder_weights']} weight bytes = {weight_ratio:.3f}x fp16 "
            f"({sizes['int8_decoder_bytes']} file bytes = {file_ratio:.3f}x)")
    seconds = time.perf_counter() - start
    log(f"calibration time {calibration_seconds:.1f}s; int8 variant written in {seconds:.1f}s")
    return CalibrationResult(bundle, manifest.variants[PRECISION], artifact, n, calibration_seconds, seconds,
                             sizes, weight_ratio, file_ratio)


# ---------------------------------------------------------------------------------------------------- helpers
def _int8_spec(spec: GraphSpec, path: Path, precision: str = PRECISION) -> GraphSpec:
    """`spec` (inputs, outputs, ranges) for the graph written at `path`, to be published as `precision/<name>`."""
    ext = path.name + ".data"
    return dataclasses.replace(spec, file=f"{precision}/{path.name}",
                               external_data=(f"{precision}/{ext}",) if (path.parent / ext).exists() else ())


def _diff(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    d = np.abs(got - ref)
    return {"max_abs": float(d.max()), "ref_max_abs": float(np.abs(ref).max()),
            "rms_rel": float(np.sqrt((d ** 2).mean() / max((ref ** 2).mean(), 1e-30)))}


def _tensorrt_form(manifest: Manifest, bundle: Path, tmp: Path, cfg: CalibrationConfig, vision_spec: GraphSpec,
                   decoder_spec: GraphSpec, log: Callable[[str], None]) -> GraphForm | None:
    """The graphs TensorRT builds (issue: int8 engines must not run their float layers in FP32): W8A8 vision with
    fp16 activations and the weight-only int8 decoder quantized from the fp16 decoder. Needs the fp16 variant."""
    fp16 = manifest.variants.get("fp16")
    if fp16 is None:
        log("no fp16 variant: the int8 variant has no fp16-activation TensorRT form (export with --precision fp16)")
        return None
    t0 = time.perf_counter()
    vision_to_fp16(tmp / "vision.onnx", tmp / "vision_fp16.onnx")
    if cfg.decoder_dtype == "fp16":
        decoder = decoder_spec
    else:
        quantize_decoder_weights(bundle / fp16.decoder.file, tmp / "decoder_fp16.onnx")
        decoder = _int8_spec(fp16.decoder, tmp / "decoder_fp16.onnx")
    log(f"TensorRT form (fp16 activations, int8 Q/DQ) written in {time.perf_counter() - t0:.1f}s")
    return GraphForm(_int8_spec(vision_spec, tmp / "vision_fp16.onnx"), decoder, fp16.embedding)


def _evaluate(manifest: Manifest, bundle: Path, fp32: Variant, pixel_values: np.ndarray, tmp: Path,
              vision_spec: GraphSpec, decoder_spec: GraphSpec, embedding: str, threads: int | None,
              trt_form: GraphForm | None = None) -> tuple[dict[str, Any], RecordingRunner | None]:
    """int8 vs fp32 on the first crops, driven like the runtime: vision, then prefix + keypoint-suffix prefill.

    The fp32 decoder's inputs are recorded: they are the decoder data this calibration is documented with (the
    weight-only decoder itself needs no activation statistics)."""
    if len(pixel_values) == 0:
        return {}, None
    v32 = OrtRunner(bundle / fp32.vision.file, fp32.vision, threads=threads)
    v8 = OrtRunner(tmp / "vision.onnx", vision_spec, threads=threads)
    e32 = np.asarray(v32({"pixel_values": pixel_values})["image_embeds"])
    e8 = np.asarray(v8({"pixel_values": pixel_values})["image_embeds"])
    d32 = RecordingRunner(OrtRunner(bundle / fp32.decoder.file, fp32.decoder, threads=threads))
    d8 = OrtRunner(tmp / "decoder.onnx", decoder_spec, threads=threads)
    p = manifest.prompts
    suffixes = [list(k.suffix_ids) for k in p.keypoints]
    head = list(p.answer_template_ids[:p.digit_positions[0]]) if p.answer_template_ids else []
    ref_table = np.load(bundle / fp32.embedding, mmap_mode="r")
    table = np.load(bundle / embedding, mmap_mode="r")

    def prefill(runner, emb: np.ndarray, tab: np.ndarray) -> np.ndarray:
        out = Decoder(manifest, runner, tab, lambda ids: "").prefill(emb, suffixes, head, Stopwatch())[0]
        return runner.to_numpy(out.logits)

    ref = prefill(d32, e32, ref_table)
    dec_only = prefill(d8, e32, table)
    both = prefill(d8, e8, table)
    last = ref[:, -1].argmax(-1)
    extra = {}
    if trt_form is not None:  # the TensorRT form, run here on onnxruntime CPU
        v16 = OrtRunner(tmp / Path(trt_form.vision.file).name, trt_form.vision, threads=threads)
        e16 = np.asarray(v16({"pixel_values": pixel_values})["image_embeds"])
        d16 = OrtRunner(tmp / Path(trt_form.decoder.file).name, trt_form.decoder, threads=threads)
        t16 = prefill(d16, e16, np.load(bundle / trt_form.embedding, mmap_mode="r")).astype(np.float32)
        extra["tensorrt_form"] = {"image_embeds": _diff(e16, e32), "logits": _diff(t16, ref),
                                  "next_token_agreement": float((t16[:, -1].argmax(-1) == last).mean())}
    return {**extra,
        "persons": int(len(pixel_values)),
        "image_embeds": _diff(e8, e32),
        "logits_decoder_int8": _diff(dec_only, ref),  # fp32 image embeds → int8 decoder
        "logits_int8": _diff(both, ref),  # int8 vision → int8 decoder
        "next_token_agreement": float((both[:, -1].argmax(-1) == last).mean()),
        "note": "in-sample (these crops are also calibration crops); accuracy is COCO AP in benchmarks/",
    }, d32


def _format_evaluation(ev: dict[str, Any]) -> list[str]:
    if not ev:
        return ["int8 vs fp32 check skipped (eval_persons=0)"]
    out = [f"int8 vs fp32 on {ev['persons']} crop(s):"]
    for key in ("image_embeds", "logits_decoder_int8", "logits_int8"):
        d = ev[key]
        out.append(f"  {key:<20} max|diff| {d['max_abs']:.3e} (ref max {d['ref_max_abs']:.3e}), "
                   f"rms rel {d['rms_rel']:.3e}")
    out.append(f"  next-token agreement {ev['next_token_agreement']:.3f}")
    trt = ev.get("tensorrt_form")
    if trt:
        out.append(f"  TensorRT form (fp16 activations): image_embeds rms rel {trt['image_embeds']['rms_rel']:.3e}, "
                   f"logits rms rel {trt['logits']['rms_rel']:.3e}, next-token agreement "
                   f"{trt['next_token_agreement']:.3f}")
    return out


def _artifact(cfg: CalibrationConfig, crops: PersonCrops, calibration_seconds: float, tmp: Path,
              decoder_summary: dict[str, Any], decoder_data: RecordingRunner | None,
              evaluation: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime
    vision = qdq_scales(tmp / "vision.onnx")
    decoder = qdq_scales(tmp / "decoder.onnx")
    vision_hash = crops.sha256
    decoder_hash = decoder_data.sha256 if decoder_data is not None else None
    combined = hashlib.sha256(f"{vision_hash}:{decoder_hash}".encode()).hexdigest()
    return {
        "schema": ARTIFACT_SCHEMA,
        "method": cfg.method,
        "percentile": cfg.percentile if cfg.method == "percentile" else None,
        "samples": int(len(crops.pixel_values)),
        "calibration_seconds": round(calibration_seconds, 3),
        "onnxruntime_version": onnxruntime.__version__,
        "data": {
            "sha256": combined,
            "coco": Path(cfg.coco).name, "seed": cfg.seed, "available_persons": crops.available,
            "vision": {"sha256": vision_hash, "shape": list(crops.pixel_values.shape), "dtype": "float32",
                       "batch_size": cfg.batch_size, "persons": list(crops.sources)},
            "decoder": {
                "sha256": decoder_hash, "persons": evaluation.get("persons", 0),
                "source": "fp32 vision graph + prefix prefill + keypoint-suffix prefill (with the answer head)",
                "calls": decoder_data.summary() if decoder_data is not None else [],
                "used_for": "provenance and the int8-vs-fp32 check; weight-only scales need no activation data",
            },
        },
        "vision": {
            "scheme": "W8A8: int8 symmetric per-output-channel weights, int8 symmetric per-tensor activations "
                      "(Q/DQ on the inputs of MatMul/Gemm/Conv with weights, zero point 0; attention's "
                      "activation x activation MatMuls float)",
            "activations": vision["activations"], "weights": vision["weights"],
            "zero_points_all_zero": vision["zero_points_all_zero"],
        },
        "decoder": {
            "scheme": f"weight-only int8 symmetric per output channel (axis 1), {cfg.decoder_dtype} activations",
            "weights": decoder["weights"], "zero_points_all_zero": decoder["zero_points_all_zero"],
            **decoder_summary,
        },
        "evaluation": evaluation,
    }


def _publish(bundle: Path, manifest: Manifest, tmp: Path, variant: Variant) -> Manifest:
    """Consistent at every step: drop any old variant of this precision from the manifest, swap the folder in,
    then list it."""
    precision = variant.precision
    prefix = precision + "/"
    files = {k: v for k, v in manifest.files.items() if not k.startswith(prefix)}
    variants = {k: v for k, v in manifest.variants.items() if k != precision}
    old = None
    final = bundle / precision
    if precision in manifest.variants or final.exists():
        write_manifest(bundle, dataclasses.replace(manifest, variants=variants, files=files))
        old = bundle / f".{precision}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
    os.replace(tmp, final)
    for p in sorted(final.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(bundle))] = sha256_file(p)
    updated = dataclasses.replace(manifest, schema_version=SCHEMA_VERSION, variants={**variants, precision: variant},
                                  files=dict(sorted(files.items())))
    write_manifest(bundle, updated)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return updated


def graph_bytes(bundle: Path, spec: GraphSpec) -> int:
    return sum((bundle / f).stat().st_size for f in (spec.file, *spec.external_data))


def weight_bytes(bundle: Path, spec: GraphSpec) -> int:
    """Bytes of the graph's initializers (the weights, with scales and zero points) as stored."""
    import onnx
    from onnx import external_data_helper, numpy_helper
    model = onnx.load(str(bundle / spec.file), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            total += int({e.key: e.value for e in t.external_data}["length"])
        elif t.HasField("raw_data"):  # as stored: int4 packs two values per byte
            total += len(t.raw_data)
        else:
            total += numpy_helper.to_array(t).nbytes
    return total


def _sizes(bundle: Path, manifest: Manifest) -> dict[str, int | None]:
    v = manifest.variants
    fp16 = v.get("fp16")
    return {
        "int8_vision_bytes": graph_bytes(bundle, v[PRECISION].vision),
        "fp32_vision_bytes": graph_bytes(bundle, v["fp32"].vision),
        "int8_decoder_bytes": graph_bytes(bundle, v[PRECISION].decoder),
        "fp16_decoder_bytes": graph_bytes(bundle, fp16.decoder) if fp16 else None,
        "int8_decoder_weights": weight_bytes(bundle, v[PRECISION].decoder),
        "fp16_decoder_weights": weight_bytes(bundle, fp16.decoder) if fp16 else None,
    }
