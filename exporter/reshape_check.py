"""Static check that every Reshape in an exported graph is valid under the ONNX spec, not just under onnxruntime.

The spec (Reshape-14): at most one target dimension may be -1, and with `allowzero=1` a -1 must not appear together
with a 0 (the inferred size would be ambiguous). onnxruntime's CPU kernel quietly resolves such a -1 anyway, while
TensorRT's shuffle layer and `onnx.reference` reject it — so a graph can pass every onnxruntime test and still fail
on the device. Target shapes are usually computed (Shape → Gather → Unsqueeze → Concat), so each element is
tracked as an integer interval: constants exactly, graph dims from the exported dynamic ranges, arithmetic by
interval rules, anything else as "unknown, may be 0". A -1 under `allowzero=1` is accepted only beside elements
proven >= 1.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import onnx
from onnx import numpy_helper

Interval = tuple[int, Optional[int]]  # [lo, hi], hi None = unbounded
UNKNOWN: Interval = (-1, None)  # may be anything the spec allows in a shape tensor, 0 and -1 included


def reshape_problems(model: onnx.ModelProto, dim_ranges: Mapping[str, tuple[int, int]] | None = None) -> list[str]:
    """One line per spec-invalid (or not provably valid) Reshape; empty when every Reshape is fine.

    `dim_ranges` gives the [min, max] of the graph's symbolic dims (the manifest's dynamic ranges); a symbolic dim
    without a range counts as possibly 0.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list] = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = list(v.type.tensor_type.shape.dim)
    return _Checker(model.graph, shapes, dict(dim_ranges or {})).problems()


class _Checker:
    def __init__(self, graph: onnx.GraphProto, shapes: dict[str, list], ranges: dict[str, tuple[int, int]]) -> None:
        self.graph, self.shapes, self.ranges = graph, shapes, ranges
        self.constants = {t.name: t for t in graph.initializer}
        self.producer = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def problems(self) -> list[str]:
        out = []
        for node in self.graph.node:
            if node.op_type != "Reshape":
                continue
            allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
            elements = self.vector(node.input[1])
            where = f"Reshape {node.name or node.output[0]} (allowzero={allowzero})"
            if elements is None:
                if allowzero:
                    out.append(f"{where}: target shape {node.input[1]!r} cannot be traced; spell it out")
                continue
            minus_one = [i for i, e in enumerate(elements) if e == (-1, -1)]
            shown = [_show(e) for e in elements]
            if len(minus_one) > 1:
                out.append(f"{where}: target shape {shown} has more than one -1")
            if any(e[1] is not None and e[1] < -1 for e in elements):
                out.append(f"{where}: target shape {shown} has a negative size other than -1")
            if allowzero and minus_one and any(e[0] < 1 for i, e in enumerate(elements) if i not in minus_one):
                out.append(f"{where}: target shape {shown} has -1 beside a dimension that may be 0 "
                           "(invalid under allowzero=1: ONNX spec, TensorRT)")
        return out

    # -- shape-tensor values as intervals -------------------------------------------------------------------------
    def vector(self, name: str) -> list[Interval] | None:
        """The elements of a 1-D int shape tensor, or None when they cannot be traced."""
        if name in self.constants:
            return [(v, v) for v in numpy_helper.to_array(self.constants[name]).reshape(-1).tolist()]
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Concat":
            parts = [self.vector(i) for i in node.input]
            return None if any(p is None for p in parts) else [e for p in parts for e in p]
        if node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
            return self.vector(node.input[0]) if node.op_type in ("Cast", "Identity") else [self.scalar(node.input[0])]
        if node.op_type == "Slice":  # e.g. flatten(2): Concat(Slice(Shape(x), 0, 2), [-1])
            vec = self.vector(node.input[0])
            bounds = [self.constants.get(i) for i in node.input[1:]]
            if vec is None or any(b is None for b in bounds) or len(bounds) > 2 and \
                    numpy_helper.to_array(bounds[2]).reshape(-1).tolist() != [0]:
                return None
            start, end = (int(numpy_helper.to_array(b).reshape(-1)[0]) for b in bounds[:2])
            step = int(numpy_helper.to_array(bounds[3]).reshape(-1)[0]) if len(bounds) > 3 else 1
            return vec[start:end:step]
        if node.op_type == "Shape":
            dims = self.shapes.get(node.input[0])
            if dims is None:
                return None
            attrs = {a.name: a.i for a in node.attribute}
            return [self._dim(d) for d in dims[attrs.get("start", 0):attrs.get("end", len(dims))]]
        return None

    def scalar(self, name: str) -> Interval:
        if name in self.constants:
            values = numpy_helper.to_array(self.constants[name]).reshape(-1).tolist()
            return (values[0], values[0]) if len(values) == 1 else UNKNOWN
        node = self.producer.get(name)
        if node is None:
            return UNKNOWN
        op = node.op_type
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return self.scalar(node.input[0])
        if op == "Gather":
            vec, idx = self.vector(node.input[0]), self.constants.get(node.input[1])
            if vec is None or idx is None:
                return UNKNOWN
            i = int(np.asarray(numpy_helper.to_array(idx)).reshape(-1)[0])
            return vec[i] if -len(vec) <= i < len(vec) else UNKNOWN
        if op in ("Add", "Sub", "Mul", "Div"):
            return _arith(op, self.scalar(node.input[0]), self.scalar(node.input[1]))
        return UNKNOWN

    def _dim(self, d) -> Interval:
        if d.HasField("dim_value"):
            return (d.dim_value, d.dim_value)
        lo, hi = self.ranges.get(d.dim_param, (0, None))
        return (lo, hi)


def _arith(op: str, a: Interval, b: Interval) -> Interval:
    """Interval arithmetic on sizes (operands >= 0 for Mul/Div; otherwise unknown)."""
    (alo, ahi), (blo, bhi) = a, b
    if op == "Add":
        return (alo + blo, None if ahi is None or bhi is None else ahi + bhi)
    if op == "Sub":
        return (alo - bhi, None if ahi is None else ahi - blo) if bhi is not None else UNKNOWN
    if alo < 0 or blo < 0:
        return UNKNOWN
    if op == "Mul":
        return (alo * blo, None if ahi is None or bhi is None else ahi * bhi)
    if blo == 0:  # Div: integer division of sizes
        return UNKNOWN
    return (alo // bhi if bhi is not None else 0, None if ahi is None else ahi // blo)


def _show(e: Interval) -> str:
    lo, hi = e
    return str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}"
