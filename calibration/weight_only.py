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
MatMul node's name, which is the same in every precision's export. `HessianTap` records Σ xᵀx of every quantized
MatMul's input while the runtime drives the fp32 decoder on calibration crops (GPTQ's statistics).
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.backends.base import GraphRunner
from runtime.backends.onnxruntime import OrtRunner
from runtime.manifest import GraphSpec

from .blockwise import BlockQuantized, pack_matmul_nbits
from .qdq import QuantizationError, save_graph, set_initializers

BLOCKED_DQ_OPSET = 21  # DequantizeLinear's block_size and int4 types
MS_DOMAIN = "com.microsoft"


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


def load_weight(model: onnx.ModelProto, name: str, base: str) -> np.ndarray:
    t = next(t for t in model.graph.initializer if t.name == name)
    return numpy_helper.to_array(t, base_dir=base)


def _graph_dtype(model: onnx.ModelProto, weights: Iterable[str]) -> np.dtype:
    names = set(weights)
    types = {t.data_type for t in model.graph.initializer if t.name in names}
    if types == {TensorProto.FLOAT}:
        return np.dtype(np.float32)
    if types == {TensorProto.FLOAT16}:
        return np.dtype(np.float16)
    raise QuantizationError(f"MatMul weights have element types {sorted(types)}; expected all float32 or float16")


def _rewrite(src: Path, dst: Path, quantized: Mapping[str, BlockQuantized], opset: int | None,
             replace) -> dict[str, Any]:
    """Shared frame of both forms: load, call `replace(node, weight, bq, dtype)` → (new nodes, new initializers)
    for every quantized MatMul, drop the float weights, inline the small remaining initializers, save, check."""
    model = onnx.load(str(src), load_external_data=False)
    base = str(Path(src).parent)
    if opset is not None and _opset(model) < opset:
        from onnx import version_converter  # rewrites ops whose signature changed; weights stay references
        model = version_converter.convert_version(model, opset)
    graph = model.graph
    weights = matmul_weights(model)
    missing = sorted(set(quantized) - set(weights))
    if missing:
        raise QuantizationError(f"{src}: no MatMul named {missing[:3]} (the quantized set is from another graph)")
    dtype = _graph_dtype(model, (weights[k][1] for k in quantized))
    nodes, new_inits, replaced = [], [], set()
    for node in graph.node:
        bq = quantized.get(node.name) if node.op_type == "MatMul" else None
        if bq is None:
            nodes.append(node)
            continue
        w = next(t for t in graph.initializer if t.name == node.input[1])
        if tuple(w.dims) != bq.q.shape:
            raise QuantizationError(f"{src}: {node.name} weight is {list(w.dims)}, the quantized one "
                                    f"{list(bq.q.shape)}")
        made, inits = replace(node, node.input[1], bq, dtype)
        nodes += made
        new_inits += inits
        replaced.add(node.input[1])
    still_used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name not in replaced or t.name in still_used]
    set_initializers(graph, kept, new_inits, base)
    del graph.node[:]
    graph.node.extend(nodes)
    if any(n.domain == MS_DOMAIN for n in nodes) and all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    save_graph(model, Path(dst))
    onnx.checker.check_model(str(dst))
    return {"weights": len(quantized), "activation_dtype": dtype.name, "opset": _opset(model)}


ACCURACY_LEVELS = (0, 4)  # MatMulNBits on the CPU EP: 0 = weight-only (float math), 4 = int8 activations per block


def write_matmul_nbits(src: Path, dst: Path, quantized: Mapping[str, BlockQuantized],
                       accuracy_level: int = 0) -> dict[str, Any]:
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

    summary = _rewrite(src, dst, quantized, None, replace)
    return {**summary, "form": "matmul_nbits", "accuracy_level": accuracy_level}


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


def write_blocked_qdq(src: Path, dst: Path, quantized: Mapping[str, BlockQuantized]) -> dict[str, Any]:
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

    summary = _rewrite(src, dst, quantized, BLOCKED_DQ_OPSET, replace)
    return {**summary, "form": "blocked_qdq"}


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


def _opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


# ------------------------------------------------------------------------------------------ calibration tap
class HessianTap(GraphRunner):
    """A decoder runner that also returns every quantized MatMul's input and accumulates Σ xᵀx per input tensor
    (q/k/v share one), over the tokens the attention mask marks real."""

    def __init__(self, path: Path, spec: GraphSpec, nodes: Mapping[str, str], threads: int | None = None) -> None:
        self.spec = spec
        model = onnx.load(str(path), load_external_data=False)
        acts = sorted(set(nodes.values()))
        model.graph.output.extend(helper.make_tensor_value_info(a, TensorProto.FLOAT, None) for a in acts)
        # Written beside the source graph (a hidden temp name), never in a temp folder: onnxruntime refuses external
        # data outside a model's own folder, symlinked or not, and a 7B decoder's weights are external data.
        fd, name = tempfile.mkstemp(prefix=f".{Path(path).stem}.tap-", suffix=".onnx", dir=Path(path).parent)
        os.close(fd)
        self._tapped = Path(name)
        try:
            onnx.save_model(model, name)
            self.inner = OrtRunner(self._tapped, spec, threads=threads)
        except BaseException:
            self._tapped.unlink(missing_ok=True)
            raise
        self.inner.check = False
        self.acts = acts
        self.hessians: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = defaultdict(int)
        self.calls = 0

    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        outs = self.inner(inputs)
        self.calls += 1
        mask = np.asarray(inputs["attention_mask"]).astype(bool)
        for a in self.acts:
            x = np.asarray(outs.pop(a), dtype=np.float64)
            if x.ndim == 3 and x.shape[:2] == (mask.shape[0], min(mask.shape[1], x.shape[1])):
                x = x[mask[:, -x.shape[1]:]]  # drop left-padding positions
            x = x.reshape(-1, x.shape[-1])
            self.hessians[a] = self.hessians.get(a, 0) + x.T @ x
            self.tokens[a] += len(x)
        return outs

    def close(self) -> None:
        self._tapped.unlink(missing_ok=True)
