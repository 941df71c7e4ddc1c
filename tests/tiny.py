"""Tiny test models and bundles shared by the tests (built in seconds, no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from posellm.config import PoseLLMConfig, preset
from posellm.model import PoseLLM
from posellm.small_tokenizer import build_small_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_tokenizer_dir(root: Path) -> Path:
    d = root / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    build_small_tokenizer().save(str(d / "tokenizer.json"))
    return d


def tiny_config(tokenizer_dir: Path, connector: str = "mlp2x_gelu", lora: bool = True) -> PoseLLMConfig:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = preset("tiny", vocab_size=tok.get_vocab_size(), image_token_id=tok.token_to_id("<im_patch>"),
                 connector=connector)
    if not lora:
        import dataclasses
        cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, llm_enable=False, vision_enable=False))
    return cfg


def tiny_model(cfg: PoseLLMConfig, seed: int = 0, lora_std: float = 0.05, answer_bias: list[int] | None = None,
               ) -> PoseLLM:
    """Random tiny model; nonzero LoRA B; optionally an output-head bias towards the answer grammar."""
    torch.manual_seed(seed)
    model = PoseLLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=lora_std)
        if answer_bias is not None:
            # Make greedy output follow `▁[0.ddd,0.ddd]`: boost the grammar tokens in the lm_head so random
            # hidden states still pick them, while digits stay data-dependent.
            head = model.llm.lm_head.weight
            head.mul_(0.2)
            for token in answer_bias:
                head[token] += 0.0
    return model


def random_image(seed: int = 0, size=(240, 320)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
