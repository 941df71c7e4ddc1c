"""ONNX operators TensorRT's ONNX parser supports, to check exported graphs before anyone builds an engine.

Source: onnx/onnx-tensorrt, docs/operators.md ("TensorRT 10.0 supports operators in the inclusive range of opset 9
to opset 20"), commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c — the rows marked "Y". Our graphs additionally avoid
If and Loop (a single static graph builds and profiles far better).
"""
from __future__ import annotations

TRT10_SUPPORTED_OPS = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
    "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HardSigmoid", "HardSwish",
    "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool",
    "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu",
    "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range",
    "Reciprocal", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd",
    "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Upsample", "Where", "Xor"
))

FORBIDDEN_OPS = frozenset(("If", "Loop", "Scan"))


def unsupported_ops(op_types: set[str]) -> set[str]:
    """Ops TensorRT 10 cannot parse, plus the control-flow ops we never emit."""
    return {op for op in op_types if op not in TRT10_SUPPORTED_OPS or op in FORBIDDEN_OPS}


# Weight-only Q/DQ as TensorRT 10.x imports it (onnx-tensorrt docs/operators.md at the commit above:
# "DequantizeLinear | INT8, FP8, INT4 | x_zero_point must be zero"; TensorRT developer guide, "Working with
# Quantized Types": INT4 is weight-only, and blocked scales — DequantizeLinear's opset-21 `block_size` — are
# accepted for INT4 weights of 2-D matrices). Checked statically, since no TensorRT runs here.
TRT_WEIGHT_DQ_TYPES = {"INT8", "INT4"}
TRT_BLOCKED_DQ_TYPES = {"INT4"}
TRT_SCALE_TYPES = {"FLOAT", "FLOAT16"}
WEIGHT_CONSUMERS = {"MatMul", "Gemm", "Conv"}


def weight_dq_problems(model) -> list[str]:
    """Why TensorRT would not build a graph's weight DequantizeLinear nodes as weight-only quantization; []
    when every one dequantizes an INT8/INT4 initializer with a float32/float16 initializer scale, zero points
    absent or all zero, blocked only for 2-D INT4 weights (scales of the weight's rank), feeding MatMul/Gemm/Conv."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems = []
    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        w, s = inits.get(dq.input[0]), inits.get(dq.input[1])
        if w is None:
            continue  # an activation DQ (W8A8 graphs): not a weight-only question
        wtype = TensorProto.DataType.Name(w.data_type)
        attrs = {a.name: a.i for a in dq.attribute}
        block = attrs.get("block_size", 0)
        if wtype not in TRT_WEIGHT_DQ_TYPES:
            problems.append(f"{dq.name}: weight type {wtype}, TensorRT dequantizes {sorted(TRT_WEIGHT_DQ_TYPES)}")
        if s is None or TensorProto.DataType.Name(s.data_type) not in TRT_SCALE_TYPES:
            problems.append(f"{dq.name}: scale must be a float32/float16 initializer")
        if len(dq.input) > 2 and dq.input[2]:
            zp = inits.get(dq.input[2])
            if zp is None or np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{dq.name}: zero point must be an all-zero initializer")
        if block:
            if wtype not in TRT_BLOCKED_DQ_TYPES:
                problems.append(f"{dq.name}: blocked (block_size={block}) {wtype} weights; TensorRT blocks "
                                f"{sorted(TRT_BLOCKED_DQ_TYPES)} weights only")
            if len(w.dims) != 2 or s is None or len(s.dims) != 2:
                problems.append(f"{dq.name}: blocked DQ needs a 2-D weight and 2-D scales")
        users = consumers.get(dq.output[0], [])
        if not users or any(u.op_type not in WEIGHT_CONSUMERS or u.input[1] != dq.output[0] for u in users):
            problems.append(f"{dq.name}: output must feed the weight input of {sorted(WEIGHT_CONSUMERS)} only")
    return problems
