"""Validation of weight-only quantized decoders against PyTorch (needs the `export` extra: torch).

Two references, the export-time validation's inputs and driving (exporter/validate.py): the merged model carrying
the same dequantized weights — a tight check of the graphs (packing, scales, node wiring), which must pass — and the
fp32 model, whose difference is the quantization error (reported, never a failure).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import torch

from exporter.validate import ValidationError, format_checks, reference_outputs, validate_variant
from posellm.checkpoint import load_checkpoint
from posellm.lazy_weights import InMemoryWeights
from posellm.model import PoseLLM
from runtime.manifest import Manifest, Variant

from .blockwise import BlockQuantized
from .qdq import QuantizationError
from .weight_only import load_weight, matmul_weights


def load_merged(checkpoint: Path) -> PoseLLM:
    model = load_checkpoint(checkpoint).float().eval()
    if model.has_lora():
        model.merge_lora()
    return model


@torch.inference_mode()
def carry_dequantized(model: PoseLLM, fp32_decoder: Path, quantized: Mapping[str, BlockQuantized]) -> int:
    """Replace every quantized linear weight of `model.llm` by its dequantized value; returns how many.

    Graph weights are matched to torch modules by value (the fp32 export stores each nn.Linear weight transposed,
    bit for bit), so no name convention between the two is assumed."""
    src = onnx.load(str(fp32_decoder), load_external_data=False)
    base = str(Path(fp32_decoder).parent)
    by_bytes = {}
    for node, (_, weight) in matmul_weights(src).items():
        if node in quantized:
            by_bytes[np.ascontiguousarray(load_weight(src, weight, base), np.float32).tobytes()] = node
    done = set()
    for module in model.llm.modules():
        if isinstance(module, torch.nn.Linear):
            key = np.ascontiguousarray(module.weight.detach().numpy().T, np.float32).tobytes()
            node = by_bytes.get(key)
            if node is not None:
                module.weight.copy_(torch.from_numpy(quantized[node].dequantize(np.float32).T.copy()))
                done.add(node)
    missing = sorted(set(quantized) - done)
    if missing:
        raise QuantizationError(f"{fp32_decoder}: no torch linear layer matches the graph weights of {missing[:3]}; "
                                "is the checkpoint the one this bundle was exported from?")
    return len(done)


def validate_against_pytorch(checkpoint: Path, manifest: Manifest, bundle: Path, fp32: Variant,
                             quantized: Mapping[str, BlockQuantized], nbits_decoder: Path, shipped_decoder: Path,
                             qdq_decoder: Path, qdq_precision: str, log: Callable[[str], None] = print
                             ) -> dict[str, Any]:
    """`nbits_decoder`: the MatMulNBits graph at accuracy level 0 (checked tightly); `shipped_decoder`: the
    variant's own graph (its level's int8 activations included), whose difference from fp32 is reported."""
    d = manifest.dims
    digits = manifest.prompts.digit_ids or (0,)
    vision = bundle / fp32.vision.file

    def run(ref, decoder: Path, precision: str):
        return validate_variant(ref, vision, decoder, precision, d.num_layers, d.num_kv_heads, d.head_dim,
                                d.logits_positions, digits)

    model = load_merged(checkpoint)
    ref_fp32 = reference_outputs(InMemoryWeights(model))
    carry_dequantized(model, bundle / fp32.decoder.file, quantized)
    ref_deq = reference_outputs(InMemoryWeights(model))
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
