"""The external-data file names an ONNX model refers to, read straight from the protobuf wire format.

The runtime has no `onnx` package (an edge install is numpy + onnxruntime), and onnxruntime only started refusing
external data outside the model directory in late 2025; TensorRT's parser reads what the file says. So the
manifest check reads the names itself: every TensorProto (initializers, sparse initializers, Constant-node and
subgraph attributes) with an `external_data` entry keyed `location`. Weights stored inline are skipped by length,
never copied.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .errors import BundleError

# How the bundle writers (exporter, calibrate, quantize) lay graphs out: beyond EXTERNAL_DATA_THRESHOLD bytes of
# weights a graph keeps them in one `<graph>.data` file (an inline graph is held several times over while it is
# serialized, re-read and parsed: a 1.07 GB inline fp16 decoder took the export's RSS to 4.7 GB; external data is
# streamed in and mmapped by onnxruntime); within such a file, tensors under EXTERNAL_MIN_BYTES stay inline (as
# onnx.save_model's size_threshold). Smaller graphs stay one self-contained file.
EXTERNAL_DATA_THRESHOLD = 1 << 28
EXTERNAL_MIN_BYTES = 1024

# Field numbers from onnx.proto (stable since IR v3).
_MODEL_GRAPH, _MODEL_TRAINING_INFO = 7, 20
_TRAINING_GRAPHS = (1, 2)  # initialization, algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _messages(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, bytes) of every length-delimited field of one message; other wire types are skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > len(buf):
                raise ValueError("truncated field")
            yield field, buf[i:i + length]
            i += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if i != len(buf):
        raise ValueError("truncated message")


def _tensor(buf: memoryview) -> Iterator[str]:
    for field, entry in _messages(buf):
        if field == _TENSOR_EXTERNAL_DATA:
            parts = dict(_messages(entry))
            if bytes(parts.get(_ENTRY_KEY, b"")) == b"location":
                yield bytes(parts.get(_ENTRY_VALUE, b"")).decode("utf-8", "replace")


def _sparse(buf: memoryview) -> Iterator[str]:
    for field, sub in _messages(buf):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield from _tensor(sub)


def _graph(buf: memoryview) -> Iterator[str]:
    for field, sub in _messages(buf):
        if field == _GRAPH_INITIALIZER:
            yield from _tensor(sub)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            yield from _sparse(sub)
        elif field == _GRAPH_NODE:
            for nfield, attr in _messages(sub):
                if nfield == _NODE_ATTRIBUTE:
                    yield from _attribute(attr)


def _attribute(buf: memoryview) -> Iterator[str]:
    for field, sub in _messages(buf):
        if field in (_ATTR_T, _ATTR_TENSORS):
            yield from _tensor(sub)
        elif field in (_ATTR_G, _ATTR_GRAPHS):
            yield from _graph(sub)
        elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
            yield from _sparse(sub)


def external_data_locations(model_file: str | Path) -> list[str]:
    """Sorted, distinct `location` values of every external tensor in `model_file` (as written, unresolved)."""
    path = Path(model_file)
    try:
        buf = memoryview(path.read_bytes())
        found: set[str] = set()
        for field, sub in _messages(buf):
            if field == _MODEL_GRAPH:
                found.update(_graph(sub))
            elif field == _MODEL_TRAINING_INFO:
                for tfield, graph in _messages(sub):
                    if tfield in _TRAINING_GRAPHS:
                        found.update(_graph(graph))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read as an ONNX model ({e}); re-export the bundle") from e
    return sorted(found)
