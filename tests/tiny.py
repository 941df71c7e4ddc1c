"""Tiny test models and bundles shared by the tests (built in seconds, no downloads)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from posellm.config import PoseLLMConfig, preset
from posellm.model import PoseLLM
from posellm.small_tokenizer import build_small_tokenizer
from runtime.keypoints import standard_keypoints
from runtime.prompts import PromptTokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_tokenizer_dir(root: Path) -> Path:
    d = root / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    build_small_tokenizer().save(str(d / "tokenizer.json"))
    return d


def tiny_config(tokenizer_dir: Path, connector: str = "mlp2x_gelu", lora: bool = True,
                crop_size: int = 224) -> PoseLLMConfig:
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = preset("tiny", vocab_size=tok.get_vocab_size(), image_token_id=tok.token_to_id("<im_patch>"),
                 connector=connector).replace(crop_size=crop_size)
    if not lora:
        cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, llm_enable=False, vision_enable=False))
    return cfg


def tiny_model(cfg: PoseLLMConfig, seed: int = 0, lora_std: float = 0.05) -> PoseLLM:
    """Random tiny model with nonzero LoRA B matrices (so merging them matters)."""
    torch.manual_seed(seed)
    model = PoseLLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=lora_std)
    return model


def grammar_model(tokenizer_dir: Path, steps: int = 60, seed: int = 0) -> PoseLLM:
    """Train a tiny model (seconds) to answer `[0.ddd,0.ddd]</s>` with a fixed answer per keypoint, so its
    greedy output follows the grammar with clear margins. A 56 px crop (16 image tokens) keeps it fast."""
    torch.manual_seed(seed)
    cfg = tiny_config(tokenizer_dir, crop_size=56)
    model = PoseLLM(cfg).train()
    tok = PromptTokenizer(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    rows, labels = [], []
    for k, (name, desc) in enumerate(standard_keypoints()):
        prompt = tok.prompt_ids(name, desc, cfg.num_patches)
        answer = tok.encode_chunk(f"[0.{(k * 53) % 1000:03d},0.{(k * 71 + 5) % 1000:03d}]") + [tok.special.eos]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.special.pad)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros_like(ids)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(l)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(l), 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        px = torch.randn(len(rows), 3, cfg.crop_size, cfg.crop_size, generator=g)
        loss = model(px, ids, mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def random_image(seed: int = 0, size=(240, 320)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
