"""One quantized decoder form written weight by weight, as the export streams its weights (exporter/streamed.py).

`FormWriter` opens the source graph's structure (weights stay external), and each `add(node, bq)` turns that
MatMul's quantized weight into the form's nodes and tensors and appends the tensors' bytes to `<graph>.data` at
once: no more than one weight's ints are held, however many weights the graph has. `finish()` writes the graph with
its nodes in the source's order, every other weight streamed across one at a time; a graph whose weights total less
than EXTERNAL_DATA_THRESHOLD is written as one self-contained file instead, as `qdq.save_graph` lays graphs out.

`WrittenWeights` reads a quantized weight back from a written blocked-DequantizeLinear graph when asked for (the
PyTorch validation's dequantized reference), so the ints need not stay in memory until then.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from runtime.onnx_external import EXTERNAL_DATA_THRESHOLD, EXTERNAL_MIN_BYTES

from .blockwise import BlockQuantized
from .qdq import QuantizationError

_ALIGN_MIN_BYTES, _ALIGN = 1 << 20, 1 << 16  # as onnx's writer: large tensors start on 64 KiB (mmap-able)
MS_DOMAIN = "com.microsoft"

# (MatMul node, its weight initializer's name, the quantized weight, activation dtype) -> (nodes, tensors)
Replace = Callable[[onnx.NodeProto, str, BlockQuantized, np.dtype], tuple[list[onnx.NodeProto], list[TensorProto]]]


def read_tensor(t: TensorProto, base: str | Path) -> np.ndarray:
    """A tensor's value, reading external data into a copy: onnx's to_array would load it into the graph's own
    TensorProto, which then keeps every weight read (a 7B graph's 26 GB)."""
    if not external_data_helper.uses_external_data(t):
        return numpy_helper.to_array(t)
    c = TensorProto()
    c.CopyFrom(t)
    return numpy_helper.to_array(c, base_dir=str(base))


def load_weight(model: onnx.ModelProto, name: str, base: str | Path) -> np.ndarray:
    return read_tensor(next(t for t in model.graph.initializer if t.name == name), base)


def graph_dtype(model: onnx.ModelProto, weights) -> np.dtype:
    names = set(weights)
    types = {t.data_type for t in model.graph.initializer if t.name in names}
    if types == {TensorProto.FLOAT}:
        return np.dtype(np.float32)
    if types == {TensorProto.FLOAT16}:
        return np.dtype(np.float16)
    raise QuantizationError(f"MatMul weights have element types {sorted(types)}; expected all float32 or float16")


class FormWriter:
    def __init__(self, src: Path, dst: Path, replace: Replace, opset: int | None = None) -> None:
        from .weight_only import matmul_weights
        self.src, self.dst, self.replace = Path(src), Path(dst), replace
        self.base = str(self.src.parent)
        model = onnx.load(str(src), load_external_data=False)
        if opset is not None and _opset(model) < opset:
            from onnx import version_converter  # rewrites ops whose signature changed; weights stay references
            model = version_converter.convert_version(model, opset)
        self.model = model
        self.weights = matmul_weights(model)  # node -> (activation, weight initializer)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.made: dict[str, tuple[list[onnx.NodeProto], list[TensorProto]]] = {}
        self.data_name = self.dst.name + ".data"
        self._data = open(self.dst.parent / self.data_name, "wb")

    def add(self, node: str, bq: BlockQuantized) -> None:
        if node not in self.weights:
            raise QuantizationError(f"{self.src}: no MatMul named {node!r} (the quantized set is from another graph)")
        if node in self.made:
            raise QuantizationError(f"{self.src}: {node} was quantized twice")
        weight = self.weights[node][1]
        w = self.inits[weight]
        if tuple(w.dims) != bq.q.shape:
            raise QuantizationError(f"{self.src}: {node} weight is {list(w.dims)}, the quantized one "
                                    f"{list(bq.q.shape)}")
        mm = next(n for n in self.model.graph.node if n.name == node)
        nodes, tensors = self.replace(mm, weight, bq, graph_dtype(self.model, [weight]))
        self.made[node] = (nodes, [self._stream(t) for t in tensors])

    def _stream(self, t: TensorProto) -> TensorProto:
        """`t` (inline) moved to the data file: its bytes appended, the proto left holding the reference."""
        size = len(t.raw_data) if t.HasField("raw_data") else 0
        if size < EXTERNAL_MIN_BYTES:
            return t
        offset = self._data.tell()
        if size > _ALIGN_MIN_BYTES and offset % _ALIGN:
            self._data.write(b"\0" * (_ALIGN - offset % _ALIGN))
            offset = self._data.tell()
        self._data.write(t.raw_data)
        # A new, bytes-free proto holds the reference: clearing `t.raw_data` would leave the bytes in the arena
        # protobuf (upb) allocated `t` from, alive while `t` is (every weight's, until finish: 0.23 GB per 7B layer)
        ref = TensorProto(name=t.name, dims=t.dims, data_type=t.data_type, data_location=TensorProto.EXTERNAL)
        for key, val in (("location", self.data_name), ("offset", offset), ("length", size)):
            ref.external_data.add(key=key, value=str(val))
        return ref

    def finish(self) -> dict[str, Any]:
        """Write the graph (nodes in the source's order) and check it; returns the form's summary."""
        graph = self.model.graph
        dtype = graph_dtype(self.model, (self.weights[k][1] for k in self.made))
        nodes, new, replaced = [], [], set()
        for n in graph.node:
            made = self.made.get(n.name) if n.op_type == "MatMul" else None
            if made is None:
                nodes.append(n)
                continue
            nodes += made[0]
            new += made[1]
            replaced.add(n.input[1])
        still_used = {i for n in nodes for i in n.input}
        kept = []
        for t in graph.initializer:  # the weights left float (a norm, lm_head when not quantized): one at a time
            if t.name in replaced and t.name not in still_used:
                continue
            if external_data_helper.uses_external_data(t):
                t = numpy_helper.from_array(read_tensor(t, self.base), t.name)
            kept.append(self._stream(t))
        del graph.initializer[:]
        graph.initializer.extend(kept + new)
        del graph.node[:]
        graph.node.extend(nodes)
        if any(n.domain == MS_DOMAIN for n in nodes) and all(o.domain != MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        self._data.close()
        data = self.dst.parent / self.data_name
        inline = sum(t.ByteSize() for t in graph.initializer)
        if data.stat().st_size + inline < EXTERNAL_DATA_THRESHOLD:  # small graph: one self-contained file
            for t in graph.initializer:
                if external_data_helper.uses_external_data(t):
                    external_data_helper.load_external_data_for_tensor(t, str(self.dst.parent))
                    t.data_location = TensorProto.DEFAULT
                    del t.external_data[:]
            data.unlink()
        onnx.save_model(self.model, str(self.dst))
        onnx.checker.check_model(str(self.dst))
        return {"weights": len(self.made), "activation_dtype": dtype.name, "opset": _opset(self.model)}

    def close(self) -> None:
        """Release the data file (after an error: the caller removes the staging folder)."""
        if not self._data.closed:
            self._data.close()


def _opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


class WrittenWeights(Mapping[str, BlockQuantized]):
    """MatMul node → its BlockQuantized weight, read back from a blocked-DequantizeLinear graph (write_blocked_qdq's
    form: int4/int8 ints, scales in the activation dtype — fp16 values, so exact) one weight per lookup."""

    def __init__(self, qdq_graph: Path) -> None:
        self.base = str(Path(qdq_graph).parent)
        model = onnx.load(str(qdq_graph), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        self._where: dict[str, tuple[TensorProto, TensorProto, int]] = {}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and n.name.endswith("_DequantizeLinear"):
                # no block_size: a per-axis int8 DQ (per output channel: an int4 variant's lm_head)
                block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
                self._where[n.name[:-len("_DequantizeLinear")]] = (inits[n.input[0]], inits[n.input[1]], block)

    def __getitem__(self, node: str) -> BlockQuantized:
        qt, st, block = self._where[node]
        q = read_tensor(qt, self.base)
        bits = 4 if q.dtype == ml_dtypes.int4 else 8
        scales = read_tensor(st, self.base).astype(np.float16)
        if not block:  # per channel: one block spanning every input feature, the same values dequantized
            scales, block = scales.reshape(1, -1), len(q)
        return BlockQuantized(q.astype(np.int8), scales, bits, block)

    def __contains__(self, node: object) -> bool:
        return node in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
