"""torch → ONNX for the two graphs, with dynamic axes and external data for large weights.

Uses torch's TorchScript-based exporter (`dynamo=False`): for these plain tensor programs it yields a flat graph of
standard ops (no If/Loop, no custom functions) that onnxruntime and TensorRT's ONNX parser both take, and it exports
a 7B decoder without the memory overhead of torch.export's FX tracing.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import onnx.numpy_helper
import torch

from runtime.manifest import GraphSpec, TensorSpec
from runtime.onnx_external import EXTERNAL_DATA_THRESHOLD

from .graphs import DecoderGraph, VisionGraph, decoder_io_names
from .reshape_check import reshape_problems
from .streamed import PlaceholderModel, export_streamed

OPSET = 17  # LayerNormalization is native from 17; TensorRT 10 parses opsets 9–20+


def _export(module: torch.nn.Module, placeholders: PlaceholderModel, args: tuple, path: Path, inputs: list[str],
            outputs: list[str], dynamic_axes: dict[str, dict[int, str]],
            dynamic_ranges: dict[str, tuple[int, int]]) -> None:
    """Graph traced over placeholder weights; the real weights streamed into `<graph>.data` (exporter/streamed.py).
    Below EXTERNAL_DATA_THRESHOLD of weights the graph keeps them inline (one file)."""
    try:
        model = export_streamed(module, placeholders, args, path, inputs, outputs, dynamic_axes, OPSET,
                                EXTERNAL_DATA_THRESHOLD)
        literal_zero_reshapes(model)
        onnx.save_model(model, str(path))  # the graph; its external weights are already in place
        del model
        check_reshapes(path, dynamic_ranges)
    except BaseException:
        path.unlink(missing_ok=True)
        (path.parent / (path.name + ".data")).unlink(missing_ok=True)
        raise


def check_reshapes(path: Path, dynamic_ranges: dict[str, tuple[int, int]]) -> None:
    """Valid under the ONNX spec, not just under onnxruntime (checked on the file: external weights not loaded)."""
    problems = reshape_problems(onnx.load(str(path), load_external_data=False), dynamic_ranges)
    if problems:
        raise RuntimeError(f"{path.name}: {len(problems)} spec-invalid Reshape(s): " + "; ".join(problems))


def literal_zero_reshapes(model: onnx.ModelProto) -> None:
    """Give every Reshape `allowzero=1` (opset >= 14): a 0 in a computed target shape is then a real empty dimension,
    as in torch, not ONNX's default "copy this dimension from the input" (the decoder's past K/V is empty in the
    prefills). Refuses graphs with a constant shape containing 0, whose meaning would change. Under allowzero=1 a
    -1 must never meet a 0: `reshape_problems` checks every exported graph for that."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        shape = constants.get(node.input[1])
        if shape is not None and 0 in onnx.numpy_helper.to_array(shape).tolist():
            raise RuntimeError(f"Reshape {node.name}: constant target shape contains 0; allowzero would change it")
        del node.attribute[:]  # Reshape's only attribute is allowzero
        node.attribute.append(onnx.helper.make_attribute("allowzero", 1))


def graph_spec(path: Path, dynamic_ranges: dict[str, tuple[int, int]]) -> GraphSpec:
    """Describe a written graph from the file itself (names, dtypes, symbolic dims)."""
    model = onnx.load(str(path), load_external_data=False)

    def specs(values) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
            out.append(TensorSpec(name=v.name, dtype=dtype, shape=shape))
        return tuple(out)

    ext = path.name + ".data"
    return GraphSpec(file=path.name, inputs=specs(model.graph.input), outputs=specs(model.graph.output),
                     dynamic_ranges=dynamic_ranges,
                     external_data=(ext,) if (path.parent / ext).exists() else ())


def export_vision(graph: VisionGraph, placeholders: PlaceholderModel, path: Path, crop_size: int,
                  max_batch: int) -> GraphSpec:
    dummy = torch.randn(2, 3, crop_size, crop_size)
    ranges = {"batch": (1, max_batch)}
    _export(graph, placeholders, (dummy,), path, ["pixel_values"], ["image_embeds"],
            {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, ranges)
    return graph_spec(path, ranges)


def export_decoder(graph: DecoderGraph, placeholders: PlaceholderModel, path: Path, dtype: torch.dtype, hidden: int,
                   kv_heads: int, head_dim: int, num_layers: int, max_persons: int, max_batch: int, max_seq: int,
                   prefix_len: int, max_context: int) -> GraphSpec:
    # Trace with 2 persons × 2 rows, 3 new tokens, a 6-token prefix and 5 past tokens: all distinct, all dynamic.
    n, b, s, lp, p = 2, 4, 3, 6, 5
    args = [torch.randn(b, s, hidden, dtype=dtype), torch.ones(b, lp + p + s, dtype=torch.int64),
            torch.arange(lp + p, lp + p + s).expand(b, s).contiguous()]
    args += [torch.randn(n, kv_heads, lp, head_dim, dtype=dtype) for _ in range(2 * num_layers)]
    args += [torch.randn(b, kv_heads, p, head_dim, dtype=dtype) for _ in range(2 * num_layers)]
    inputs, outputs = decoder_io_names(num_layers)
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "logit_positions"},
        **{name: {0: "batch", 1: "logit_positions"} for name in ("max_prob", "argmax", "digit_argmax")},
    }
    for name in inputs[3:]:
        axes[name] = {0: "persons", 2: "prefix"} if name.startswith("prefix_") else {0: "batch", 2: "past"}
    for name in outputs[4:]:
        axes[name] = {0: "batch", 2: "present"}  # past + seq
    # The prefix is either the prefix prefill's one masked dummy token or exactly the model's prompt prefix + image
    # tokens; past counts only the tokens after it, `total` (the mask) all of them (max_context counts everything).
    suffix_context = max_context - prefix_len
    ranges = {"batch": (1, max_batch), "persons": (1, max_persons), "prefix": (1, prefix_len), "seq": (1, max_seq),
              "past": (0, suffix_context), "total": (2, max_context + max_seq)}
    _export(graph, placeholders, tuple(args), path, inputs, outputs, axes, ranges)
    return graph_spec(path, ranges)
