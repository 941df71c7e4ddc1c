"""The plain-PyTorch template baseline (benchmarks/torch_template.py) decodes what the runtime's template mode
decodes: same tokens, same keypoints, scores within 1e-4 (fp32 both sides; only reduction order differs)."""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

import tiny
from benchmarks.torch_template import TorchTemplateEstimator
from exporter.bundle import ExportConfig, export_bundle
from posellm.checkpoint import load_checkpoint
from runtime.estimator import Estimator
from runtime.prompts import PromptTokenizer

SCORE_TOL = 1e-4
BOXES = [[10, 20, 100, 150], [0, 0, 320, 240]]


def test_torch_template_equals_runtime_template(tmp_path, grammar_checkpoint):
    bundle = tmp_path / "bundle"
    export_bundle(ExportConfig(grammar_checkpoint, bundle, precisions=("fp32",), max_persons=2))
    tok = PromptTokenizer(Tokenizer.from_file(str(bundle / "tokenizer.json")))
    image = tiny.random_image(4)
    torch_side = TorchTemplateEstimator(load_checkpoint(grammar_checkpoint).merge_lora(), tok).estimate(image, BOXES)
    runtime = Estimator(bundle, decoding="template").estimate(image, BOXES)
    worst = 0.0
    for a, b in zip(torch_side, runtime, strict=True):
        assert a.tokens == b.tokens
        assert np.array_equal(a.keypoints[:, :2], b.keypoints[:, :2])
        worst = max(worst, float(np.abs(a.keypoints[:, 2] - b.keypoints[:, 2]).max()))
    print(f"torch template vs runtime template: tokens identical, max score diff {worst:.2e} (tol {SCORE_TOL})")
    assert worst <= SCORE_TOL
    assert all(a.keypoints[:, 2].min() > 0 for a in torch_side)  # grammar model: every keypoint scored
