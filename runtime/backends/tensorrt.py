"""Native TensorRT runner: the name-based 10.x API (also in 11.x) with cuda-python for memory and the stream.

`tensorrt` and `cuda-python` are imported when a runner is constructed, never at module import, so the runtime
works without them. An engine only loads in the TensorRT version that built it: the manifest's EngineSpec records
that version and the runner refuses a mismatch *before* deserializing, with the command that rebuilds it.

Optimization profiles: the runner picks, per call, the first profile whose [min, max] ranges hold every input
shape (the decoder engine has a prefill and a decode profile) and keeps one execution context per profile (and per
thread), so switching between prefill and decode costs nothing.

Memory: a call allocates nothing and synchronises once. Each context owns grow-only device buffers for the inputs
that come from the host and for its outputs, plus pinned host staging for both directions; they are sized at 4x
the first need, capped at the profile maximum, so after the first call of each kind nothing grows (sizing every
buffer at the profile maxima instead would reserve the KV cache for the longest context: ~9 GB per buffer set on
a 7B decoder). The KV cache (outputs with the `present` dim, kept on the device and fed back as the next call's
`past`/`prefix`) must outlive the call, so it comes from CUDA's stream-ordered pool (cudaMallocAsync on the
runner's stream: no device synchronisation, blocks reused from the pool). Other outputs named in
`keep_on_device` (the logits) are views of the context's buffer, valid until that context's next call.
"""
from __future__ import annotations

import ctypes
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

    def keep_pool_memory(self, device: int) -> None:
        """Freed stream-ordered blocks stay in the pool instead of going back to the OS at every synchronisation
        (the default release threshold is 0), so the KV cache of the next step reuses them. Best effort."""
        try:
            pool = self.call(self.rt.cudaDeviceGetDefaultMemPool(device))
            self.call(self.rt.cudaMemPoolSetAttribute(pool, self.rt.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold,
                                                      self.rt.cuuint64_t(2 ** 64 - 1)))
        except (AttributeError, RuntimeError, TypeError):  # older cuda-python or no pool support: still correct
            pass


