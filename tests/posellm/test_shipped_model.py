"""The model that ships in models/posellm-small: a real base + LoRA checkpoint within the 10 MB budget, with its own
tokenizer, trained (adapters moved off their zero init), and answering in the PoseLLM grammar."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from posellm.checkpoint import load_checkpoint
from posellm.data.synthetic import SyntheticConfig, render_image
from posellm.reference import ReferenceEstimator
from posellm.train import TrainConfig
from runtime.prompts import PromptTokenizer

MODEL = Path(__file__).resolve().parents[2] / "models" / "posellm-small"


def test_shipped_model_is_base_plus_trained_lora_within_budget():
    size = sum(f.stat().st_size for f in MODEL.iterdir() if f.is_file())
    print(f"models/posellm-small: {size / 1e6:.2f} MB on disk (limit 10 MB)")
    assert size <= 10_000_000
    model = load_checkpoint(MODEL)
    assert model.has_lora()
    lora_b = {n: float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and min(lora_b.values()) > 0, f"untrained adapters (B still 0): {lora_b}"
    cfg = TrainConfig.load(MODEL / "train_config.json")  # the shipped training config still parses
    assert cfg.crop_size == model.cfg.crop_size and cfg.patch_size == model.cfg.vision.patch_size
    assert model.cfg.num_patches == 256  # PoseLLM's 16x16 image-token grid
    assert (MODEL / "train_log.txt").read_text().count("final val") == 1


def test_shipped_model_answers_in_the_posellm_grammar():
    model = load_checkpoint(MODEL)
    est = ReferenceEstimator(model, PromptTokenizer.from_file(str(MODEL / "tokenizer.json")))
    image, persons = render_image(SyntheticConfig(num_images=1, seed=2000), 0)
    results = est.estimate(np.asarray(image), [p["bbox"] for p in persons[:1]])
    answers = results[0].answers
    print("answers:", answers)
    well_formed = [flag == "" for flag in results[0].flags]
    assert sum(well_formed) >= 15, f"{17 - sum(well_formed)} of 17 answers malformed: {results[0].flags}"
