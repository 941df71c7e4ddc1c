"""GPU-side measurement helpers of the full-size check: device-wide memory from nvidia-smi (polled for the peak)
and a seconds-long probe that onnxruntime's CUDA EP really loaded."""
from __future__ import annotations

import subprocess
import threading
from typing import Any

import numpy as np


def smi_used_mib() -> float | None:
    """Device-wide GPU memory in use (torch + onnxruntime arenas + contexts), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class GpuPeak(threading.Thread):
    """Polls nvidia-smi twice a second; `peak_mib` is the highest device-wide figure seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            used = smi_used_mib()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0.0, used)
            self.stop.wait(0.5)


def probe_cuda_ep(ort: Any, providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
                  ) -> list[str]:
    """Run an fp16 MatMul on the EP: fail in seconds, not after the export, when onnxruntime-gpu cannot load CUDA
    (onnxruntime silently falls back to the CPU EP)."""
    from onnx import TensorProto, helper
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 2]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "probe", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=list(providers))
    session.run(None, {"x": np.ones((2, 2), np.float16)})
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"{providers[0]} did not load (have {session.get_providers()}): install onnxruntime-gpu "
                           f"instead of onnxruntime, with CUDA libraries it can load (benchmarks/gpu_fullsize.sh header)")
    return session.get_providers()
