"""Weight-only int4/int8 decode matmuls at the real model's width, on the onnxruntime CPU EP.

The shipped small model's layers are 128 wide: a decode pass there costs node overhead, not weight bytes, so its
int4/int8wo variants cannot show what weight-only quantization is for. This times the decoder's own linear layers at
Vicuna-7B width (q/k/v/o 4096x4096, gate/up 4096x11008, down 11008x4096) for one decode pass of one person's 17
keypoint rows (and one row): fp32 `MatMul` vs `MatMulNBits` (the int4/int8wo variants' onnxruntime form, written by
the same packing code, block 64) at accuracy level 0 (fp32 compute: what `quantize` writes, weight-only exactly) and
4 (int8 activations per block: onnxruntime's fast CPU kernels), interleaved, in one process.

    python -m benchmarks.matmul_nbits_width --out benchmarks/results/cpu-matmul-nbits-width.json
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calibration.blockwise import pack_matmul_nbits, quantize_rtn
from runtime.results import write_json

LAYERS = {"qkvo": (4096, 4096, 4), "gate_up": (4096, 11008, 2), "down": (11008, 4096, 1)}  # K, N, count per layer


def _session(k: int, n: int, bits: int | None, rows: int, w: np.ndarray, level: int = 0) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])
    if bits is None:
        node, inits, opsets = helper.make_node("MatMul", ["x", "w"], ["y"]), [numpy_helper.from_array(w, "w")], []
    else:
        bq = quantize_rtn(w, bits, 64)
        inits = [numpy_helper.from_array(pack_matmul_nbits(bq), "b"),
                 numpy_helper.from_array(bq.scales.T.reshape(-1).astype(np.float32), "s")]
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=64, accuracy_level=level)
        opsets = [helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph([node], "m", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime's sessions
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[17, 1],
                    help="decode rows per pass (17: the keypoints of one person; 1: one sequence)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    forms = {"fp32": (None, 0), "int8wo": (8, 0), "int4": (4, 0), "int8wo-acc4": (8, 4), "int4-acc4": (4, 4)}
    runs = {}
    for rows in args.rows:
        per_layer_ms = {f: 0.0 for f in forms}
        shapes = {}
        for name, (k, n, count) in LAYERS.items():
            w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
            x = rng.standard_normal((rows, k)).astype(np.float32)
            sessions = {f: _session(k, n, bits, rows, w, level) for f, (bits, level) in forms.items()}
            times: dict[str, list[float]] = {f: [] for f in forms}
            for s in sessions.values():
                s.run(None, {"x": x})  # warm-up
            for _ in range(args.repeats):  # interleaved: every form sees the same machine state
                for f, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, {"x": x})
                    times[f].append(time.perf_counter() - t)
            shapes[name] = {f: round(1e3 * float(np.median(t)), 3) for f, t in times.items()}
            for f in forms:
                per_layer_ms[f] += count * 1e3 * float(np.median(times[f]))
        runs[str(rows)] = {"median_ms_per_matmul": shapes,
                           "layer_ms": {f: round(v, 2) for f, v in per_layer_ms.items()},
                           "layer_ratio_vs_fp32": {f: round(v / per_layer_ms["fp32"], 3)
                                                   for f, v in per_layer_ms.items()}}
        print(f"rows {rows}:", runs[str(rows)]["layer_ms"], runs[str(rows)]["layer_ratio_vs_fp32"])
    result = {
        "what": "one decode pass of one Vicuna-7B decoder layer's 7 linear layers, onnxruntime CPU EP, median ms",
        "forms": {f: {"bits": b, "accuracy_level": lv} for f, (b, lv) in forms.items()},
        "repeats": args.repeats, "cpus": os.cpu_count(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "loadavg": os.getloadavg(), "by_rows": runs,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
