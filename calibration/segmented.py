"""A decoder graph run a few LLM layers at a time: each segment its own onnxruntime session, so at most one segment's
weights are resident (a 7B fp32 decoder is 26 GB; one of its layers 0.81 GB).

The graph's nodes are kept in their (topological) order and cut into contiguous ranges just before the first
weight MatMul of a layer (its k/q/v projection) and the nodes feeding that MatMul's weight (a blocked
DequantizeLinear): the residual Add and the RMSNorm that follows it stay in one segment, as do a weight and its
dequantization, so onnxruntime fuses each segment as it fuses the whole graph — the tensors crossing a cut (the
residual stream, the normalized hidden state, the rotary tables, the mask, shapes) are what the whole graph computes
in between, bit for bit (tests/calibration/test_segmented.py). Segment graphs are written beside the source graph
(hidden temp names: onnxruntime refuses external data outside a model's folder) and refer to its weights; nothing
large is copied. Sessions stay open while their weights fit `resident_bytes`; the rest are opened per call.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

from runtime.backends.base import GraphRunner
from runtime.manifest import GraphSpec
from runtime.memory import trim_heap

from .qdq import QuantizationError

WEIGHT_OPS = ("MatMul", "MatMulNBits")
# Sessions whose weights fit this stay open across calls; the others are opened and closed per call.
RESIDENT_BYTES = 1 << 30
LM_HEAD_ALONE = True  # lm_head (0.5 GB fp32 at 7B) in a session of its own


def weight_matmuls(graph: onnx.GraphProto) -> list[int]:
    """Positions of the weight MatMuls (MatMul of an initializer or of a DequantizeLinear of one, MatMulNBits), in
    graph order."""
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for i, n in enumerate(graph.node):
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
            continue
        w = n.input[1]
        dq = producer.get(w)
        if w in inits or (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits):
            out.append(i)
    return out


def layer_cuts(graph: onnx.GraphProto, num_layers: int, layers_per_segment: int) -> list[int]:
    """Node positions where segments start: before the first weight MatMul of every `layers_per_segment`-th layer
    and before lm_head (and before the node producing that MatMul's weight, where that is a DequantizeLinear)."""
    mm = weight_matmuls(graph)
    per_layer, rest = divmod(len(mm), num_layers)
    if per_layer == 0 or rest > 1:  # rest: lm_head, the one weight MatMul outside the layers
        raise QuantizationError(f"{len(mm)} weight MatMuls do not split into {num_layers} layers")
    position = {o: i for i, n in enumerate(graph.node) for o in n.output}
    cuts = []
    starts = [mm[layer * per_layer] for layer in range(layers_per_segment, num_layers, layers_per_segment)]
    if rest and LM_HEAD_ALONE:
        starts.append(mm[-1])
    for i in starts:
        cuts.append(min([i] + [position[x] for x in graph.node[i].input[1:2] if x in position]))
    return cuts


@dataclass
class Segment:
    file: Path
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int
    session: Any = None


@dataclass
class SegmentedRunner(GraphRunner):
    """`GraphRunner` over `path` cut every `layers_per_segment` LLM layers; `taps` are extra tensors returned with
    the graph's outputs. `options` makes each session's SessionOptions. Call `close()` to delete the segment
    graphs (also on garbage collection)."""

    path: Path
    spec: GraphSpec
    num_layers: int
    options: Callable[[], Any]
    layers_per_segment: int = 1
    taps: Sequence[str] = ()
    resident_bytes: int = RESIDENT_BYTES
    record: Path | None = None  # save every call's feeds of every segment here (replayed by `run_segment`)
    segments: list[Segment] = field(default_factory=list, init=False)
    check: bool = True

    def __post_init__(self) -> None:
        import onnxruntime as ort
        self._ort = ort
        model = onnx.load(str(self.path), load_external_data=False)
        graph = model.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
               for a in n.attribute):
            raise QuantizationError(f"{self.path}: control-flow subgraphs cannot be segmented")
        cuts = [0] + layer_cuts(graph, self.num_layers, max(1, self.layers_per_segment)) + [len(graph.node)]
        types = _elem_types(model)
        inits = {t.name: t for t in graph.initializer}
        wanted_last = {o.name for o in graph.output} | set(self.taps)
        consumed_after: list[set[str]] = []
        later: set[str] = set(wanted_last)
        for a, b in reversed(list(zip(cuts, cuts[1:]))):  # tensors each segment must hand on
            consumed_after.append(set(later))
            later |= {x for n in graph.node[a:b] for x in n.input if x}
        consumed_after.reverse()
        self.output_names = [o.name for o in graph.output]
        self.active_taps: set[str] = set(self.taps)  # the taps `run` returns (all, unless narrowed)
        self.calls = 0
        try:
            for (a, b), after in zip(zip(cuts, cuts[1:]), consumed_after):
                nodes = list(graph.node[a:b])
                produced = {o for n in nodes for o in n.output if o}
                needed = list(dict.fromkeys(x for n in nodes for x in n.input if x))
                used_inits = [inits[x] for x in needed if x in inits and x not in produced]
                ins = [x for x in needed if x not in produced and x not in inits]
                outs = [o for n in nodes for o in n.output if o in after]
                self.segments.append(self._write(model, nodes, used_inits, ins, outs, types))
        except BaseException:
            self.close()
            raise

    def _write(self, model: onnx.ModelProto, nodes, inits, ins, outs, types) -> Segment:
        def info(name: str) -> onnx.ValueInfoProto:
            if name not in types:
                raise QuantizationError(f"{self.path}: no element type known for {name!r} (crosses a segment cut)")
            return helper.make_tensor_value_info(name, types[name], None)

        graph = helper.make_graph(nodes, f"{model.graph.name}_segment", [info(x) for x in ins],
                                  [info(x) for x in outs], inits)
        seg = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.segment-", suffix=".onnx", dir=self.path.parent)
        os.close(fd)
        onnx.save_model(seg, name)
        size = sum(int({e.key: e.value for e in t.external_data}["length"])
                   if external_data_helper.uses_external_data(t) else t.ByteSize() for t in inits)
        return Segment(Path(name), ins, outs, size + _prepacked_bytes(nodes))

    def _session(self, seg: Segment, budget: list[int]):
        if seg.session is not None:
            return seg.session
        opts = self.options()
        opts.enable_cpu_mem_arena = False  # the arena would keep a segment's largest buffers after its run
        session = self._ort.InferenceSession(str(seg.file), opts, providers=["CPUExecutionProvider"])
        if seg.weight_bytes <= budget[0]:
            budget[0] -= seg.weight_bytes
            seg.session = session
        return session

    def _budget(self) -> list[int]:
        return [self.resident_bytes - sum(s.weight_bytes for s in self.segments if s.session is not None)]

    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        env = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        budget = self._budget()
        wanted = set(self.output_names) | self.active_taps
        for i, seg in enumerate(self.segments):
            later = {x for s in self.segments[i + 1:] for x in s.inputs}
            names = [o for o in seg.outputs if o in wanted or o in later]
            feeds = {x: env[x] for x in seg.inputs}
            if self.record is not None:
                np.savez(self.record / f"{self.calls:05d}-{i:03d}.npz", **feeds)
                if i == 0:
                    np.save(self.record / f"{self.calls:05d}-mask.npy", env["attention_mask"])
            session = self._session(seg, budget)
            values = session.run(names, feeds)
            del session, feeds  # per-call sessions go here: one segment's weights at a time
            env.update(zip(names, values))
            env = {k: v for k, v in env.items() if k in wanted or k in later}
        self.calls += 1
        return {k: env[k] for k in [*self.output_names, *self.taps] if k in env}

    def run_segment(self, index: int, call: int, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Segment `index` alone on the feeds recorded for `call`: `outputs` (e.g. taps) of that call, bit for bit."""
        with np.load(self.record / f"{call:05d}-{index:03d}.npz") as z:
            feeds = {k: z[k] for k in z.files}
        session = self._session(self.segments[index], self._budget())
        return dict(zip(outputs, session.run(list(outputs), feeds)))

    def recorded_mask(self, call: int) -> np.ndarray:
        return np.load(self.record / f"{call:05d}-mask.npy")

    def release(self) -> None:
        """Close the sessions kept open (their weights leave memory); the segment graphs stay."""
        for seg in self.segments:
            seg.session = None
        trim_heap()

    def segment_of(self, tensor: str) -> int:
        return next(i for i, s in enumerate(self.segments) if tensor in s.outputs)

    def close(self) -> None:
        segments = getattr(self, "segments", [])
        for seg in segments:
            seg.session = None
            seg.file.unlink(missing_ok=True)
        self.segments = []
        if segments:
            trim_heap()

    def __del__(self) -> None:
        self.close()


def _prepacked_bytes(nodes) -> int:
    """What onnxruntime's CPU kernels add to a segment's resident size beyond its stored weights: a level-0
    MatMulNBits prepacks its ints as floats (K x N x 4 bytes, 0.81 GB per 7B layer for 0.1 GB stored), so sessions
    are kept open by that size (issue #24: counted by file bytes, nine int4 layers' sessions stayed open)."""
    out = 0
    for n in nodes:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            out += 4 * a["K"] * a["N"] if a.get("accuracy_level", 0) == 0 else 0
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor: graph inputs/outputs/initializers, plus onnx shape inference on the graph
    structure (weights stay external: only their declared types are read)."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)  # contrib MatMulNBits has no onnx schema: its output is its scales' type
    for n in graph.node:
        if n.op_type == "MatMulNBits" and n.input[2] in types:
            graph.value_info.append(helper.make_tensor_value_info(n.output[0], types[n.input[2]], None))
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    for v in inferred.graph.value_info:
        if v.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            types.setdefault(v.name, v.type.tensor_type.elem_type)
    return types


class SegmentedSession:
    """An onnxruntime.InferenceSession look-alike (get_outputs, run) over a SegmentedRunner, for code that drives a
    session itself (exporter/validate.py's validate_variant)."""

    def __init__(self, runner: SegmentedRunner) -> None:
        self.runner = runner

    def get_outputs(self):
        from types import SimpleNamespace
        return [SimpleNamespace(name=n) for n in self.runner.output_names]

    def run(self, names, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        out = self.runner.run(feeds)
        return [out[n] for n in (names or self.runner.output_names)]
