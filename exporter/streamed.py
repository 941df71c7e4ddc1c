"""Export a graph without holding its weights: trace over placeholders, then stream each real weight to disk.

torch's exporter holds a model's weights several times (the module, constant-folded transposes, the serialized
proto, a re-load to gather external data): 4x the bundle at full width. Here the module is built with
*placeholders* for every Linear/Embedding weight — full-shape, contiguous, zero tensors on anonymous mmap pages that
are never written (reads map the kernel's shared zero page), costing bytes of RSS, not gigabytes — and exported
with `export_params=False`, so the ONNX file holds the graph only. (An earlier one-row storage expanded to the
weight's shape cost nothing either, but made the fp16 trace's matmuls take torch's slow strided path: 17x slower,
most of a full-width fp16 export's time.) The exporter's parameter table (after its constant folding, where a
weight's Transpose becomes a transposed view of the same placeholder) is captured; each graph input it names is
then turned into an initializer whose bytes are read from the WeightSource one tensor at a time (LoRA merged, cast
to the variant dtype, transposed if the graph wants W^T) and appended to `<graph>.data`. Peak memory: the small
tensors + one weight + the tracing scratch.

Every placeholder carries a distinct id in element [0, 0], so the exporter's deduplication by value never merges
two of them; the id is also how a folded view is traced back to its weight (with its storage's address).
"""
from __future__ import annotations

import contextlib
import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from posellm.lazy_weights import WeightSource
from posellm.model import PoseLLM
from runtime.onnx_external import EXTERNAL_MIN_BYTES

_ALIGN_MIN_BYTES, _ALIGN = 1 << 20, 1 << 16  # as onnx's writer: large tensors start on 64 KiB (mmap-able)


@dataclass(frozen=True)
class Placeholder:
    name: str  # the weight's state-dict name
    shape: tuple[int, int]


class PlaceholderModel:
    """A PoseLLM in `dtype` whose Linear/Embedding weights are placeholders and all other tensors real."""

    def __init__(self, source: WeightSource, dtype: torch.dtype) -> None:
        self.source, self.dtype = source, dtype
        with torch.device("meta"):
            model = PoseLLM(source.cfg)
        self.by_storage: dict[int, Placeholder] = {}
        big = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        metas = model.state_dict(keep_vars=True)
        small = source.get_many(n for n in metas if n not in big)  # norms, biases, pos/patch embeddings: MBs
        for name, meta in metas.items():
            owner, attr = _owner(model, name)
            if name in big:
                value = _zero_pages(meta.shape, dtype)
                value[0, 0] = len(self.by_storage) + 1  # distinct id (one page written); exact in fp16 up to 2048
                self.by_storage[value.untyped_storage().data_ptr()] = Placeholder(name, tuple(meta.shape))
            else:
                value = small.pop(name)
                value = value.to(dtype) if value.is_floating_point() else value
            setattr(owner, attr, nn.Parameter(value, requires_grad=False))
        if len(self.by_storage) > 2048:
            raise ValueError(f"{len(self.by_storage)} weights: placeholder ids are exact in fp16 only up to 2048")
        rotary = model.llm.model.rotary_emb  # non-persistent buffer: recompute on the CPU (as build_from_state)
        model.llm.model.rotary_emb = type(rotary)(config=model.llm.config)
        self.model = model.eval()

    def weight(self, folded: torch.Tensor) -> torch.Tensor:
        """The real tensor for one entry of the exporter's parameter table, in the variant dtype."""
        ph = self.by_storage.get(folded.untyped_storage().data_ptr()) if folded.dim() == 2 else None
        if ph is None:
            self.check_not_copied(folded)
            return folded.contiguous()
        w = self.source.get(ph.name).to(self.dtype)
        cols = ph.shape[1]
        if tuple(folded.shape) == ph.shape and folded.stride() == (cols, 1):
            return w
        if tuple(folded.shape) == ph.shape[::-1] and folded.stride() == (1, cols):
            return w.t().contiguous()  # the exporter folded Transpose(W) into the MatMul's constant
        raise RuntimeError(f"{ph.name}: exported as shape {list(folded.shape)} stride {folded.stride()}; only the "
                           f"weight or its transpose can be streamed")

    def check_not_copied(self, folded: torch.Tensor) -> None:
        """A parameter that is not a placeholder view but has a placeholder's shape is a copy the exporter made of
        one (its bytes would be the zeros, not the weight): refuse rather than write it."""
        shapes = {ph.shape for ph in self.by_storage.values()}
        if folded.dim() == 2 and (tuple(folded.shape) in shapes or tuple(folded.shape)[::-1] in shapes):
            raise RuntimeError(f"exported parameter {list(folded.shape)} is a copy of a placeholder weight, not a view "
                               "of it: torch's constant folding changed")


