"""Weight-only block-wise int4/int8: packing, the two graph forms (MatMulNBits and blocked DequantizeLinear) on
onnxruntime CPU, GPTQ vs RTN, the TensorRT Q/DQ check, validation against PyTorch, and the runtime on an int4 bundle.

Tolerances are stated per test; every numeric test prints its max difference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import tiny
from calibration.blockwise import (BlockQuantized, pack_matmul_nbits, quantize_gptq, quantize_rtn,
                                   unpack_matmul_nbits)
from calibration.qdq import QuantizationError
from calibration.quantize import ACTIVATION_QUANT_BOUND, QuantizeConfig, quantize_bundle
from calibration.weight_only import accuracy_level_twin, matmul_weights, write_blocked_qdq, write_matmul_nbits
from exporter.trt_ops import unsupported_ops, weight_dq_problems
from runtime.backends.base import Stopwatch
from runtime.backends.onnxruntime import OrtRunner
from runtime.decoding import Decoder
from runtime.errors import InputError
from runtime.estimator import Estimator
from runtime.manifest import load_manifest

BOXES = [[10, 20, 100, 150], [120, 30, 90, 200]]


def _ints(rng, shape, bits):
    return rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), size=shape).astype(np.int8)


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 96, 100, 33])  # whole blocks, and partial last blocks (even and odd K)
def test_matmul_nbits_packing_round_trip_exact(bits, k):
    rng = np.random.default_rng(k + bits)
    q = _ints(rng, (k, 5), bits)
    bq = BlockQuantized(q, np.ones((-(-k // 32), 5), np.float16), bits, 32)
    packed = pack_matmul_nbits(bq)
    assert packed.shape == (5, -(-k // 32), 32 * bits // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_matmul_nbits(packed, bits, k, 5, 32), q)


def test_int4_nibble_order_and_zero_point_offset():
    """Element 2i of a block in the low nibble, 2i+1 in the high one, each stored as q + 8."""
    q = np.zeros((32, 1), np.int8)
    q[0, 0], q[1, 0], q[2, 0], q[3, 0] = -8, 7, 1, -1
    packed = pack_matmul_nbits(BlockQuantized(q, np.ones((1, 1), np.float16), 4, 32))
    assert packed[0, 0, 0] == (0x0 | 0xF << 4) and packed[0, 0, 1] == (0x9 | 0x7 << 4)
    assert np.all(packed[0, 0, 2:] == 0x88)  # zeros are stored as the zero point


def test_block_scales_and_rtn_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 16)).astype(np.float32)
    w[70, 3] = 9.0  # one outlier: only its own block's scale grows
    bq = quantize_rtn(w, 4, 64)
    assert bq.scales.shape == (2, 16) and bq.scales.dtype == np.float16
    expected = (np.abs(w.reshape(2, 64, 16)).max(axis=1) / 7).astype(np.float16)
    assert np.array_equal(bq.scales, expected)
    assert bq.q.min() >= -8 and bq.q.max() <= 7
    err = np.abs(bq.dequantize() - w)
    bound = np.repeat(bq.scales.astype(np.float32), 64, axis=0) / 2 * (1 + 1e-3)  # half a step (+fp16 rounding)
    print(f"rtn int4 max|err| {err.max():.4f}, max allowed {bound.max():.4f}")
    assert np.all(err <= bound)


@pytest.mark.parametrize("shape,bits,block,match", [
    ((4, 4, 4), 4, 32, r"\[4, 4, 4\].*2-D"),
    ((0, 8), 4, 32, r"\[0, 8\].*non-empty"),
    ((64, 8), 3, 32, r"bits=3.*\[4, 8\]"),
    ((64, 8), 4, 48, r"block_size=48.*\[32, 64, 128\]"),
])
def test_bad_shapes_and_settings_are_refused(shape, bits, block, match):
    with pytest.raises(InputError, match=match):
        quantize_rtn(np.zeros(shape, np.float32), bits, block)


def test_unsupported_accuracy_level_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"accuracy_level=2: expected one of \[0, 4\]"):
        QuantizeConfig(tmp_path, method="rtn", accuracy_level=2)


def test_unpack_refuses_a_wrong_layout():
    with pytest.raises(InputError, match=r"uint8\[4, 2, 16\]"):
        unpack_matmul_nbits(np.zeros((4, 2, 8), np.uint8), 4, 64, 4, 32)


# --------------------------------------------------------------------------------------------------- GPTQ
def test_gptq_with_diagonal_statistics_is_rtn():
    """Uncorrelated inputs leave GPTQ nothing to compensate: it must round exactly like RTN."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 64))
    g, r = quantize_gptq(w, h, 4, 32), quantize_rtn(w, 4, 32)
    assert np.array_equal(g.q, r.q) and np.array_equal(g.scales, r.scales)


