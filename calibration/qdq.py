"""Explicit INT8 quantization as Q/DQ ONNX graphs that onnxruntime runs and TensorRT's explicit quantization takes.

- Vision: W8A8 with onnxruntime's `quantize_static` (QDQ format): int8 weights per output channel, int8
  activations per tensor, both symmetric (zero point 0), activation ranges from onnxruntime's calibrators
  (entropy / percentile / minmax histograms). Only the *inputs* of MatMul/Gemm/Conv get Q/DQ (their outputs stay
  float, biases stay float): the placement TensorRT recommends, and TensorRT has no int32 bias DequantizeLinear.
  Only the layers with a weight (linear layers, the patch convolution, the connector) are quantized; attention's
  activation × activation MatMuls (q·kᵀ, softmax·v) stay float, as in NVIDIA ModelOpt's default int8 recipe and
  TensorRT's fused fp16 attention. Quantizing them per tensor (a softmax output in int8) was the largest error of
  the int8 variant: on the shipped model (selection set, seed 2002) vision W8A8 moved the keypoints by 0.47 px with
  them quantized and by 0.14 px without.
- Decoder: weight-only int8. Every MatMul weight initializer W [in, out] becomes
  DequantizeLinear(W_int8, scale[out], zero_point 0, axis=1); activations are not quantized (per-tensor W8A8 is
  known to collapse LLaMA accuracy). Scales are max|W[:, o]| / 127, so no calibration data is involved.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from runtime.errors import PoseLLMEdgeError
from runtime.onnx_external import EXTERNAL_DATA_THRESHOLD, EXTERNAL_MIN_BYTES

QUANTIZED_OP_TYPES = ("MatMul", "Gemm", "Conv")
DQ_FP16_OPSET = 19  # DequantizeLinear takes a float16 scale (and outputs float16) from opset 19


class QuantizationError(PoseLLMEdgeError, RuntimeError):
    """A graph could not be quantized into the Q/DQ form TensorRT and onnxruntime expect."""


@contextlib.contextmanager
def _quiet_onnxruntime_logging() -> Iterator[None]:
    """onnxruntime.quantization logs through the root logger (pre-processing hints we deliberately skip)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[name]


def quantize_vision(src: Path, dst: Path, reader, method: str, percentile: float, external_data: bool) -> None:
    """W8A8 Q/DQ vision graph with onnxruntime's static quantization; `reader` is a `VisionReader`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra = {
        "ActivationSymmetric": True,  # int8 zero point 0 (TensorRT supports symmetric quantization only)
        "WeightSymmetric": True,
        "QuantizeBias": False,  # no int32 bias DQ: TensorRT's DequantizeLinear takes int8/fp8/int4 only
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),  # Q/DQ on op inputs only
        "CalibStridedMinMax": 1,  # collect one batch at a time (bounded memory, histograms merged)
        "CalibPercentile": float(percentile),
    }
    with _quiet_onnxruntime_logging(), contextlib.redirect_stdout(io.StringIO()), \
            tempfile.TemporaryDirectory(prefix="posellm-calib.") as scratch:  # (its calibrators print progress)
        # onnxruntime writes a shape-inferred copy beside its input: work on a scratch copy, never in the bundle.
        model = Path(scratch) / src.name
        shutil.copyfile(src, model)
        if (src.parent / (src.name + ".data")).exists():
            shutil.copyfile(src.parent / (src.name + ".data"), Path(scratch) / (src.name + ".data"))
        quantize_static(
            str(model), str(dst), reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES), nodes_to_quantize=weighted_nodes(src),
            per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=calibration_method(method), use_external_data_format=external_data,
            extra_options=extra,
        )
    problems = check_vision_qdq(onnx.load(str(dst), load_external_data=False))
    if problems:
        raise QuantizationError(f"{dst}: the quantized vision graph is not fully W8A8: {problems[:5]}")


def weighted_nodes(path: Path) -> list[str]:
    """Names of the MatMul/Gemm/Conv nodes whose second operand is a weight initializer (the layers W8A8
    quantizes); a nameless one is an error, since quantize_static selects nodes by name."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in QUANTIZED_OP_TYPES and len(n.input) > 1 and n.input[1] in inits]
    if not nodes or not all(n.name for n in nodes):
        raise QuantizationError(f"{path}: expected named MatMul/Gemm/Conv nodes with weight initializers, found "
                                f"{[n.name for n in nodes]}")
    return [n.name for n in nodes]


