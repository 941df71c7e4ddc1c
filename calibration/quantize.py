"""`posellm-edge quantize`: add a weight-only block-quantized decoder variant (`int4`, `int8wo`) to a bundle.

The decoder's linear layers (q/k/v/o, gate/up/down, optionally lm_head) are quantized once — round-to-nearest, or
GPTQ on the second moments of their inputs while the fp32 graphs decode real COCO person crops — and written in two
graph forms from that one weight set (see weight_only.py): onnxruntime's MatMulNBits from the fp32 decoder (the
variant's own decoder: CPU/CUDA EPs) and blocked DequantizeLinear from the fp16 decoder (its `tensorrt` form: fp16
activations, as TensorRT runs fastest). The vision graph is not quantized: the variant points at the fp32 (and, for
TensorRT, fp16) vision graph already in the bundle.

Checks written to `<variant>/quantization.json`: the two forms against each other and both against fp32 on the
runtime's prefill, GPTQ's and RTN's activation-weighted weight error side by side, and — with a checkpoint — the
graphs against the PyTorch model carrying the same dequantized weights (tight: it checks the graphs) and against the
fp32 model (reported: that is the quantization error).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from runtime.backends.base import GraphRunner, Stopwatch
from runtime.backends.onnxruntime import OrtRunner, session_options
from runtime.decoding import Decoder
from runtime.errors import InputError
from runtime.manifest import GraphForm, GraphSpec, Manifest, Variant, load_manifest, sha256_file
from runtime.memory import (current_rss_bytes, no_heap_hugepages, peak_rss_bytes, peak_rss_context, reset_peak_rss,
                            trim_heap)

from .blockwise import BITS, BLOCK_SIZES, quantize_rtn
from .calibrate import _diff, _int8_spec, _publish, weight_bytes
from .qdq import QuantizationError
from .form_writer import WrittenWeights, load_weight
from .gptq_statistics import Calibration, gptq_handed_over, layer_groups, output_error
from .segmented import SegmentedRunner
from .weight_only import (ACCURACY_LEVELS, accuracy_level_twin, blocked_qdq_writer, matmul_nbits_writer,
                          matmul_weights)

METHODS = ("gptq", "rtn")
# Level 4 vs level 0 on the same weights: per-block int8 activations moved the shipped model's prefill logits by
# 1.8% (int8wo) and 2.4% (int4) of max|logits|; a broken kernel or layout moves them by ~100%. A sanity bound,
# not a quality gate (that is eval's token agreement and ΔAP).
ACTIVATION_QUANT_BOUND = 0.10
ARTIFACT_SCHEMA = 1


@dataclass(frozen=True)
class QuantizeConfig:
    bundle: Path
    coco: Path | None = None  # COCO person-keypoints file: its GT boxes give the crops (gptq only)
    images: Path | None = None
    bits: int = 4
    block_size: int = 64  # input features per scale
    method: str = "gptq"
    samples: int = 16  # persons decoded (template) through the fp32 graphs for GPTQ's statistics
    lm_head: bool = True  # quantize lm_head too (the largest single matrix of a small-vocab model)
    # lm_head's own weight bits: 8 by default. It is the most sensitive matrix (on the shipped model a 4-bit lm_head
    # alone moved 1.2 px per keypoint, more than any decoder layer's), and the usual int4 recipes keep it wider
    # (GPTQ/AWQ leave it in fp16, llama.cpp's Q4_K_M at 6 bits). At 7B it is 2% of the decoder's weights: its int4
    # decoder becomes 0.271 of fp16's bytes instead of 0.266 (the per-layer ratio is unchanged).
    lm_head_bits: int = 8
    # MatMulNBits' CPU kernel (weight_only.py): 4 = int8 activations per block (fast), 0 = float math (weight-only)
    accuracy_level: int = 4
    name: str | None = None  # variant name; default int4 / int8wo
    checkpoint: Path | None = None  # validate against the PyTorch model carrying the dequantized weights
    damp: float = 0.01
    seed: int = 0
    overwrite: bool = False
    threads: int | None = None
    # Bounded memory at 7B (issue #24): the fp32 and MatMulNBits decoders run this many LLM layers per onnxruntime
    # session (segmented.py), and GPTQ holds the input statistics of this many layers at a time (float64 Σ xᵀx:
    # 1.4 GB per Vicuna-7B layer), replayed from one recorded calibration decoding (Calibration).
    segment_layers: int = 1
    hessian_layers: int = 1

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InputError(f"bits={self.bits}: expected one of {list(BITS)}")
        if self.lm_head_bits not in BITS:
            raise InputError(f"lm_head_bits={self.lm_head_bits}: expected one of {list(BITS)}")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"block_size={self.block_size}: expected one of {list(BLOCK_SIZES)}")
        if self.method not in METHODS:
            raise InputError(f"method={self.method!r}: expected one of {list(METHODS)}")
        if self.method == "gptq" and (self.coco is None or self.images is None):
            raise InputError("method='gptq' needs calibration crops: pass --coco and --images (or --method rtn)")
        if self.segment_layers < 1 or self.hessian_layers < 1:
            raise InputError(f"segment_layers={self.segment_layers}, hessian_layers={self.hessian_layers}: "
                             "expected >= 1")
        if self.samples < 1:
            raise InputError(f"samples={self.samples}: expected >= 1")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise InputError(f"accuracy_level={self.accuracy_level}: expected one of {list(ACCURACY_LEVELS)}")
        if self.name is not None and (not self.name.isidentifier() or self.name in ("fp32", "fp16", "int8")):
            raise InputError(f"name={self.name!r}: expected a new identifier-like variant name")

    @property
    def variant(self) -> str:
        return self.name or ("int4" if self.bits == 4 else "int8wo")


@dataclass(frozen=True)
class QuantizeResult:
    bundle: Path
    variant: Variant
    artifact: dict[str, Any]
    seconds: float


def quantize_bundle(cfg: QuantizeConfig, log: Callable[[str], None] = print) -> QuantizeResult:
    with no_heap_hugepages():  # issue #24: freed solve buffers must not stay resident as huge pages
        return _quantize_bundle(cfg, log)


def _quantize_bundle(cfg: QuantizeConfig, log: Callable[[str], None]) -> QuantizeResult:
    start = time.perf_counter()
    baseline_rss = current_rss_bytes()
    bundle = Path(cfg.bundle)
    manifest = load_manifest(bundle, verify=True)
    name = cfg.variant
    if name in manifest.variants and not cfg.overwrite:
        raise InputError(f"{bundle} already has a {name} variant; pass --overwrite to replace it")
    fp32 = manifest.variant("fp32")  # the master weights, and the source of the MatMulNBits form
    fp16 = manifest.variants.get("fp16")  # source of the TensorRT form (fp16 activations) when present
    src32 = onnx.load(str(bundle / fp32.decoder.file), load_external_data=False)
    nodes = matmul_weights(src32)
    vocab = manifest.dims.vocab_size  # lm_head is the MatMul whose outputs are the vocabulary
    dims = {t.name: t.dims for t in src32.graph.initializer}
    outputs = {n: dims[aw[1]][-1] for n, aw in nodes.items()}
    chosen = {n: aw for n, aw in nodes.items() if cfg.lm_head or outputs[n] != vocab}
    bits = {n: cfg.lm_head_bits if outputs[n] == vocab else cfg.bits for n in chosen}
    # a wider lm_head in a 4-bit variant is quantized per output channel: TensorRT imports int8 weights per channel
    # only (exporter/trt_ops.py), and the MatMulNBits form then carries the column's scale in every block
    per_channel = {n: bits[n] == 8 and cfg.bits == 4 for n in chosen}

    phases: dict[str, int] = {}  # peak RSS of each step (VmHWM, restarted after each)

    def phase(label: str) -> None:
        phases[label] = max(phases.get(label, 0), peak_rss_bytes())
        reset_peak_rss()

    tmp = bundle / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    calibration = None
    try:
        phase("setup")
        trt_source = fp16 or fp32
        base = str((bundle / fp32.decoder.file).parent)
        data: dict[str, Any] = {}
        errors: dict[str, dict[str, float]] = {}
        shapes: dict[str, list[int]] = {}
        # Both forms are written weight by weight as each is quantized: one weight's ints in memory at a time.
        stats_s = quant_s = 0.0
        writers = {"onnxruntime": matmul_nbits_writer(bundle / fp32.decoder.file, tmp / "decoder.onnx",
                                                      cfg.accuracy_level),
                   "tensorrt": blocked_qdq_writer(bundle / trt_source.decoder.file, tmp / "decoder_qdq.onnx")}
        try:
            if cfg.coco is not None and cfg.images is not None:
                t0 = time.perf_counter()
                calibration = Calibration(cfg, manifest, bundle, fp32, {aw[0] for aw in chosen.values()},
                                          bundle / f".{name}.calibration-{os.getpid()}")
                stats_s += time.perf_counter() - t0
                phase("calibration decoding (recorded)")
            groups = layer_groups(list(chosen), manifest.dims.num_layers, cfg.hessian_layers)
            # RSS when each group begins and its peak: within one run, what a layer adds for good (a drift of the
            # start) is told apart from what it needs while it is quantized (the peak above the start)
            group_rss: dict[str, list[int]] = {"start": [], "peak": []}
            for group in groups:
                group_rss["start"].append(current_rss_bytes())
                group_peak = 0
                hessians: dict[str, np.ndarray] = {}
                if calibration is not None:  # this group's input statistics only (one decoding pass)
                    t0 = time.perf_counter()
                    hessians = calibration.collect({chosen[n][0] for n in group})
                    stats_s += time.perf_counter() - t0
                    group_peak = peak_rss_bytes()
                    phase("statistics replayed (per group)")
                t0 = time.perf_counter()
                last_use = {chosen[n][0]: n for n in group}  # q/k/v share an input: freed after the last of them
                for node in group:
                    act, weight = chosen[node]
                    w = load_weight(src32, weight, base).astype(np.float32, copy=False)
                    rtn = quantize_rtn(w, bits[node], cfg.block_size, node, per_channel[node])
                    error = {"rtn": output_error(w, rtn, hessians[act])} if act in hessians else {}
                    last = last_use.get(act) == node
                    gptq = None
                    if cfg.method == "gptq":
                        gptq = gptq_handed_over(w, hessians, act, last, tmp / "hessian.npy", bits[node], node,
                                                per_channel[node], cfg)
                        error["gptq"] = output_error(w, gptq, hessians.pop(act) if last else hessians[act])
                    chosen_q = gptq if gptq is not None else rtn
                    for writer in writers.values():
                        writer.add(node, chosen_q)
                    shapes[node] = list(chosen_q.q.shape)
                    if error:  # the output error each method leaves on the calibration activations
                        errors[node] = error
                    del w, rtn, gptq, chosen_q
                    if last:
                        hessians.pop(act, None)
                del hessians
                trim_heap()  # the group's freed statistics and solve buffers leave the RSS
                group_rss["peak"].append(max(group_peak, peak_rss_bytes()))
                phase("weights quantized and written (per group)")
                quant_s += time.perf_counter() - t0
            if calibration is not None:
                data = calibration.summary()
                log(f"collected input statistics of {len(chosen)} decoder MatMuls from {data['persons']} persons "
                    f"({data['decoder_calls']} decoder calls, recorded ({data['recorded_gb']} GB) and replayed "
                    f"{data['passes']} times, {cfg.hessian_layers} layer(s) each) in {stats_s:.1f}s")
            cpu_form = {**writers["onnxruntime"].finish(), "form": "matmul_nbits",
                        "accuracy_level": cfg.accuracy_level}
            trt_form = {**writers["tensorrt"].finish(), "form": "blocked_qdq"}
            phase("forms finished")
        finally:
            for writer in writers.values():
                writer.close()
            if calibration is not None:
                calibration.close()
        log(f"quantized {len(shapes)} weights ({cfg.method}, int{cfg.bits}, block {cfg.block_size}) in "
            f"{quant_s:.1f}s, written as they came")
        for key in ("rtn", "gptq"):
            vals = [e[key] for e in errors.values() if key in e]
            if vals:
                log(f"  {key}: mean relative output error ||X(W - Wq)|| / ||XW|| over the calibration tokens "
                    f"{np.mean(vals):.4f} (max {np.max(vals):.4f})")
        decoder_spec = _int8_spec(fp32.decoder, tmp / "decoder.onnx", name)
        qdq_spec = _int8_spec(trt_source.decoder, tmp / "decoder_qdq.onnx", name)
        # Exactness checks run on the weight-only twin (accuracy level 0: same file, same weights, float math);
        # what the shipped level adds — int8 activations — is measured against that twin on its own.
        shipped = tmp / "decoder.onnx"
        exact = shipped if cfg.accuracy_level == 0 else accuracy_level_twin(shipped, 0)
        try:
            checks = _compare_forms(manifest, bundle, fp32, trt_source, exact, shipped, tmp / "decoder_qdq.onnx",
                                    decoder_spec, qdq_spec, cfg)
            log(f"forms on onnxruntime CPU (prefill logits, {checks['persons']} persons): "
                f"MatMulNBits vs Q/DQ ({trt_form['activation_dtype']}) max|diff| "
                f"{checks['matmul_nbits_vs_qdq']['max_abs']:.3e}; MatMulNBits vs fp32 "
                f"{checks['matmul_nbits_vs_fp32']['max_abs']:.3e} "
                f"(ref max {checks['matmul_nbits_vs_fp32']['ref_max_abs']:.2f})")
            if "activation_quantization" in checks:
                a = checks["activation_quantization"]
                log(f"accuracy level {cfg.accuracy_level} (int8 activations) vs level 0: max|diff| "
                    f"{a['max_abs']:.3e} ({a['max_abs'] / a['ref_max_abs']:.2%} of max|logits|), last-position "
                    f"argmax agreement {checks['argmax_agreement_shipped_vs_level0']:.3f}")
                if a["max_abs"] > ACTIVATION_QUANT_BOUND * a["ref_max_abs"]:
                    raise QuantizationError(
                        f"accuracy level {cfg.accuracy_level}: the int8-activation kernels move the prefill logits by "
                        f"{a['max_abs']:.3e}, more than {ACTIVATION_QUANT_BOUND:.0%} of max|logits| "
                        f"({a['ref_max_abs']:.3e}); use --accuracy-level 0")
            phase("forms compared on onnxruntime")
            validation = None
            if cfg.checkpoint is not None:
                from .weight_only_validate import validate_against_pytorch
                validation = validate_against_pytorch(Path(cfg.checkpoint), manifest, bundle, fp32,
                                                      WrittenWeights(tmp / "decoder_qdq.onnx"),
                                                      exact, shipped, tmp / "decoder_qdq.onnx",
                                                      "fp16" if fp16 else "fp32", log, cfg.segment_layers)
                phase("validated against PyTorch")
        finally:
            if exact != shipped:
                exact.unlink(missing_ok=True)
        artifact = {
            "schema": ARTIFACT_SCHEMA, "variant": name, "method": cfg.method, "bits": cfg.bits,
            "block_size": cfg.block_size, "symmetric": True, "scale_dtype": "float16", "lm_head": cfg.lm_head,
            "lm_head_bits": cfg.lm_head_bits if cfg.lm_head else None,
            "damp": cfg.damp if cfg.method == "gptq" else None, "data": data,
            "forms": {"onnxruntime": {**cpu_form, "file": decoder_spec.file},
                      "tensorrt": {**trt_form, "file": qdq_spec.file}},
            "weights": {n: {"shape": shape, "bits": bits[n], **errors.get(n, {})} for n, shape in shapes.items()},
            "output_error": {k: float(np.mean([e[k] for e in errors.values() if k in e]))
                             for k in ("rtn", "gptq") if any(k in e for e in errors.values())},
            "checks": checks, "validation": validation,
            "sizes": decoder_sizes(bundle, fp16, tmp, {"onnxruntime": decoder_spec, "tensorrt": qdq_spec}),
            # the process's peak RSS so far (quantize's own when it runs alone, as the CLI does) and its seconds
            "peak_rss_bytes": max([peak_rss_bytes(), *phases.values()]),
            "peak_rss_gb_by_step": {k: round(v / 1e9, 3) for k, v in phases.items()},
            "rss_gb_by_group": {k: [round(v / 1e9, 3) for v in vals] for k, vals in group_rss.items()},
            "seconds": round(time.perf_counter() - start, 2),
            "baseline_rss_bytes": baseline_rss,  # RSS when quantize began: the floor of the peak
            # the files this step writes for the variant (both decoder forms; vision and embedding are fp32's)
            "bytes_written": sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
        }
        (tmp / "quantization.json").write_text(json.dumps(artifact, indent=1, sort_keys=True) + "\n")
        variant = Variant(
            precision=name, vision=fp32.vision, decoder=decoder_spec, embedding=fp32.embedding,
            calibration={"artifact": f"{name}/quantization.json",
                         "sha256": sha256_file(tmp / "quantization.json"), "method": cfg.method,
                         "samples": data.get("persons", 0), "data_sha256": data.get("sha256"),
                         "decoder": f"weight-only int{cfg.bits} symmetric, block {cfg.block_size} along the input "
                                    f"features, fp16 scales"
                                    f"{_lm_head_note(cfg)}; "
                                    f"MatMulNBits accuracy level {cfg.accuracy_level}"
                                    f"{' (int8 activations on the CPU EP)' if cfg.accuracy_level == 4 else ''}"},
            tensorrt=GraphForm(trt_source.vision, qdq_spec, trt_source.embedding))
        manifest = _publish(bundle, manifest, tmp, variant)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = artifact["sizes"]
    for form in ("onnxruntime", "tensorrt"):
        ratio = sizes[f"{form}_ratio_vs_fp16"]
        if ratio is not None:
            log(f"{name} decoder ({form} form): {sizes[f'{form}_weight_bytes']} weight bytes = {ratio:.3f}x fp16")
    seconds = time.perf_counter() - start
    written, peak = artifact["bytes_written"], artifact["peak_rss_bytes"]
    log("peak RSS by step: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in phases.items()))
    log(f"{name} variant written in {seconds:.1f}s: {written / 1e6:.1f} MB written, peak RSS {peak / 1e9:.2f} GB "
        f"({peak_rss_context(peak, written, baseline_rss)})")
    return QuantizeResult(bundle, manifest.variants[name], artifact, seconds)


def decoder_sizes(bundle: Path, fp16: Variant | None, staged: Path, forms: dict[str, GraphSpec]) -> dict[str, Any]:
    """Weight (initializer) bytes of each form's decoder, staged in `staged` before publishing, vs the fp16 one."""
    ref = weight_bytes(bundle, fp16.decoder) if fp16 else None
    out: dict[str, Any] = {"fp16_weight_bytes": ref}
    for form, spec in forms.items():
        b = weight_bytes(staged, dataclasses.replace(spec, file=Path(spec.file).name))
        out[f"{form}_weight_bytes"] = b
        out[f"{form}_ratio_vs_fp16"] = round(b / ref, 4) if ref else None
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def _lm_head_note(cfg: QuantizeConfig) -> str:
    if not cfg.lm_head:
        return ", lm_head float"
    if cfg.lm_head_bits == cfg.bits:
        return ", lm_head included"
    return f", lm_head int{cfg.lm_head_bits}{' per output channel' if cfg.bits == 4 else ''}"