class DeviceTensor:
    """A GPU buffer with a numpy-like shape and dtype. Owning tensors (the KV cache) come from the stream-ordered
    pool and are freed to it when garbage collected; views point into a context's buffer."""

    def __init__(self, runner: "TrtRunner", shape: tuple[int, ...], dtype: np.dtype, ptr: int | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._runner = runner
        self.owned = ptr is None
        if self.owned:  # non-null even if empty
            ptr = runner.cuda.call(runner.cuda.rt.cudaMallocAsync(max(self.nbytes, 1), runner.stream))
        self.ptr = int(ptr)

    def numpy(self) -> np.ndarray:
        return self._runner.download(self)

    def __del__(self) -> None:
        if not self.owned:
            return
        try:
            self._runner.cuda.rt.cudaFreeAsync(self.ptr, self._runner.stream)
        except Exception:  # interpreter shutdown: the CUDA module may already be gone
            pass


class _Buffer:
    """Grow-only device buffer with a pinned host twin (staging for uploads and downloads)."""

    def __init__(self, cuda: _Cuda, nbytes: int) -> None:
        self.cuda, self.nbytes = cuda, max(int(nbytes), 1)
        self.device = int(cuda.call(cuda.rt.cudaMalloc(self.nbytes)))
        self.host = int(cuda.call(cuda.rt.cudaMallocHost(self.nbytes)))

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        raw = (ctypes.c_char * max(n, 1)).from_address(self.host)
        return np.frombuffer(raw, np.dtype(dtype), count=n // np.dtype(dtype).itemsize).reshape(shape)

    def free(self) -> None:
        self.cuda.rt.cudaFree(self.device)
        self.cuda.rt.cudaFreeHost(self.host)


class _Context:
    """One TensorRT execution context (one profile, one thread) and the buffers it binds."""

    GROWTH = 4  # first allocation: 4x the need (capped at the profile maximum)

    def __init__(self, ctx, profile_max_bytes: dict[str, int]) -> None:
        self.ctx = ctx
        self.max_bytes = profile_max_bytes  # per tensor name; outputs: at the profile's maximum input shapes
        self.buffers: dict[str, _Buffer] = {}

    def buffer(self, cuda: _Cuda, name: str, nbytes: int) -> _Buffer:
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            cap = self.max_bytes.get(name)
            size = nbytes * self.GROWTH if cap is None else max(nbytes, min(cap, nbytes * self.GROWTH))
            buf = self.buffers[name] = _Buffer(cuda, size)
        return buf

    def free(self) -> None:
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()


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
        self.cuda.keep_pool_memory(device)
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
        # The KV cache outlives the call (pool-allocated); every other output lives in its context's buffer.
        self.cache_outputs = {t.name for t in spec.outputs if "present" in t.shape}
        self.stream = self.cuda.call(self.cuda.rt.cudaStreamCreate())
        self._local = threading.local()  # per thread: {profile index: _Context}
        self._all_contexts: list[_Context] = []
        self._lock = threading.RLock()

    def input_limit(self, name: str, axis: int) -> int | None:
        """The largest size any of the engine's profiles accepts for this input dim."""
        return max(p[name][2][axis] for p in self.profiles)

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

    def _context(self, index: int) -> _Context:
        contexts = getattr(self._local, "contexts", None)
        if contexts is None:
            contexts = self._local.contexts = {}
        c = contexts.get(index)
        if c is None:
            strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
            # Per-profile activation memory instead of the maximum over all profiles, where available.
            ctx = (self.engine.create_execution_context(strategy.ON_PROFILE_CHANGE) if strategy is not None
                   else self.engine.create_execution_context())
            if ctx is None:
                raise RuntimeError(f"{self.spec.file}: TensorRT could not create an execution context (GPU memory?)")
            if self.engine.num_optimization_profiles > 1:
                if not ctx.set_optimization_profile_async(index, int(self.stream)):
                    raise RuntimeError(f"{self.spec.file}: TensorRT refused optimization profile {index} of "
                                       f"{self.engine.num_optimization_profiles} for a new execution context")
                self.cuda.call(self.cuda.rt.cudaStreamSynchronize(self.stream))
            c = contexts[index] = _Context(ctx, self._max_bytes(ctx, index))
            self._all_contexts.append(c)
        return c

    def _max_bytes(self, ctx, index: int) -> dict[str, int]:
        """Bytes of every tensor at the profile's maximum input shapes (the cap of the context's buffers)."""
        out = {}
        for name in self.inputs:
            hi = self.profiles[index][name][2]
            out[name] = int(np.prod(hi, dtype=np.int64)) * self.dtypes[name].itemsize
            if not ctx.set_input_shape(name, hi):
                raise BundleError(f"{self.spec.file}: TensorRT rejected profile {index}'s maximum shape {hi} "
                                  f"for input {name}")
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if all(d >= 0 for d in shape):
                out[name] = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
        return out

    # -- memory -------------------------------------------------------------------------------------------------
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

    def _bind(self, c: _Context, name: str, ptr: int) -> None:
        if not c.ctx.set_tensor_address(name, ptr):
            raise RuntimeError(f"{self.spec.file}: TensorRT refused the device address of tensor {name} "
                               "(null or misaligned)")

    # -- inference ----------------------------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        with self._lock:
            shapes = {n: tuple(int(s) for s in inputs[n].shape) for n in self.inputs}
            c = self._context(self.profile_for(shapes))
            rt, stream = self.cuda.rt, self.stream
            for name in self.inputs:
                value, want = inputs[name], self.dtypes[name]
                if isinstance(value, DeviceTensor):
                    if value.dtype != want:
                        raise InputError(f"{self.spec.file}: input {name} is {value.dtype} on the GPU, "
                                         f"the engine wants {want}")
                    ptr = value.ptr
                else:  # host → pinned staging → the context's device buffer (integers may narrow: int64 → int32)
                    array = np.asarray(value)
                    if array.dtype != want and not (array.dtype.kind in "iu" and want.kind in "iu"):
                        raise InputError(f"{self.spec.file}: input {name} has dtype {array.dtype}, "
                                         f"the engine wants {want}")
                    nbytes = array.size * want.itemsize
                    buf = c.buffer(self.cuda, name, nbytes)
                    buf.host_array(array.shape, want)[...] = array
                    if nbytes:
                        self.cuda.call(rt.cudaMemcpyAsync(buf.device, buf.host, nbytes, self.cuda.h2d, stream))
                    ptr = buf.device
                if not c.ctx.set_input_shape(name, shapes[name]):
                    raise InputError(f"{self.spec.file}: TensorRT rejected shape {shapes[name]} for input {name}")
                self._bind(c, name, ptr)
            outputs: dict[str, DeviceTensor] = {}
            for name in self.outputs:
                shape = tuple(c.ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BundleError(f"{self.spec.file}: output {name} has an unresolved shape {shape}")
                if name in self.cache_outputs and name in keep_on_device:
                    outputs[name] = DeviceTensor(self, shape, self.dtypes[name])
                else:
                    nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize
                    buf = c.buffer(self.cuda, name, nbytes)
                    outputs[name] = DeviceTensor(self, shape, self.dtypes[name], ptr=buf.device)
                self._bind(c, name, outputs[name].ptr)
            if not c.ctx.execute_async_v3(int(stream)):
                raise RuntimeError(f"{self.spec.file}: TensorRT execution failed (see the TensorRT log)")
            host = {}
            for name, t in outputs.items():
                if name in keep_on_device:
                    continue
                buf = c.buffers[name]
                if t.nbytes:
                    self.cuda.call(rt.cudaMemcpyAsync(buf.host, t.ptr, t.nbytes, self.cuda.d2h, stream))
                host[name] = buf
            self.cuda.call(rt.cudaStreamSynchronize(stream))  # the call's one synchronisation
            return {name: (t if name in keep_on_device else host[name].host_array(t.shape, t.dtype).copy())
                    for name, t in outputs.items()}

    def __del__(self) -> None:
        try:
            for c in self._all_contexts:
                c.free()
            self._all_contexts.clear()
            self.cuda.rt.cudaStreamDestroy(self.stream)
        except Exception:  # partially constructed, or interpreter shutdown
            pass
