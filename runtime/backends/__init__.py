"""Graph runners: one small interface (`GraphRunner`) with onnxruntime and native TensorRT implementations."""
from __future__ import annotations

from .base import GraphRunner, check_inputs

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")

__all__ = ["BACKENDS", "GraphRunner", "check_inputs", "open_runner"]


def open_runner(backend: str, bundle, graph_spec, engine=None, threads: int | None = None,
                trt_ep=None) -> GraphRunner:
    """Construct the runner for one graph. Heavy imports (onnxruntime, tensorrt) happen here, lazily.
    `trt_ep` (onnxruntime-trt only): the TrtEpSettings of this graph."""
    from ..errors import InputError
    if backend.startswith("onnxruntime"):
        from .onnxruntime import OrtRunner
        provider = {"onnxruntime": "cpu", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "tensorrt"}.get(backend)
        if provider is None:
            raise InputError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
        return OrtRunner(bundle / graph_spec.file, graph_spec, provider=provider, threads=threads, trt_ep=trt_ep)
    if backend == "tensorrt":
        from .tensorrt import TrtRunner
        if engine is None:
            raise InputError(f"backend 'tensorrt' needs an engine for {graph_spec.file}; "
                             "run `posellm-edge build BUNDLE --precision ...` first")
        return TrtRunner(bundle / engine.file, graph_spec, engine)
    raise InputError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