def _decoder_runner(path: Path, spec: GraphSpec, manifest: Manifest, cfg: QuantizeConfig) -> GraphRunner:
    """fp32-activation decoders run a few layers per session (bit for bit the whole graph's outputs). An
    fp16-activation one runs whole: onnxruntime's CPU EP computes its fp16 nodes in fp32 and keeps the values in
    fp32 between them, which a cut would round to fp16 — and its weights are int4 there, the variant's own size."""
    if next(t.dtype for t in spec.inputs if t.name == "inputs_embeds") != "float32":
        return OrtRunner(path, spec, threads=cfg.threads)
    return SegmentedRunner(path, spec, manifest.dims.num_layers, lambda: session_options(cfg.threads),
                           cfg.segment_layers)


def _compare_forms(manifest: Manifest, bundle: Path, fp32: Variant, trt_source: Variant, exact: Path, shipped: Path,
                   qdq: Path, decoder_spec: GraphSpec, qdq_spec: GraphSpec, cfg: QuantizeConfig) -> dict[str, Any]:
    """Prefill logits (prefix + keypoint suffixes with the answer head) of both forms and of fp32, on onnxruntime
    CPU, for synthetic image embeddings of two persons (the forms are compared, not the vision graph). `exact` is
    the MatMulNBits graph at accuracy level 0; `shipped` the variant's own (the same file when its level is 0)."""
    persons = min(2, manifest.max_persons)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((persons, manifest.dims.num_patches, manifest.dims.hidden_size)).astype(np.float32)
    p = manifest.prompts
    suffixes = [list(k.suffix_ids) for k in p.keypoints]
    head = list(p.answer_template_ids[:p.digit_positions[0]]) if p.answer_template_ids else []

    def prefill(file: Path, spec: GraphSpec, embedding: str) -> np.ndarray:
        runner = _decoder_runner(file, spec, manifest, cfg)
        try:
            table = np.load(bundle / embedding, mmap_mode="r")
            out = Decoder(manifest, runner, table, lambda ids: "").prefill(embeds.astype(table.dtype), suffixes,
                                                                          head, Stopwatch())[0]
            return runner.to_numpy(out.logits).astype(np.float32)
        finally:
            if isinstance(runner, SegmentedRunner):
                runner.close()  # its segment graphs sit beside the decoder (in the staging folder too)

    ref = prefill(bundle / fp32.decoder.file, fp32.decoder, fp32.embedding)
    nbits = prefill(exact, decoder_spec, fp32.embedding)
    qdq_logits = prefill(qdq, qdq_spec, trt_source.embedding)
    out = {"persons": persons, "inputs": "synthetic image embeddings (seed 0), the bundle's 17 keypoint prompts",
           "matmul_nbits_vs_qdq": _diff(qdq_logits, nbits), "matmul_nbits_vs_fp32": _diff(nbits, ref),
           "qdq_vs_fp32": _diff(qdq_logits, ref),
           "argmax_agreement_nbits_qdq": float((nbits[:, -1].argmax(-1) == qdq_logits[:, -1].argmax(-1)).mean())}
    if shipped != exact:
        ours = prefill(shipped, decoder_spec, fp32.embedding)
        out["activation_quantization"] = _diff(ours, nbits)
        out["shipped_vs_fp32"] = _diff(ours, ref)
        out["argmax_agreement_shipped_vs_level0"] = float((ours[:, -1].argmax(-1) == nbits[:, -1].argmax(-1)).mean())
    return out
