"""Native TensorRT runner: the name-based 10.x API (also in 11.x) with cuda-python for memory and the stream.

`tensorrt` and `cuda-python` are imported when a runner is constructed, never at module import, so the runtime
works without them. An engine only loads in the TensorRT version that built it: the manifest's EngineSpec records
that version and the runner refuses a mismatch *before* deserializing, with the command that rebuilds it.

Optimization profiles: the runner picks, per call, the first profile whose [min, max] ranges hold every input
shape (the decoder engine has a prefill and a decode profile) and keeps one execution context per profile, so
switching between prefill and decode costs nothing. Outputs named in `keep_on_device` (the KV cache) stay in GPU
memory as `DeviceTensor`s and are bound directly as the next call's inputs.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BundleError, InputError
from ..manifest import EngineSpec, GraphSpec
from .base import GraphRunner


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BundleError("backend 'tensorrt' needs the TensorRT Python package: pip install "
                          "'posellm-edge[tensorrt]' (on Jetson it comes with JetPack), or use --backend "
                          "onnxruntime") from exc
    return tensorrt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BundleError("backend 'tensorrt' needs cuda-python for GPU memory: pip install "
                              "'posellm-edge[tensorrt]'") from exc
    return cudart


def check_engine_version(engine_spec: EngineSpec, installed: str, engine_path: Path, precision: str) -> None:
    """TensorRT engines are not portable across TensorRT versions: refuse with the fix instead of crashing."""
    if engine_spec.tensorrt_version != installed:
        raise BundleError(
            f"{engine_path}: engine built with TensorRT {engine_spec.tensorrt_version}, but TensorRT {installed} "
            f"is installed; engines only load in the TensorRT version that built them — rebuild it here with "
            f"`posellm-edge build <bundle> --precision {precision}`")


class _Cuda:
    """The few CUDA runtime calls the runner needs, with error checking."""

    def __init__(self, cudart) -> None:
        self.rt = cudart
        self.h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def call(self, result: Any) -> Any:
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            raise RuntimeError(f"CUDA error {err} ({name.decode() if isinstance(name, bytes) else name})")
        return rest[0] if len(rest) == 1 else (rest or None)


class DeviceTensor:
    """A GPU buffer with a numpy-like shape and dtype; freed when garbage collected."""

    def __init__(self, runner: "TrtRunner", shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._runner = runner
        self.ptr = int(runner.cuda.call(runner.cuda.rt.cudaMalloc(max(self.nbytes, 1))))  # non-null if empty

    def numpy(self) -> np.ndarray:
        return self._runner.download(self)

    def __del__(self) -> None:
        try:
            self._runner.cuda.rt.cudaFree(self.ptr)
        except Exception:  # interpreter shutdown: the CUDA module may already be gone
            pass


class TrtRunner(GraphRunner):
    def __init__(self, engine_path: Path, spec: GraphSpec, engine_spec: EngineSpec, device: int = 0) -> None:
        engine_path = Path(engine_path)
        precision = Path(spec.file).parts[0] if len(Path(spec.file).parts) > 1 else "<precision>"
        trt = _import_tensorrt()
        check_engine_version(engine_spec, trt.__version__, engine_path, precision)
        if not engine_path.is_file():
            raise BundleError(f"{engine_path}: engine file missing; run `posellm-edge build <bundle> "
                              f"--precision {precision}`")
        self.trt = trt
        self.cuda = _Cuda(_import_cudart())
        self.cuda.call(self.cuda.rt.cudaSetDevice(device))
        self.spec = spec
        self.engine_spec = engine_spec
        self.device = "cuda"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine_path}: TensorRT {trt.__version__} could not deserialize the engine (corrupt,"
                              f" or built for another GPU); rebuild with `posellm-edge build <bundle> "
                              f"--precision {precision}`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        expected = [t.name for t in spec.inputs]
        if sorted(self.inputs) != sorted(expected):
            raise BundleError(f"{engine_path}: engine inputs {sorted(self.inputs)} do not match the graph's "
                              f"{sorted(expected)}; rebuild the engine")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profiles = [
            {n: [tuple(d) for d in self.engine.get_tensor_profile_shape(n, i)] for n in self.inputs}
            for i in range(self.engine.num_optimization_profiles)]
        self.stream = self.cuda.call(self.cuda.rt.cudaStreamCreate())
        self._contexts: dict[int, Any] = {}
        self._lock = threading.RLock()

    # -- profiles and contexts -----------------------------------------------------------------------------------
    def profile_for(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.profiles):
            if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
                   for n, (lo, _, hi) in profile.items()):
                return index
        ranges = [{n: f"{list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.items()} for p in self.profiles]
        raise InputError(f"{self.spec.file}: input shapes {dict(shapes)} fit none of the engine's optimization "
                         f"profiles {ranges}; rebuild with larger limits (`posellm-edge build --max-persons`) or "
                         "run smaller batches (max_batch)")

    def _context(self, index: int):
        ctx = self._contexts.get(index)
        if ctx is None:
            strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
            # Per-profile activation memory instead of the maximum over all profiles, where available.
            ctx = (self.engine.create_execution_context(strategy.ON_PROFILE_CHANGE) if strategy is not None
                   else self.engine.create_execution_context())
            if ctx is None:
                raise RuntimeError(f"{self.spec.file}: TensorRT could not create an execution context (GPU memory?)")
            if self.engine.num_optimization_profiles > 1:
                ctx.set_optimization_profile_async(index, int(self.stream))
                self.cuda.call(self.cuda.rt.cudaStreamSynchronize(self.stream))
            self._contexts[index] = ctx
        return ctx

    # -- memory -------------------------------------------------------------------------------------------------
    def upload(self, array: np.ndarray, dtype: np.dtype) -> DeviceTensor:
        array = np.ascontiguousarray(array, dtype=dtype)
        t = DeviceTensor(self, array.shape, dtype)
        if t.nbytes:
            self.cuda.call(self.cuda.rt.cudaMemcpyAsync(t.ptr, array.ctypes.data, t.nbytes, self.cuda.h2d,
                                                        self.stream))
            self.cuda.call(self.cuda.rt.cudaStreamSynchronize(self.stream))  # `array` may be a temporary
        return t

    def download(self, t: DeviceTensor) -> np.ndarray:
        with self._lock:
            out = np.empty(t.shape, t.dtype)
            if t.nbytes:
                self.cuda.call(self.cuda.rt.cudaMemcpyAsync(out.ctypes.data, t.ptr, t.nbytes, self.cuda.d2h,
                                                            self.stream))
                self.cuda.call(self.cuda.rt.cudaStreamSynchronize(self.stream))
            return out

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.numpy() if isinstance(value, DeviceTensor) else np.asarray(value)

    # -- inference ----------------------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        with self._lock:
            shapes = {n: tuple(int(s) for s in inputs[n].shape) for n in self.inputs}
            ctx = self._context(self.profile_for(shapes))
            held = []
            for name in self.inputs:
                value, want = inputs[name], self.dtypes[name]
                if isinstance(value, DeviceTensor):
                    if value.dtype != want:
                        raise InputError(f"{self.spec.file}: input {name} is {value.dtype} on the GPU, "
                                         f"the engine wants {want}")
                    t = value
                else:
                    array = np.asarray(value)
                    if array.dtype != want and not (array.dtype.kind in "iu" and want.kind in "iu"):
                        raise InputError(f"{self.spec.file}: input {name} has dtype {array.dtype}, "
                                         f"the engine wants {want}")
                    t = self.upload(array, want)  # integer inputs may be narrowed (int64 → int32 engines)
                held.append(t)
                if not ctx.set_input_shape(name, t.shape):
                    raise InputError(f"{self.spec.file}: TensorRT rejected shape {t.shape} for input {name}")
                ctx.set_tensor_address(name, t.ptr)
            outputs = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BundleError(f"{self.spec.file}: output {name} has an unresolved shape {shape}")
                outputs[name] = DeviceTensor(self, shape, self.dtypes[name])
                ctx.set_tensor_address(name, outputs[name].ptr)
            if not ctx.execute_async_v3(int(self.stream)):
                raise RuntimeError(f"{self.spec.file}: TensorRT execution failed (see the TensorRT log)")
            self.cuda.call(self.cuda.rt.cudaStreamSynchronize(self.stream))
            return {name: (t if name in keep_on_device else self.download(t)) for name, t in outputs.items()}

    def __del__(self) -> None:
        try:
            self._contexts.clear()
            self.cuda.rt.cudaStreamDestroy(self.stream)
        except Exception:  # partially constructed, or interpreter shutdown
            pass
