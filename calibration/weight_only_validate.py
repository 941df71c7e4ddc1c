"""Validation of weight-only quantized decoders against PyTorch (needs the `export` extra: torch), in the export's
bounded memory: the checkpoint is read lazily and the references run one LLM layer at a time.

Two references, the export-time validation's inputs and driving (exporter/validate.py): the merged model carrying
the same dequantized weights — a tight check of the graphs (packing, scales, node wiring), which must pass — and the
fp32 model, whose difference is the quantization error (reported, never a failure).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import torch

from exporter.validate import (ValidationError, format_checks, reference_outputs, session_options,
                               validate_variant)
from posellm.lazy_weights import WeightSource, expected_shapes, open_weights
from runtime.manifest import Manifest, Variant
from runtime.memory import trim_heap

from .blockwise import BlockQuantized
from .qdq import QuantizationError
from .segmented import SegmentedRunner, SegmentedSession
from .form_writer import load_weight
from .weight_only import matmul_weights


class DequantizedWeights(WeightSource):
    """`source` with each quantized linear weight replaced by its dequantized value, read when asked for: the
    layer-streamed reference (exporter/validate.py) then runs the model the graphs describe without holding it."""

    def __init__(self, source: WeightSource, by_name: Mapping[str, BlockQuantized]) -> None:
        self.source, self.by_name, self.cfg = source, by_name, source.cfg  # by_name may read lazily: not copied

    def get(self, name: str) -> torch.Tensor:
        bq = self.by_name.get(name)
        if bq is None:
            return self.source.get(name)
        return torch.from_numpy(np.ascontiguousarray(bq.dequantize(np.float32).T))  # graph [in, out] -> [out, in]

    def get_many(self, names) -> dict[str, torch.Tensor]:
        names = list(names)
        out = self.source.get_many(n for n in names if n not in self.by_name)  # the reader's one-pass path
        return {n: out[n] if n in out else self.get(n) for n in names}

    def stored_dtypes(self) -> set[torch.dtype]:
        return self.source.stored_dtypes()


class _Renamed(Mapping[str, BlockQuantized]):
    """`quantized` (graph node → weight, possibly read on demand) under the checkpoint's weight names."""

    def __init__(self, quantized: Mapping[str, BlockQuantized], node_of: dict[str, str]) -> None:
        self.quantized, self.node_of = quantized, node_of

    def __getitem__(self, name: str) -> BlockQuantized:
        return self.quantized[self.node_of[name]]

    def __iter__(self):
        return iter(self.node_of)

    def __len__(self) -> int:
        return len(self.node_of)

    def __contains__(self, name: object) -> bool:
        return name in self.node_of


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def match_weight_names(source: WeightSource, fp32_decoder: Path, nodes: set[str]) -> dict[str, str]:
    """Graph MatMul node → the source's weight name, by value: the fp32 export stores each merged nn.Linear weight
    transposed, bit for bit, so no naming convention between the two is assumed. One weight resident at a time."""
    src = onnx.load(str(fp32_decoder), load_external_data=False)
    base = str(Path(fp32_decoder).parent)
    by_digest = {_digest(load_weight(src, weight, base)): node
                 for node, (_, weight) in matmul_weights(src).items() if node in nodes}
    shapes = expected_shapes(source.cfg)
    out = {}
    for name, meta in shapes.items():
        if name.startswith("llm.") and name.endswith(".weight") and meta.dim() == 2 and "embed_tokens" not in name:
            node = by_digest.get(_digest(source.get(name).numpy().T))
            if node is not None:
                out[node] = name
    missing = sorted(nodes - set(out))
    if missing:
        raise QuantizationError(f"{fp32_decoder}: no linear weight of the checkpoint matches the graph weights of "
                                f"{missing[:3]}; is it the checkpoint this bundle was exported from?")
    return out


