"""The runtime on the ONNX spec's own semantics: every onnxruntime session replaced by `onnx.reference`.

onnxruntime's CPU kernels are lenient where the spec is not (a Reshape with -1 beside a 0 under allowzero=1 is
resolved silently; a MatMul over a 0-length inner dimension returns zeros), and TensorRT follows the spec. Running
prefix prefill → suffix prefill → cached steps through `ReferenceEvaluator` proves the graphs are valid ONNX for
every shape the runtime sends, and the same answers as onnxruntime prove it is the same computation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_matmul import MatMul as _SpecMatMul

import tiny
from runtime import estimator as estimator_mod
from runtime.backends.base import GraphRunner
from runtime.estimator import Estimator

BOXES = [[10, 20, 100, 150], [120, 30, 90, 200], [0, 0, 320, 240]]
SCORE_TOL = {"fp32": 1e-5, "fp16": 2e-3}  # numpy vs onnxruntime kernels: summation order only


class MatMul(_SpecMatMul):
    """The spec's MatMul, recording every call with a 0-length dimension (onnxruntime's CUDA EP rejected a 0-length
    inner dimension before 1.19; the graphs must never need one)."""

    op_domain = ""
    empty_calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def _run(self, a, b):
        if 0 in a.shape or 0 in b.shape:
            MatMul.empty_calls.append((a.shape, b.shape))
        return super()._run(a, b)


class ReferenceRunner(GraphRunner):
    """A GraphRunner over `onnx.reference.ReferenceEvaluator` (numpy in, numpy out)."""

    def __init__(self, path: Path, spec) -> None:
        self.spec = spec
        self.session = ReferenceEvaluator(onnx.load(str(path)), new_ops=[MatMul])
        self.calls: list[dict[str, tuple[int, ...]]] = []

    def run(self, inputs, keep_on_device=()):
        self.calls.append({k: np.shape(v) for k, v in inputs.items()})
        outputs = self.session.run(None, {k: np.asarray(v) for k, v in inputs.items()})
        return dict(zip(self.session.output_names, outputs))


# fp16 free decoding of the random tiny model meets near-ties that numpy's fp16 matmul and onnxruntime's round
# differently (1 of 51 keypoints diverges at its 9th token): there the sequences are compared by their first token.
# speculative (no drafts: every row verifies windows of up to K tokens, left-padded and masked per row)
@pytest.mark.parametrize("precision,decoding,whole", [("fp32", "template", True), ("fp32", "free", True),
                                                      ("fp16", "template", True), ("fp16", "free", False),
                                                      ("fp32", "speculative", True)])
def test_reference_evaluator_gives_onnxruntime_answers(tiny_bundle, monkeypatch, decoding, precision, whole):
    image = tiny.random_image(4)
    want = Estimator(tiny_bundle, precision=precision, decoding=decoding, max_batch=34).estimate(image, BOXES)
    runners: list[ReferenceRunner] = []

    def open_reference(backend, bundle, graph_spec, engine=None, threads=None, trt_ep=None):
        runners.append(ReferenceRunner(Path(bundle) / graph_spec.file, graph_spec))
        return runners[-1]

    monkeypatch.setattr(estimator_mod, "open_runner", open_reference)
    MatMul.empty_calls.clear()
    # max_batch=34: persons 1-2 share a decoder batch (two prefix groups), person 3 runs alone
    est = Estimator(tiny_bundle, precision=precision, decoding=decoding, max_batch=34)
    got = est.estimate(image, BOXES)
    decoder_calls = runners[1].calls
    prefix_lens = [c["prefix_key_values.0.key"][2] for c in decoder_calls]
    past_lens = [c["past_key_values.0.key"][2] for c in decoder_calls]
    pairs = [(a, b) for w, g in zip(want, got, strict=True) for a, b in zip(w.tokens, g.tokens, strict=True)]
    same = sum(a == b for a, b in pairs)
    max_score = max(float(np.abs(a.keypoints[:, 2] - b.keypoints[:, 2]).max()) for a, b in zip(want, got))
    print(f"{precision} {decoding}: {len(decoder_calls)} decoder calls (prefix lengths {sorted(set(prefix_lens))}, "
          f"past up to {max(past_lens)}); {same}/{len(pairs)} keypoints token-identical to onnxruntime, max score "
          f"diff {max_score:.2e} (tol {SCORE_TOL[precision]})")
    assert len(pairs) == 17 * len(BOXES)
    if whole:
        assert same == len(pairs)
        assert [r.answers for r in got] == [r.answers for r in want]
        assert max_score <= SCORE_TOL[precision]
    else:
        assert all(a[0] == b[0] for a, b in pairs)
    assert prefix_lens.count(1) == 2, "one prefix prefill (a one-token dummy prefix) per decoder batch"
    assert max(past_lens) > 0, "cached decode steps ran"
    assert MatMul.empty_calls == [], f"MatMul with a 0-length dimension: {MatMul.empty_calls[:3]}"
