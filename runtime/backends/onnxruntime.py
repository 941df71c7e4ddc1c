"""onnxruntime runner: CPU, CUDA EP (IO binding; outputs can stay on the GPU between decode steps), TensorRT EP."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import BundleError
from ..manifest import GraphSpec
from .base import GraphRunner


def import_onnxruntime():
    """onnxruntime is an extra, not a base dependency (the CPU and GPU wheels must not be installed together)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BundleError("the onnxruntime backends need onnxruntime: pip install 'posellm-edge[cpu]' (CPU) or "
                          "'posellm-edge[gpu]' (CUDA/TensorRT EP); on Jetson install JetPack's onnxruntime-gpu "
                          "wheel (README: Jetson), or use --backend tensorrt") from exc
    return onnxruntime


_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/posellm-edge (default ~/.cache/posellm-edge): engines built on this machine."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "posellm-edge"


@dataclass(frozen=True)
class TrtEpSettings:
    """What the TensorRT EP needs beyond the graph: the bundle's optimization profiles (runtime/profiles.py), the
    variant's precision and where to cache engines (outside the read-only, checksummed bundle)."""

    profiles: tuple[dict[str, Any], ...]  # per profile {input name: [min, opt, max] shape}
    precision: str  # fp32 | fp16 | int8
    cache_dir: Path


def trt_provider_options(s: TrtEpSettings) -> dict[str, Any]:
    """TensorRT EP options: one engine with every profile up front (else the EP rebuilds as past/total grow),
    precision flags from the variant (the EP builds weakly typed: fp16 lets TensorRT choose fp16 kernels, int8
    honours the Q/DQ nodes), engine + timing cache in the user's cache dir."""
    def shapes(k: int) -> str:  # "name:AxBxC,name:..." with a name repeated once per profile
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[k])}" for p in s.profiles for name, dims in p.items())

    return {
        "trt_fp16_enable": s.precision in ("fp16", "int8"),
        "trt_int8_enable": s.precision == "int8",
        # The EP cannot build strongly typed: keep LayerNorm statistics in fp32 (RMSNorm/softmax casts are ops)
        "trt_layer_norm_fp32_fallback": s.precision != "fp32",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(s.cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(s.cache_dir),
        "trt_profile_min_shapes": shapes(0),
        "trt_profile_opt_shapes": shapes(1),
        "trt_profile_max_shapes": shapes(2),
    }


def session_options(threads: int | None = None):
    """The runner's onnxruntime SessionOptions (also the segmented decoder's in calibration/segmented.py)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # int8 Q/DQ graphs: x86 CPUs without VNNI saturate onnxruntime's fast U8S8 int8 kernels (measured on the
    # int8 vision graph: 18% rms error instead of 2.2%); this selects the exact U8U8 path there, no-op elsewhere.
    opts.add_session_config_entry("session.x64quantprecision", "1")
    # The vision and decoder sessions each own a thread pool whose workers busy-wait after every call; with the
    # runtime's numpy work in between they steal the cores from each other and from the main thread. Measured
    # on 2 cores (256-image-token model, template decoding): 161 → 102 ms/person with spinning off.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Blocked weight-only DequantizeLinear → MatMul is fused into MatMulNBits by the CPU optimizer, by default
    # with int8-quantized activations (accuracy level 4: 0.19 max error on a unit test's 128-wide int4 MatMul);
    # level 0 keeps it weight-only, matching the MatMulNBits form and the PyTorch validation.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return opts


class OrtRunner(GraphRunner):
    def __init__(self, path: Path, spec: GraphSpec, provider: str = "cpu", threads: int | None = None,
                 trt_ep: TrtEpSettings | None = None) -> None:
        ort = self.ort = import_onnxruntime()
        self.spec = spec
        self.provider = provider
        wanted = _PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BundleError(f"onnxruntime provider {wanted[0]} is not available (have {available}); install "
                              "onnxruntime-gpu for CUDA/TensorRT, or use --backend onnxruntime")
        opts = session_options(threads)
        if provider == "tensorrt":
            if trt_ep is None:
                raise BundleError(f"{path}: the TensorRT EP needs the bundle's profiles and precision (TrtEpSettings)")
            os.makedirs(trt_ep.cache_dir, exist_ok=True)
            wanted = [("TensorrtExecutionProvider", trt_provider_options(trt_ep))] + wanted[1:]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"{path}: onnxruntime could not load the graph: {exc}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = "cuda" if provider != "cpu" else "cpu"

    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        if self.device == "cpu":
            feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        # IO binding: device-resident inputs (OrtValues from an earlier step) are bound without a copy, and
        # outputs in keep_on_device are allocated on the GPU and handed back as OrtValues.
        binding = self.session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, self.ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda" if name in keep_on_device else "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: (v if name in keep_on_device else v.numpy()) for name, v in zip(self.output_names, values)}
