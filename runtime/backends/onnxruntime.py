"""onnxruntime runner: CPU, CUDA EP (IO binding; outputs can stay on the GPU between decode steps), TensorRT EP."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from ..errors import BundleError
from ..manifest import GraphSpec
from .base import GraphRunner

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OrtRunner(GraphRunner):
    def __init__(self, path: Path, spec: GraphSpec, provider: str = "cpu", threads: int | None = None) -> None:
        self.spec = spec
        self.provider = provider
        wanted = _PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BundleError(f"onnxruntime provider {wanted[0]} is not available (have {available}); install "
                              "onnxruntime-gpu for CUDA/TensorRT, or use --backend onnxruntime")
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
        if provider == "tensorrt":
            cache = str(path.parent / "ort-trt-cache")
            os.makedirs(cache, exist_ok=True)
            wanted = [("TensorrtExecutionProvider", {"trt_fp16_enable": "float16" in str(spec.inputs),
                                                     "trt_engine_cache_enable": True,
                                                     "trt_engine_cache_path": cache})] + wanted[1:]
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
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda" if name in keep_on_device else "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: (v if name in keep_on_device else v.numpy()) for name, v in zip(self.output_names, values)}
