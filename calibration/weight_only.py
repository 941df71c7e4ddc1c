"""Post-hoc rewrites of an exported decoder graph: its MatMul weights → one block-quantized weight set, two forms.

- `write_matmul_nbits`: each `MatMul(x, W)` becomes onnxruntime's `com.microsoft.MatMulNBits(x, B, scales)`
  (fast int4/int8 kernels on the CPU and CUDA EPs). Its `accuracy_level` picks the CPU kernel: 0 dequantizes the
  weights and multiplies in the activation dtype (exactly weight-only, but onnxruntime 1.32's 8-bit fp32 path
  re-expands every weight per call: 15.9x slower than fp32 at Vicuna-7B width); 4 quantizes each block of
  activations to int8 on the fly and uses the int8 dot-product kernels (int8wo 0.62x, int4 0.53x fp32's time at
  that width: `benchmarks/matmul_nbits_width.py`) — onnxruntime-genai's default for CPU int4. The CUDA EP ignores it.
- `write_blocked_qdq`: each weight becomes `DequantizeLinear(q, scales, axis=0, block_size)` (ONNX opset 21,
  int4/int8, scales in the activation dtype) feeding the unchanged MatMul — the ONNX-standard form TensorRT builds as
  weight-only quantization.

The rewrites work on any exported decoder (fp32 or fp16 activations); weights are matched across graphs by their
MatMul node's name, which is the same in every precision's export. Each form is written weight by weight
(`matmul_nbits_writer` / `blocked_qdq_writer`, form_writer.py): quantize adds each weight as soon as it is quantized.
`accumulate` (and `HessianTap`, a runner doing it per call) sums Σ xᵀx of the quantized MatMuls' inputs while the
runtime drives the fp32 decoder on calibration crops (GPTQ's statistics).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.backends.base import GraphRunner
from runtime.manifest import GraphSpec

from .blockwise import BlockQuantized, pack_matmul_nbits
from .form_writer import MS_DOMAIN, FormWriter, load_weight  # noqa: F401 (load_weight: this module's API)
from .qdq import QuantizationError
from .segmented import SegmentedRunner

BLOCKED_DQ_OPSET = 21  # DequantizeLinear's block_size and int4 types


def matmul_weights(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """MatMul node name → (activation input, weight initializer) for every MatMul whose weight is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            if not n.name or n.name in out:
                raise QuantizationError(f"MatMul {n.name!r} has no unique name; cannot match weights across graphs")
            out[n.name] = (n.input[0], n.input[1])
    if not out:
        raise QuantizationError("no MatMul with an initializer weight; is this a decoder graph?")
    return out


ACCURACY_LEVELS = (0, 4)  # MatMulNBits on the CPU EP: 0 = weight-only (float math), 4 = int8 activations per block