def _zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous zero tensor on fresh private anonymous mmap pages: no RSS until written (a read maps the shared
    zero page; a MAP_SHARED mapping, mmap's default, would allocate shmem pages on read instead)."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    count = int(np.prod(shape))
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: calloc'd zeros are lazily committed there too
        return torch.from_numpy(np.zeros(shape, np_dtype))
    pages = mmap.mmap(-1, max(count * np_dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.from_numpy(np.frombuffer(pages, np_dtype, count).reshape(shape))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, attr = name.rsplit(".", 1)
    return model.get_submodule(path), attr


@contextlib.contextmanager
def captured_parameters() -> Iterator[dict[str, torch.Tensor]]:
    """The TorchScript exporter's final parameter table (name → tensor, after constant folding) of the next
    `torch.onnx.export(..., dynamo=False)`. torch exposes it only internally (`_model_to_graph`); the wrapper
    fails loudly if that moves."""
    from torch.onnx._internal.torchscript_exporter import utils as ts_utils
    table: dict[str, torch.Tensor] = {}
    original = ts_utils._model_to_graph

    def wrapper(*args, **kwargs):
        graph, params, out = original(*args, **kwargs)
        table.update(params)
        return graph, params, out

    ts_utils._model_to_graph = wrapper
    try:
        yield table
    finally:
        ts_utils._model_to_graph = original
    if not table:
        raise RuntimeError("torch.onnx export reported no parameters: the TorchScript exporter's internals moved")


def export_streamed(module: nn.Module, placeholders: PlaceholderModel, args: tuple, path: Path,
                    inputs: list[str], outputs: list[str], dynamic_axes: dict[str, dict[int, str]],
                    opset: int, external_threshold: int) -> onnx.ModelProto:
    """Export `module` (built over `placeholders.model`) to a graph whose weights are streamed into `path.data`
    (or kept inline when they total less than `external_threshold`). Returns the graph (weights external)."""
    with captured_parameters() as table, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation, tracer shape-arithmetic notes
        # keep_initializers_as_inputs: skips torch's deduplication, which hashes every weight's full contents
        # (a full-size copy of each placeholder); `_deduplicate` below does it on the real, small tensors.
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                          export_params=False, keep_initializers_as_inputs=True, dynamo=False)
    model = onnx.load(str(path))  # graph only: the parameters are still graph inputs
    _deduplicate(model, table, placeholders)
    params = [v for v in model.graph.input if v.name in table]
    total = sum(_nbytes(table[v.name], placeholders.dtype, placeholders) for v in params)
    external = total >= external_threshold
    data_name = path.name + ".data"
    with (open(path.parent / data_name, "wb") if external else contextlib.nullcontext()) as data:
        for value in params:
            array = placeholders.weight(table[value.name]).numpy()
            if data is None or array.nbytes < EXTERNAL_MIN_BYTES:
                tensor = onnx.numpy_helper.from_array(array, value.name)
            else:
                offset = data.tell()
                if array.nbytes > _ALIGN_MIN_BYTES and offset % _ALIGN:
                    data.write(b"\0" * (_ALIGN - offset % _ALIGN))
                    offset = data.tell()
                data.write(np.ascontiguousarray(array).data)
                tensor = onnx.TensorProto(name=value.name, dims=array.shape,
                                          data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, val in (("location", data_name), ("offset", offset), ("length", array.nbytes)):
                    tensor.external_data.add(key=key, value=str(val))
            model.graph.initializer.append(tensor)
            del array
    for value in params:
        model.graph.input.remove(value)
    return model


def _deduplicate(model: onnx.ModelProto, table: dict[str, torch.Tensor], placeholders: PlaceholderModel) -> None:
    """Parameters with equal dtype, shape and bytes become Identity nodes of the first one, as torch's exporter
    writes eval graphs (e.g. identical norm weights share one initializer). Placeholders are distinct by design."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for value in model.graph.input:
        t = table.get(value.name)
        if t is None or t.untyped_storage().data_ptr() in placeholders.by_storage:
            continue
        c = t.contiguous()
        key = (str(c.dtype), tuple(c.shape), c.view(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
        if key in first:
            rename[value.name] = first[key]
        else:
            first[key] = value.name
    for dup, kept in rename.items():  # as torch writes it: `dup = Identity(kept)` at the top of the graph
        model.graph.node.insert(0, onnx.helper.make_node("Identity", [kept], [dup], name=f"Identity_{dup}"))
    for value in [v for v in model.graph.input if v.name in rename]:
        model.graph.input.remove(value)


def _nbytes(folded: torch.Tensor, dtype: torch.dtype, placeholders: PlaceholderModel) -> int:
    if folded.untyped_storage().data_ptr() in placeholders.by_storage:
        return folded.numel() * torch.empty((), dtype=dtype).element_size()
    return folded.numel() * folded.element_size()
