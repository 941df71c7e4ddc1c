"""The decoder run a few LLM layers per onnxruntime session (calibration/segmented.py) gives the whole graph's
outputs, taps included, and leaves no segment graph behind. On the shipped model that is bit for bit (the identity
test, test_quantize_identity.py, runs quantize's segmented sessions against the whole-graph record); on this tiny
random model a cut between its layers moves the fp32 logits by ~2e-7 (onnxruntime's kernels there), so the bound
here is 1e-5 x max|logits| — a wrong cut (a lost tensor, a split fusion of a weight and its dequantization)
moves them by orders of magnitude more."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calibration.gptq_statistics import layer_groups
from calibration.quantize import QuantizeConfig, quantize_bundle
from calibration.segmented import SegmentedRunner, layer_cuts
from calibration.weight_only import matmul_weights
from runtime.backends.base import Stopwatch
from runtime.backends.onnxruntime import OrtRunner, session_options
from runtime.decoding import Decoder
from runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, tiny_bundle):
    out = tmp_path_factory.mktemp("seg") / "bundle"
    shutil.copytree(tiny_bundle, out)
    quantize_bundle(QuantizeConfig(out, bits=4, block_size=32, method="rtn", threads=1), log=lambda _: None)
    return out


def _prefill(m, runner, embedding):
    embeds = np.random.default_rng(0).standard_normal((2, m.dims.num_patches, m.dims.hidden_size))
    suffixes = [list(k.suffix_ids) for k in m.prompts.keypoints]
    out = Decoder(m, runner, embedding, lambda ids: "").prefill(embeds.astype(np.float32), suffixes, [],
                                                                Stopwatch())[0]
    return runner.to_numpy(out.logits)


TOL = 1e-5


@pytest.mark.parametrize("precision", ["fp32"])
@pytest.mark.parametrize("per", [1, 2])
@pytest.mark.parametrize("resident", [0, 1 << 30])  # sessions per call / kept open
def test_segmented_prefill_is_the_whole_graphs_bit_for_bit(int4_bundle, precision, per, resident):
    m = load_manifest(int4_bundle)
    v = m.variants[precision]
    table = np.load(int4_bundle / v.embedding)
    whole = _prefill(m, OrtRunner(int4_bundle / v.decoder.file, v.decoder, threads=1), table)
    seg = SegmentedRunner(int4_bundle / v.decoder.file, v.decoder, m.dims.num_layers, lambda: session_options(1),
                          per, resident_bytes=resident)
    try:
        got = _prefill(m, seg, table)
        n = len(seg.segments)
    finally:
        seg.close()
    d = float(np.abs(got.astype(np.float64) - whole).max())
    tol = TOL * float(np.abs(whole).max())
    print(f"{precision}, {per} layer(s) per segment ({n} segments): max|segmented - whole| {d:.3e} (tolerance "
          f"{tol:.1e})")
    assert n == -(-m.dims.num_layers // per) + 1 and d <= tol
    assert not list((int4_bundle / precision).glob(".*segment-*"))


def test_taps_are_the_whole_graphs_intermediates(int4_bundle):
    """A tapped MatMul input from a segment equals the same tensor made a graph output of the whole graph."""
    m = load_manifest(int4_bundle)
    v = m.variants["fp32"]
    src = int4_bundle / v.decoder.file
    acts = sorted({a for a, _ in matmul_weights(onnx.load(str(src))).values()})
    model = onnx.load(str(src))
    model.graph.output.extend(helper.make_tensor_value_info(a, TensorProto.FLOAT, None) for a in acts)
    tapped = src.with_name("tapped.onnx")
    onnx.save(model, str(tapped))
    feeds = _feeds(m)
    try:
        import onnxruntime as ort
        sess = ort.InferenceSession(str(tapped), session_options(1), providers=["CPUExecutionProvider"])
        whole = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    finally:
        tapped.unlink()
    seg = SegmentedRunner(src, v.decoder, m.dims.num_layers, lambda: session_options(1), 1, taps=acts)
    try:
        got = seg(feeds)
    finally:
        seg.close()
    worst = max(float(np.abs(got[a] - whole[a]).max() / np.abs(whole[a]).max()) for a in acts + ["logits"])
    print(f"{len(acts)} tapped inputs + logits: max|segmented - whole| / max|whole| {worst:.3e} (tolerance {TOL})")
    assert worst <= TOL


def _feeds(m):
    d = m.dims
    rng = np.random.default_rng(1)
    kv = {}
    for i in range(d.num_layers):
        for kind in ("key", "value"):
            kv[f"prefix_key_values.{i}.{kind}"] = rng.standard_normal((2, d.num_kv_heads, 3, d.head_dim)).astype(
                np.float32)
            kv[f"past_key_values.{i}.{kind}"] = np.zeros((2, d.num_kv_heads, 0, d.head_dim), np.float32)
    return {"inputs_embeds": rng.standard_normal((2, 5, d.hidden_size)).astype(np.float32),
            "attention_mask": np.ones((2, 8), np.int64), "position_ids": np.tile(np.arange(3, 8), (2, 1)), **kv}


def test_cuts_and_groups_follow_the_layers(int4_bundle):
    """Cuts fall just before a layer's first projection (or its DequantizeLinear); groups hold whole layers with
    lm_head in the last one."""
    m = load_manifest(int4_bundle)
    L = m.dims.num_layers
    for f in ("fp32/decoder.onnx", "int4/decoder.onnx", "int4/decoder_qdq.onnx"):
        g = onnx.load(str(int4_bundle / f)).graph
        cuts = layer_cuts(g, L, 1)
        assert len(cuts) == L, f  # and lm_head alone
        assert all(g.node[c].op_type in ("MatMul", "MatMulNBits", "DequantizeLinear") for c in cuts), f
    nodes = list(matmul_weights(onnx.load(str(int4_bundle / "fp32/decoder.onnx"))))
    groups = layer_groups(nodes, L, 2)
    print([len(x) for x in groups])
    assert sum(groups, []) == nodes and groups[-1][-1] == "/lm_head/MatMul"
    assert len(groups) == -(-L // 2) and all(len(x) == 14 for x in groups[:-1])