def test_gptq_lowers_output_error_on_correlated_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2048, 8)) @ rng.standard_normal((8, 96))  # low-rank, strongly correlated features
    x += 0.05 * rng.standard_normal(x.shape)
    w = rng.standard_normal((96, 32)).astype(np.float32)
    h = x.T @ x

    def rel(bq):
        return np.linalg.norm(x @ (w - bq.dequantize(np.float64))) / np.linalg.norm(x @ w)

    e_rtn, e_gptq = rel(quantize_rtn(w, 4, 32)), rel(quantize_gptq(w, h, 4, 32))
    print(f"relative output error: rtn {e_rtn:.4f}, gptq {e_gptq:.4f}")
    assert e_gptq < 0.7 * e_rtn


# ------------------------------------------------------------------------------------- graph forms on ORT
def _matmul_graph(path: Path, w: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", w.shape[1]])
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/proj/MatMul")
    g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as OrtRunner: weight-only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [128, 100])
def test_both_forms_compute_x_times_dequantized_weight(tmp_path, bits, k):
    """MatMulNBits (our packing, the op's default zero point) and blocked DequantizeLinear (opset 21) each equal
    x @ dequantize(q, scales) within fp32 reduction-order error: 1e-5 × max|y|."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    x = rng.standard_normal((7, k)).astype(np.float32)
    _matmul_graph(tmp_path / "f.onnx", w)
    bq = quantize_rtn(w, bits, 32)
    write_matmul_nbits(tmp_path / "f.onnx", tmp_path / "nbits.onnx", {"/proj/MatMul": bq})
    write_blocked_qdq(tmp_path / "f.onnx", tmp_path / "qdq.onnx", {"/proj/MatMul": bq})
    ref = x.astype(np.float64) @ bq.dequantize(np.float64)
    tol = 1e-5 * np.abs(ref).max()
    for name in ("nbits", "qdq"):
        d = np.abs(_run(tmp_path / f"{name}.onnx", x) - ref).max()
        print(f"int{bits} K={k} {name}: max|y - x·deq(W)| {d:.2e} (tolerance {tol:.2e})")
        assert d <= tol


def test_our_unpacking_reads_onnxruntimes_own_matmul_nbits_packer(tmp_path):
    """onnxruntime's own C++ packer (what its MatMulNBitsQuantizer calls, symmetric: no zero-point input) packs a
    weight; our unpack + dequantize must give what MatMulNBits computes with it (tolerance 1e-5 × max|y|), so our
    layout is the op's, not just self-consistent."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    rng = np.random.default_rng(3)
    k, n, block = 80, 16, 32  # a partial last block too
    w = rng.standard_normal((k, n)).astype(np.float32)
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks // 2)), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zero_points, block, n, blocks * block, True)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                          [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "s")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(g, opset_imports=opsets), str(tmp_path / "ort.onnx"))
    deq = unpack_matmul_nbits(packed, 4, k, n, block).astype(np.float64) * np.repeat(scales.T, block, axis=0)[:k]
    x = rng.standard_normal((5, k)).astype(np.float32)
    ref = x @ deq
    d = np.abs(_run(tmp_path / "ort.onnx", x) - ref).max()
    print(f"onnxruntime-packed MatMulNBits vs our unpack: max|diff| {d:.2e}")
    assert d <= 1e-5 * np.abs(ref).max()
    assert np.abs(deq - w).max() <= np.abs(w).max() / 7  # and it really is w, quantized


# ------------------------------------------------------------------------------------------- bundle level
@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, tiny_checkpoint, tiny_bundle):
    """The tiny bundle with an int4 variant (RTN, lm_head included), validated against PyTorch on the way."""
    out = tmp_path_factory.mktemp("int4") / "bundle"
    shutil.copytree(tiny_bundle, out)
    result = quantize_bundle(QuantizeConfig(out, bits=4, block_size=32, method="rtn", checkpoint=tiny_checkpoint,
                                            threads=1))
    return out, result