def vision_to_fp16(src: Path, dst: Path) -> None:
    """The W8A8 vision graph with fp16 activations (and fp16 Q/DQ scales) for TensorRT: strongly typed, the
    calibrated fp32 graph would run every non-quantized layer (norms, softmax, GELU) in FP32, slower than the fp16
    engine. onnxruntime's float16 converter keeps LayerNormalization (and its default-blocked ops) in fp32, like the
    exporter's fp16 vision graph; fp16 Q/DQ scales need opset 19."""
    from onnx import version_converter
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    if _opset(model) < DQ_FP16_OPSET:
        model = version_converter.convert_version(model, DQ_FP16_OPSET)
    blocked = [op for op in DEFAULT_OP_BLOCK_LIST if op not in ("QuantizeLinear", "DequantizeLinear")]
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*blocked, "LayerNormalization"])
    OnnxModel(model).topological_sort()  # the converter appends its input casts at the end of the node list
    problems = check_vision_qdq(model)
    if problems:
        raise QuantizationError(f"{dst}: the fp16 vision graph lost its W8A8 structure: {problems[:5]}")
    save_graph(model, Path(dst))
    onnx.checker.check_model(str(dst))


# ------------------------------------------------------------------------------------------ decoder weights
def symmetric_per_channel(w: np.ndarray, axis: int, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and scales (in `scale_dtype`) with q = round(w / scale), scale = max|w| / 127 per channel."""
    w32 = np.asarray(w, dtype=np.float32)
    reduce = tuple(i for i in range(w32.ndim) if i != axis)
    absmax = np.abs(w32).max(axis=reduce)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(scale_dtype)
    if scale_dtype == np.float16:  # keep fp16 scales normal (never 0) even for near-zero channels
        scale = np.maximum(scale, np.float16(np.finfo(np.float16).tiny))
    shape = [1] * w32.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w32 / scale.astype(np.float32).reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def quantize_decoder_weights(src: Path, dst: Path) -> dict[str, Any]:
    """Weight-only int8 decoder: each MatMul weight W becomes DequantizeLinear(W_int8, scale[out], 0, axis=1).

    Works for fp32 and fp16 source graphs (the scale has the weight's dtype, so the DequantizeLinear output keeps
    the graph's activation dtype; fp16 scales need opset 19). Large weights are read one at a time from
    external data. Returns a summary (weights, parameters, bytes).
    """
    model = onnx.load(str(src), load_external_data=False)
    base = str(Path(src).parent)
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) and _opset(model) < DQ_FP16_OPSET:
        # ONNX's converter also rewrites ops whose signature changed (ReduceMean axes → input at 18); weights
        # stay external references, so this is cheap for a 7B graph.
        from onnx import version_converter
        model = version_converter.convert_version(model, DQ_FP16_OPSET)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    weights = list(dict.fromkeys(n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits))
    if not weights:
        raise QuantizationError(f"{src}: no MatMul with an initializer weight; is this a decoder graph?")
    dq_nodes, new_inits, removed, params, fp16 = [], [], set(), 0, False
    for name in weights:
        w = numpy_helper.to_array(inits[name], base_dir=base)
        if w.ndim != 2 or w.dtype not in (np.float32, np.float16):
            raise QuantizationError(f"{src}: MatMul weight {name} is {w.dtype}{list(w.shape)}; expected a 2-D "
                                    "float32/float16 [in, out] matrix")
        fp16 |= w.dtype == np.float16
        q, scale = symmetric_per_channel(w, axis=1, scale_dtype=w.dtype)
        params += w.size
        qname, sname, zname, out = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point",
                                    f"{name}_dequantized")
        new_inits += [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), zname)]
        dq_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [out], axis=1,
                                         name=f"{name}_DequantizeLinear"))
        uses = consumers[name]
        for node in uses:
            if node.op_type == "MatMul" and node.input[1] == name:
                node.input[1] = out
        if all(n.op_type == "MatMul" and n.input[1] == out and n.input[0] != name for n in uses) and \
                name not in {o.name for o in graph.output}:
            removed.add(name)
        del w
    kept = [t for t in graph.initializer if t.name not in removed]
    set_initializers(graph, kept, new_inits, base)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes)  # DQ nodes read initializers only: first is topologically valid
    if fp16 and _opset(model) < DQ_FP16_OPSET:
        raise QuantizationError(f"{src}: float16 weights need opset >= {DQ_FP16_OPSET} for DequantizeLinear")
    save_graph(model, Path(dst))
    onnx.checker.check_model(str(dst))  # by path: also valid for graphs with external data
    return {"weights": len(weights), "parameters": int(params), "scale_dtype": "float16" if fp16 else "float32",
            "axis": 1, "kept_float_initializers": len(kept)}


def set_initializers(graph: onnx.GraphProto, kept: list[TensorProto], new: list[TensorProto], base: str) -> None:
    """The graph's initializers become `kept` + `new`; kept tensors stored as external data are read in, so the
    remaining (small) float tensors move into the new file."""
    for t in kept:
        if external_data_helper.uses_external_data(t):
            external_data_helper.load_external_data_for_tensor(t, base)
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
    del graph.initializer[:]
    graph.initializer.extend(kept + new)


def _opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=EXTERNAL_MIN_BYTES)


# ----------------------------------------------------------------------------------------------- inspection
def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _init_array(inits: dict[str, TensorProto], name: str, base: str) -> np.ndarray | None:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t, base_dir=base)


def _weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of the weight operand: Conv [out, ...] 0; MatMul [in, out] 1; Gemm 0 if transB else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 1


def check_vision_qdq(model: onnx.ModelProto) -> list[str]:
    """Problems that keep a vision graph from being W8A8 as TensorRT expects; [] when every MatMul/Gemm/Conv with
    a weight reads both operands through int8 DequantizeLinear with zero point 0 (weights per output channel).
    Activation × activation MatMuls (attention) stay float and are not checked."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    prod = _producers(graph)
    problems = []
    for node in graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES or not _has_weight(node, inits, prod):
            continue
        for slot, name in enumerate(node.input[:2]):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                problems.append(f"{node.name} input {slot} ({name}) is not dequantized")
                continue
            problems += _check_dq(dq, inits, graph, weight=dq.input[0] in inits, axis=_weight_axis(node))
    return problems


def _has_weight(node: onnx.NodeProto, inits: dict[str, TensorProto], prod: dict[str, onnx.NodeProto]) -> bool:
    """The second operand is an initializer, directly or through a DequantizeLinear of one."""
    name = node.input[1] if len(node.input) > 1 else ""
    dq = prod.get(name)
    return name in inits or (dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits)


def _check_dq(dq: onnx.NodeProto, inits: dict[str, TensorProto], graph: onnx.GraphProto, weight: bool,
              axis: int | None) -> list[str]:
    problems = []
    if weight:
        if inits[dq.input[0]].data_type != TensorProto.INT8:
            problems.append(f"{dq.name}: weight {dq.input[0]} is not int8")
        got = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if axis is not None and got != axis:
            problems.append(f"{dq.name}: per-channel axis {got}, expected the output channel {axis}")
    else:
        q = _producers(graph).get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"{dq.name}: activation input {dq.input[0]} does not come from QuantizeLinear")
    if len(dq.input) < 3 or dq.input[2] not in inits or inits[dq.input[2]].data_type != TensorProto.INT8:
        problems.append(f"{dq.name}: zero point is not an int8 initializer")
    return problems


def qdq_scales(path: Path) -> dict[str, Any]:
    """Per-tensor activation scales (QuantizeLinear inputs) and per-channel weight scale summaries (DQ of an
    initializer) of a Q/DQ graph, plus every zero point seen, for the calibration artifact and the tests."""
    model = onnx.load(str(path), load_external_data=False)
    base = str(Path(path).parent)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    activations, weights, zero_points = {}, {}, []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale = _init_array(inits, node.input[1], base)
            zp = _init_array(inits, node.input[2], base) if len(node.input) > 2 else None
            activations[node.input[0]] = {"scale": float(scale.reshape(-1)[0]),
                                          "zero_point": int(zp.reshape(-1)[0]) if zp is not None else 0}
            zero_points.append(zp if zp is not None else np.zeros(1, np.int8))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            scale = _init_array(inits, node.input[1], base)
            zp = _init_array(inits, node.input[2], base) if len(node.input) > 2 else None
            weights[node.input[0]] = {
                "axis": next((a.i for a in node.attribute if a.name == "axis"), 1), "channels": int(scale.size),
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(inits[node.input[0]].data_type).name,
                "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                "zero_point_max_abs": int(np.abs(zp).max()) if zp is not None else 0}
            zero_points.append(zp if zp is not None else np.zeros(1, np.int8))
    return {"activations": activations, "weights": weights,
            "zero_points_all_zero": bool(all(np.all(z == 0) for z in zero_points)),
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in graph.node)}


def check_decoder_qdq(model: onnx.ModelProto) -> list[str]:
    """Problems that keep a decoder graph from being weight-only int8; [] when every MatMul weight is an int8
    initializer behind DequantizeLinear (axis 1 = output channel, zero point 0) and no activation is quantized."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    prod = _producers(graph)
    problems = [f"{n.name}: activation QuantizeLinear in a weight-only decoder" for n in graph.node
                if n.op_type == "QuantizeLinear"]
    for node in graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        if node.op_type != "MatMul":
            problems.append(f"{node.name}: unexpected {node.op_type} in the decoder")
            continue
        w = node.input[1]
        if w in inits:
            problems.append(f"{node.name}: weight {w} is still a float initializer")
            continue
        dq = prod.get(w)
        if dq is not None and dq.op_type == "DequantizeLinear":
            if dq.input[0] not in inits:
                problems.append(f"{dq.name}: dequantizes an activation, not a weight")
            problems += _check_dq(dq, inits, graph, weight=True, axis=1)
    return problems