def matmul_nbits_writer(src: Path, dst: Path, accuracy_level: int = 0) -> FormWriter:
    """The MatMulNBits form of `src`, written weight by weight (FormWriter.add, then finish)."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizationError(f"accuracy_level={accuracy_level}: expected one of {list(ACCURACY_LEVELS)}")

    def replace(node, weight: str, bq: BlockQuantized, dtype: np.dtype):
        k, n = bq.q.shape
        b = numpy_helper.from_array(pack_matmul_nbits(bq), f"{weight}_Q{bq.bits}")
        s = numpy_helper.from_array(bq.scales.T.reshape(-1).astype(dtype), f"{weight}_scales")  # [N * blocks]
        # no zero_points input: the op's default, 2^(bits-1), is the offset pack_matmul_nbits stores
        op = helper.make_node("MatMulNBits", [node.input[0], b.name, s.name], list(node.output),
                              name=node.name + f"_Q{bq.bits}", domain=MS_DOMAIN, K=k, N=n, bits=bq.bits,
                              block_size=bq.block_size, accuracy_level=accuracy_level)
        return [op], [b, s]

    return FormWriter(src, dst, replace)


def write_matmul_nbits(src: Path, dst: Path, quantized: Mapping[str, BlockQuantized],
                       accuracy_level: int = 0) -> dict[str, Any]:
    summary = _write_all(matmul_nbits_writer(src, dst, accuracy_level), quantized)
    return {**summary, "form": "matmul_nbits", "accuracy_level": accuracy_level}


def _write_all(writer: FormWriter, quantized: Mapping[str, BlockQuantized]) -> dict[str, Any]:
    try:
        for node, bq in quantized.items():
            writer.add(node, bq)
        return writer.finish()
    finally:
        writer.close()


def accuracy_level_twin(src: Path, level: int) -> Path:
    """A copy of a MatMulNBits graph that differs only in its nodes' `accuracy_level`, written beside it so it
    shares its external data file (nothing large is copied). The caller deletes it."""
    model = onnx.load(str(src), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise QuantizationError(f"{src}: no MatMulNBits node")
    for n in nodes:
        kept = [a for a in n.attribute if a.name != "accuracy_level"]
        del n.attribute[:]
        n.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    dst = Path(src).with_name(f"{Path(src).stem}.level{level}.onnx")
    onnx.save_model(model, str(dst))
    return dst


def blocked_qdq_writer(src: Path, dst: Path) -> FormWriter:
    """The blocked-DequantizeLinear form of `src` (opset 21), written weight by weight."""
    def replace(node, weight: str, bq: BlockQuantized, dtype: np.dtype):
        if bq.bits == 8 and np.all(bq.scales == bq.scales[:1]):  # per-channel int8 (an int4 variant's lm_head)
            return _per_axis_int8(node, weight, bq, dtype)
        # onnx packs int4 two per byte, first element in the low nibble (ml_dtypes.int4 arrays)
        q = numpy_helper.from_array(bq.q.astype(ml_dtypes.int4) if bq.bits == 4 else bq.q, f"{weight}_quantized")
        s = numpy_helper.from_array(bq.scales.astype(dtype), f"{weight}_scale")  # [ceil(K / block), N]
        inits = [q, s]
        if bq.bits == 8:
            # an explicit all-zero zero point of the scales' shape: onnxruntime's CPU optimizer otherwise adds a
            # per-tensor one to blocked int8 DQ and then rejects it (measured with onnxruntime 1.32)
            inits.append(numpy_helper.from_array(np.zeros(bq.scales.shape, np.int8), f"{weight}_zero_point"))
        out = f"{weight}_dequantized"
        dq = helper.make_node("DequantizeLinear", [t.name for t in inits], [out],
                              name=f"{node.name}_DequantizeLinear", axis=0, block_size=bq.block_size)
        mm = helper.make_node("MatMul", [node.input[0], out], list(node.output), name=node.name)
        return [dq, mm], inits

    return FormWriter(src, dst, replace, BLOCKED_DQ_OPSET)


def _per_axis_int8(node, weight: str, bq: BlockQuantized, dtype: np.dtype):
    """One scale per column in every block: written as per-axis DequantizeLinear (scale [N], axis 1), the int8
    weight form TensorRT imports (it blocks INT4 only), dequantizing to exactly the blocked values."""
    inits = [numpy_helper.from_array(bq.q, f"{weight}_quantized"),
             numpy_helper.from_array(bq.scales[0].astype(dtype), f"{weight}_scale"),
             numpy_helper.from_array(np.zeros(bq.scales.shape[1], np.int8), f"{weight}_zero_point")]
    out = f"{weight}_dequantized"
    dq = helper.make_node("DequantizeLinear", [t.name for t in inits], [out], name=f"{node.name}_DequantizeLinear",
                          axis=1)
    return [dq, helper.make_node("MatMul", [node.input[0], out], list(node.output), name=node.name)], inits


def write_blocked_qdq(src: Path, dst: Path, quantized: Mapping[str, BlockQuantized]) -> dict[str, Any]:
    return {**_write_all(blocked_qdq_writer(src, dst), quantized), "form": "blocked_qdq"}


# ------------------------------------------------------------------------------------------ calibration tap
def accumulate(hessians: dict[str, np.ndarray], tokens: dict[str, int], acts: Mapping[str, Any],
               attention_mask) -> None:
    """Σ xᵀx (float64) of one decoder call's MatMul inputs, over the tokens the attention mask marks real."""
    mask = np.asarray(attention_mask).astype(bool)
    for a in sorted(acts):
        x = np.asarray(acts[a], dtype=np.float64)
        if x.ndim == 3 and x.shape[:2] == (mask.shape[0], min(mask.shape[1], x.shape[1])):
            x = x[mask[:, -x.shape[1]:]]  # drop left-padding positions
        x = x.reshape(-1, x.shape[-1])
        hessians[a] = hessians.get(a, 0) + x.T @ x
        tokens[a] = tokens.get(a, 0) + len(x)


class HessianTap(GraphRunner):
    """A decoder runner that also returns every quantized MatMul's input and accumulates Σ xᵀx per input tensor
    (q/k/v share one), over the tokens the attention mask marks real. The decoder runs `layers_per_segment` LLM
    layers at a time (segmented.py): one segment's fp32 weights resident, never the whole decoder's."""

    def __init__(self, path: Path, spec: GraphSpec, nodes: Mapping[str, str], num_layers: int,
                 threads: int | None = None, layers_per_segment: int = 1) -> None:
        from runtime.backends.onnxruntime import session_options
        self.spec = spec
        self.acts = acts = sorted(set(nodes.values()))
        self.inner = SegmentedRunner(Path(path), spec, num_layers, lambda: session_options(threads),
                                     layers_per_segment, taps=acts)
        self.inner.check = False
        self.hessians: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.calls = 0

    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        outs = self.inner(inputs)
        self.calls += 1
        accumulate(self.hessians, self.tokens, {a: outs.pop(a) for a in self.acts}, inputs["attention_mask"])
        return outs

    def close(self) -> None:
        self.inner.close()