class _FusedQdqSession:
    """The blocked-DQ graph as onnxruntime's optimizer leaves it (each DequantizeLinear → MatMul fused into
    MatMulNBits, as _compare_forms runs it), opened when validate_variant first uses it (after its vision session).
    Unfused (the export's fp16 settings: no optimization) every DequantizeLinear runs before the first layer, all the
    dequantized fp16 weights alive at once (0.4 GB per 7B layer; issue #24)."""

    def __init__(self, path: Path, precision: str) -> None:
        self.path, self.precision, self.session = path, precision, None

    def _open(self):
        if self.session is None:
            import onnxruntime as ort
            opts = session_options(self.precision)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        return self.session

    def get_outputs(self):
        return self._open().get_outputs()

    def run(self, names, feeds):
        return self._open().run(names, feeds)


def validate_against_pytorch(checkpoint: Path, manifest: Manifest, bundle: Path, fp32: Variant,
                             quantized: Mapping[str, BlockQuantized], nbits_decoder: Path, shipped_decoder: Path,
                             qdq_decoder: Path, qdq_precision: str, log: Callable[[str], None] = print,
                             segment_layers: int = 1) -> dict[str, Any]:
    """`nbits_decoder`: the MatMulNBits graph at accuracy level 0 (checked tightly); `shipped_decoder`: the
    variant's own graph (its level's int8 activations included), whose difference from fp32 is reported."""
    d = manifest.dims
    digits = manifest.prompts.digit_ids or (0,)
    vision = bundle / fp32.vision.file

    def run(ref, decoder: Path, precision: str):
        # fp32-activation graphs a few layers per session (bit for bit the whole graph's outputs): onnxruntime's
        # level-0 MatMulNBits prepacks the int4 weights as floats, 0.75 GB per 7B layer if the graph ran whole.
        # fp16-activation ones whole (a cut would round the CPU EP's fp32 intermediates to fp16; int4 there).
        runner = (SegmentedRunner(decoder, None, d.num_layers, lambda: session_options(precision), segment_layers)
                  if precision == "fp32" else None)
        try:
            return validate_variant(ref, vision, decoder, precision, d.num_layers, d.num_kv_heads, d.head_dim,
                                    d.logits_positions, digits,
                                    SegmentedSession(runner) if runner else _FusedQdqSession(decoder, precision))
        finally:
            if runner is not None:
                runner.close()
            trim_heap()

    source = open_weights(checkpoint)  # lazy: the references hold one LLM layer at a time, as the export's
    names = match_weight_names(source, bundle / fp32.decoder.file, set(quantized))
    ref_fp32 = reference_outputs(source)
    ref_deq = reference_outputs(DequantizedWeights(source, _Renamed(quantized, {names[n]: n for n in quantized})))
    same = {"matmul_nbits": run(ref_deq, nbits_decoder, "fp32"), "qdq": run(ref_deq, qdq_decoder, qdq_precision)}
    for form, checks in same.items():
        log(format_checks(f"{form} vs torch(dequantized)", checks))
    failed = [f"{form}: {c.output}" for form, checks in same.items() for c in checks if not c.passed]
    if failed:
        raise ValidationError(f"quantized decoder graphs disagree with the PyTorch model carrying the same "
                              f"dequantized weights: {failed[:5]}")
    vs_fp32 = run(ref_fp32, shipped_decoder, "fp32")  # quantization error: reported only
    worst = max((c for c in vs_fp32 if c.output.startswith("logits")), key=lambda c: c.max_abs)
    log(f"matmul_nbits ({shipped_decoder.name}) vs torch(fp32): worst logits max|diff| {worst.max_abs:.3e} "
        f"({worst.output}, ref max {worst.ref_max:.2f}) — the quantization error")
    return {"same_weights": {form: [asdict(c) for c in checks] for form, checks in same.items()},
            "same_weights_tolerances": {"matmul_nbits": "fp32", "qdq": qdq_precision},
            "vs_fp32": [{k: v for k, v in asdict(c).items() if k not in ("passed", "tolerance")} for c in vs_fp32]}
