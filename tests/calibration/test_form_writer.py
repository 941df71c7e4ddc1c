"""Both decoder forms written weight by weight (calibration/form_writer.py): each weight's ints leave memory as it
is added, a node whose bits differ from the others' (lm_head at 8 bits in an int4 set, the recipe issue #21 adds)
is written in its own bits in both forms, and what was written reads back exactly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from calibration import form_writer
from calibration.blockwise import quantize_rtn, unpack_matmul_nbits
from calibration.form_writer import WrittenWeights, load_weight
from calibration.weight_only import blocked_qdq_writer, matmul_nbits_writer, matmul_weights
from runtime.backends.base import Stopwatch
from runtime.backends.onnxruntime import OrtRunner
from runtime.decoding import Decoder
from runtime.manifest import load_manifest


@pytest.mark.parametrize("external", [True, False])
def test_mixed_bits_stream_into_both_forms_and_read_back(tiny_bundle, tmp_path, monkeypatch, external):
    if external:  # a 7B's layout: the weights in <graph>.data
        monkeypatch.setattr(form_writer, "EXTERNAL_DATA_THRESHOLD", 0)
    m = load_manifest(tiny_bundle)
    fp32 = m.variants["fp32"]
    src = tiny_bundle / fp32.decoder.file
    model = onnx.load(str(src), load_external_data=False)
    weights = matmul_weights(model)
    quantized = {n: quantize_rtn(load_weight(model, w, src.parent), 8 if n == "/lm_head/MatMul" else 4, 32, n)
                 for n, (_, w) in weights.items()}
    nbits = matmul_nbits_writer(src, tmp_path / "decoder.onnx", 0)
    qdq = blocked_qdq_writer(src, tmp_path / "decoder_qdq.onnx")
    for node, bq in quantized.items():
        nbits.add(node, bq)
        qdq.add(node, bq)
        held = sum(len(t.raw_data) for _, ts in (nbits.made[node], qdq.made[node]) for t in ts)
        assert held < 1024 * 4, f"{node}: {held} bytes of its tensors still held after add"  # streamed out
    nbits.finish()
    qdq.finish()
    assert (tmp_path / "decoder.onnx.data").exists() == external
    back = WrittenWeights(tmp_path / "decoder_qdq.onnx")
    g = onnx.load(str(tmp_path / "decoder.onnx"))
    packed = {n.name[:n.name.rindex("_Q")]: n for n in g.graph.node if n.op_type == "MatMulNBits"}
    inits = {t.name: t for t in g.graph.initializer}
    for node, bq in quantized.items():
        got = back[node]
        assert got.bits == bq.bits and np.array_equal(got.q, bq.q) and np.array_equal(got.scales, bq.scales)
        op = packed[node]
        attrs = {a.name: a.i for a in op.attribute}
        assert attrs["bits"] == bq.bits, node
        ints = unpack_matmul_nbits(onnx.numpy_helper.to_array(inits[op.input[1]]), bq.bits, attrs["K"],
                                   attrs["N"], 32)
        assert np.array_equal(ints, bq.q), node
    # the two forms compute the same prefill on onnxruntime (tolerance 1e-4 x max|logits|)
    embeds = np.random.default_rng(0).standard_normal((2, m.dims.num_patches, m.dims.hidden_size))
    suffixes = [list(k.suffix_ids) for k in m.prompts.keypoints]
    table = np.load(tiny_bundle / fp32.embedding)

    def logits(path):
        runner = OrtRunner(path, fp32.decoder, threads=1)
        out = Decoder(m, runner, table, lambda ids: "").prefill(embeds.astype(np.float32), suffixes, [],
                                                                Stopwatch())[0]
        return np.asarray(out.logits, np.float64)

    a, b = logits(tmp_path / "decoder.onnx"), logits(tmp_path / "decoder_qdq.onnx")
    d = np.abs(a - b).max()
    print(f"mixed bits (lm_head int8, rest int4), external={external}: MatMulNBits vs Q/DQ max|diff| {d:.2e}")
    assert d <= 1e-4 * np.abs(a).max()