def test_bundle_forms_agree_on_the_runtime_prefill(int4_bundle, tmp_path):
    """Both forms written from the same fp32 decoder give the same prefill logits on onnxruntime CPU
    (1e-4 × max|logits|); the bundle's own TensorRT form has fp16 activations, checked at fp16's tolerance."""
    bundle, result = int4_bundle
    m = load_manifest(bundle)
    fp32, v = m.variants["fp32"], m.variants["int4"]
    quantized = _requantize(bundle, fp32, 32, {n: w["bits"] for n, w in result.artifact["weights"].items()})
    write_blocked_qdq(bundle / fp32.decoder.file, tmp_path / "qdq32.onnx", quantized)
    embeds = np.random.default_rng(0).standard_normal((2, m.dims.num_patches, m.dims.hidden_size)).astype(np.float32)
    suffixes = [list(k.suffix_ids) for k in m.prompts.keypoints]

    def logits(path, spec, embedding):
        runner = OrtRunner(path, spec, threads=1)
        table = np.load(bundle / embedding)
        out = Decoder(m, runner, table, lambda ids: "").prefill(embeds, suffixes, [], Stopwatch())[0]
        return np.asarray(out.logits, np.float64)

    shipped = logits(bundle / v.decoder.file, v.decoder, v.embedding)  # accuracy level 4: int8 activations
    twin = accuracy_level_twin(bundle / v.decoder.file, 0)
    try:
        nbits = logits(twin, v.decoder, v.embedding)
    finally:
        twin.unlink()
    qdq32 = logits(tmp_path / "qdq32.onnx", v.decoder, v.embedding)
    trt = v.form("tensorrt")
    qdq16 = logits(bundle / trt.decoder.file, trt.decoder, trt.embedding)
    d32, d16, top = np.abs(qdq32 - nbits).max(), np.abs(qdq16 - nbits).max(), np.abs(nbits).max()
    print(f"MatMulNBits vs Q/DQ (fp32 activations) max|diff| {d32:.2e}; vs Q/DQ fp16 {d16:.2e}; max|logits| {top:.2f}")
    d4 = np.abs(shipped - nbits).max()
    print(f"shipped (accuracy level 4) vs level 0: max|diff| {d4:.2e} (bound {ACTIVATION_QUANT_BOUND} x max|logits|)")
    assert d32 <= 1e-4 * top
    assert d16 <= 2e-2 + 2e-2 * top  # the export validation's fp16 tolerance
    assert 0 < d4 <= ACTIVATION_QUANT_BOUND * top  # int8 activations do change the math, within the sanity bound
    levels = {a.i for n in onnx.load(str(bundle / v.decoder.file)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and result.artifact["forms"]["onnxruntime"]["accuracy_level"] == 4
    assert not list(bundle.rglob("*.level0.onnx"))  # quantize removed its twin
    checks = result.artifact["checks"]
    assert checks["matmul_nbits_vs_qdq"]["max_abs"] <= 2e-2 + 2e-2 * checks["matmul_nbits_vs_qdq"]["ref_max_abs"]


def _requantize(bundle: Path, fp32, block: int, bits: dict[str, int]) -> dict:
    from calibration.weight_only import load_weight
    model = onnx.load(str(bundle / fp32.decoder.file))
    # an 8-bit weight in an int4 variant (lm_head) is per output channel, as quantize writes it
    return {n: quantize_rtn(load_weight(model, w, str(bundle)), bits[n], block, n, per_channel=bits[n] == 8)
            for n, (_, w) in matmul_weights(model).items()}


def test_qdq_form_passes_the_tensorrt_checks(int4_bundle):
    bundle, _ = int4_bundle
    v = load_manifest(bundle).variants["int4"]
    model = onnx.load(str(bundle / v.form("tensorrt").decoder.file))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == len(matmul_weights(onnx.load(str(bundle / "fp32" / "decoder.onnx"))))
    attrs = sorted(({a.name: a.i for a in n.attribute} for n in dqs), key=lambda a: "block_size" in a)
    # lm_head's int8 per output channel (per-axis, TensorRT blocks INT4 only), every other weight int4 block 32
    assert attrs[0] == {"axis": 1} and all(a["block_size"] == 32 for a in attrs[1:])
    assert unsupported_ops({n.op_type for n in model.graph.node}) == set()
    assert weight_dq_problems(model) == []
    # the onnxruntime form is not for TensorRT: MatMulNBits is a contrib op
    assert "MatMulNBits" in unsupported_ops({n.op_type for n in onnx.load(str(bundle / v.decoder.file)).graph.node})


def test_tensorrt_check_flags_blocked_int8_and_nonzero_zero_points():
    w = helper.make_tensor("w", TensorProto.INT8, [64, 4], np.zeros(256, np.int8).tobytes(), raw=True)
    s = numpy_helper.from_array(np.ones((2, 4), np.float16), "s")
    z = numpy_helper.from_array(np.ones((2, 4), np.int8), "z")
    dq = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], name="dq", axis=0, block_size=32)
    mm = helper.make_node("MatMul", ["x", "wd"], ["y"])
    g = helper.make_graph([dq, mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])], [w, s, z])
    problems = weight_dq_problems(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    print(problems)
    assert any("zero point" in p for p in problems) and any("blocks ['INT4']" in p for p in problems)


def test_validation_against_pytorch_and_artifact(int4_bundle):
    bundle, result = int4_bundle
    a = result.artifact
    assert json.loads((bundle / "int4" / "quantization.json").read_text()) == a  # what was published
    same = a["validation"]["same_weights"]
    assert all(c["passed"] for checks in same.values() for c in checks)
    worst = max(c["max_abs"] for c in same["matmul_nbits"] if c["output"].startswith("logits"))
    quant = max(c["max_abs"] for c in a["validation"]["vs_fp32"] if c["output"].startswith("logits"))
    print(f"vs torch with the same dequantized weights {worst:.2e}; vs fp32 torch (quantization error) {quant:.2e}")
    assert worst < quant  # the graph check is far tighter than the quantization error it would otherwise hide
    assert a["method"] == "rtn" and a["bits"] == 4 and a["lm_head"] is True and a["lm_head_bits"] == 8
    # lm_head (the MatMul whose outputs are the vocabulary) keeps 8 bits in both forms, every other weight 4
    m = load_manifest(bundle)
    vocab, v = m.dims.vocab_size, m.variants["int4"]
    nbits = {n.name: ({a.name: a.i for a in n.attribute}["N"], {a.name: a.i for a in n.attribute}["bits"])
             for n in onnx.load(str(bundle / v.decoder.file)).graph.node if n.op_type == "MatMulNBits"}
    print({k: b for k, (_, b) in nbits.items()})
    assert sorted(b for n, b in nbits.values() if n == vocab) == [8]
    assert {b for n, b in nbits.values() if n != vocab} == {4} and len(nbits) == len(a["weights"])
    qdq = onnx.load(str(bundle / v.form("tensorrt").decoder.file))
    dtypes = sorted(t.data_type for t in qdq.graph.initializer if t.name.endswith("_quantized"))
    assert dtypes.count(TensorProto.INT8) == 1 and dtypes.count(TensorProto.INT4) == len(nbits) - 1
    # tiny graph: norms, scales and the 8-bit lm_head (a third of its weights) weigh more than at 7B (0.27)
    assert a["sizes"]["onnxruntime_ratio_vs_fp16"] <= 0.40
    # the summary line's context: the bytes this step wrote and the RSS it started from (the floor of the peak)
    written = sum(p.stat().st_size for p in (bundle / "int4").iterdir() if p.name != "quantization.json")
    assert a["bytes_written"] == written and 0 < a["baseline_rss_bytes"] <= a["peak_rss_bytes"]


@pytest.fixture(scope="module")
def grammar_int4(tmp_path_factory, grammar_checkpoint) -> Path:
    """A tiny model trained to answer in the `[0.ddd,0.ddd]` grammar, exported and quantized to int4 (RTN)."""
    from exporter.bundle import ExportConfig, export_bundle
    out = tmp_path_factory.mktemp("gi4") / "bundle"
    export_bundle(ExportConfig(grammar_checkpoint, out, precisions=("fp32",), max_persons=3))
    quantize_bundle(QuantizeConfig(out, bits=4, block_size=32, method="rtn", threads=1))
    return out


def test_template_and_free_token_identical_on_int4(grammar_int4):
    image = tiny.random_image(2)
    free = Estimator(grammar_int4, precision="int4", decoding="free").estimate(image, BOXES)
    template = Estimator(grammar_int4, precision="int4", decoding="template").estimate(image, BOXES)
    well_formed = sum(not f for r in free for f in r.flags)
    assert well_formed == 17 * len(BOXES), [r.answers for r in free]
    same = sum(a == b for f, t in zip(free, template, strict=True) for a, b in zip(f.tokens, t.tokens, strict=True))
    score = max(float(np.abs(f.keypoints[:, 2] - t.keypoints[:, 2]).max()) for f, t in zip(free, template))
    print(f"int4 template vs free: {same}/{17 * len(BOXES)} token-identical keypoints, max score diff {score:.2e}")
    assert same == 17 * len(BOXES) and score <= 1e-4


def test_gptq_variant_from_calibration_crops(tmp_path, tiny_bundle):
    """GPTQ on crops of a small synthetic COCO file (the project's own generator writes real COCO json + jpgs)."""
    from training.data.synthetic import SyntheticConfig, generate_dataset
    coco = generate_dataset(SyntheticConfig(num_images=2, seed=7), tmp_path / "coco")
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    result = quantize_bundle(QuantizeConfig(out, coco=coco / "person_keypoints.json", images=coco / "images",
                                            bits=8, block_size=32, samples=3, threads=1))
    a = result.artifact
    print(f"int8 output error: rtn {a['output_error']['rtn']:.2e}, gptq {a['output_error']['gptq']:.2e}; "
          f"weight bytes {a['sizes']['onnxruntime_ratio_vs_fp16']:.3f}x fp16")
    assert result.variant.precision == "int8wo" and a["data"]["persons"] == 3
    assert a["output_error"]["gptq"] < a["output_error"]["rtn"]
    assert a["sizes"]["onnxruntime_ratio_vs_fp16"] <= 0.62  # tiny graph: fp32 scales and norms weigh more
    est = Estimator(out, precision="int8wo", decoding="template")
    assert len(est.estimate(tiny.random_image(5), BOXES[:1])[0].answers) == 17


def test_tensorrt_build_uses_the_qdq_form_and_refuses_blocked_int8(int4_bundle, tmp_path):
    """`build --commands-only` (no TensorRT needed) writes trtexec lines for the int4 variant's Q/DQ form (fp16
    vision + blocked-int4 decoder); a blocked-int8 (int8wo) variant is refused before anything is built."""
    from exporter.trt_build import BuildConfig, build_engines
    from runtime.errors import BundleError
    bundle, _ = int4_bundle
    build_engines(BuildConfig(bundle, "int4", commands_only=True))
    script = (bundle / "trtexec_int4.sh").read_text()
    assert "--onnx=int4/decoder_qdq.onnx" in script and "--onnx=fp16/vision.onnx" in script
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    quantize_bundle(QuantizeConfig(copy, bits=8, block_size=32, method="rtn", threads=1))
    with pytest.raises(BundleError, match="blocked.*INT8"):
        build_engines(BuildConfig(copy, "int8wo", commands_only=True))


def test_variant_without_tensorrt_form_uses_its_own_graphs(tiny_bundle):
    """The `tensorrt` form is optional: a variant without it gives every backend the variant's own graphs."""
    from runtime.manifest import Manifest
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    for v in data["variants"].values():
        v.pop("tensorrt", None)
    m = Manifest.from_json(json.dumps(data))
    fp16 = m.variants["fp16"]
    assert fp16.tensorrt is None and fp16.form("tensorrt").decoder == fp16.decoder


def test_validation_against_another_checkpoint_is_refused(tmp_path, tokenizer_dir, tiny_bundle):
    """The PyTorch validation matches graph weights to checkpoint weights by value (streamed, one at a time): a
    checkpoint of the same shapes but other weights is named as the wrong one, and no variant is published."""
    from posellm.checkpoint import save_native
    other = tmp_path / "other"
    save_native(tiny.tiny_model(tiny.tiny_config(tokenizer_dir), seed=5), other, tokenizer_dir)
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    with pytest.raises(QuantizationError, match="no linear weight of the checkpoint matches"):
        quantize_bundle(QuantizeConfig(out, bits=4, block_size=32, method="rtn", checkpoint=other, threads=1))
    assert "int4" not in load_manifest(out).variants and not list(out.glob(".int4.tmp-*"))


def test_activation_quantization_beyond_its_bound_publishes_nothing(tmp_path, tiny_bundle, monkeypatch):
    """The level-4 sanity bound is a real gate: with a bound no int8-activation kernel meets, quantize refuses,
    names the figure and the way out, and leaves neither a variant nor the level-0 twin behind."""
    import calibration.quantize as quantize_module
    monkeypatch.setattr(quantize_module, "ACTIVATION_QUANT_BOUND", 0.0)
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    with pytest.raises(QuantizationError, match=r"accuracy level 4: .* use --accuracy-level 0"):
        quantize_bundle(QuantizeConfig(out, bits=8, block_size=32, method="rtn", threads=1))
    assert "int8wo" not in load_manifest(out).variants
    assert not list(out.glob(".int8wo.tmp-*")) and not list(out.rglob("*.level0.onnx"))
