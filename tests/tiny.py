"""Tiny test models and bundles shared by the tests (built in seconds, no downloads)."""
from __future__ import annotations

import dataclasses
import json
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


LOCLLM_VOCAB = 32000  # LLaMA's vocabulary; LocLLM's `<im_patch>` is id 32000, one past the embedding table


def locllm_tokenizer_dir(root: Path) -> Path:
    """The tokenizer files LocLLM's trainer saves, with a tokenizer of LLaMA's id layout: 32000 pieces and
    `<im_patch>` added as 32000 (added_tokens.json), pad = `<unk>`. tokenizer.json stands in for tokenizer.model
    (no SentencePiece model of 32000 pieces can be trained here; tests with ../shared use the real one)."""
    d = root / "locllm-tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok = build_small_tokenizer(base_vocab=LOCLLM_VOCAB)
    tok.save(str(d / "tokenizer.json"))
    (d / "added_tokens.json").write_text(json.dumps({"<im_patch>": tok.token_to_id("<im_patch>")}) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "model_max_length": 512, "padding_side": "right",
         "add_bos_token": True, "add_eos_token": False}) + "\n")
    return d


def locllm_checkpoint(out: Path, tokenizer_dir: Path, connector: str = "mlp2x_gelu", seed: int = 0,
                      safetensors: bool = False) -> Path:
    """A tiny checkpoint as LocLLM's training writes it (utils/train2d.py + transformers 4.31 save_pretrained):
    config.json with vocab_size 32000 and im_patch_token 32000, LLM base weights bf16, ViT / projector / LoRA fp32,
    two `pytorch_model-0000k-of-00002.bin` shards (or safetensors) with their index."""
    from exporter.tokenizer import bundle_tokenizer  # reads tokenizer.json or LocLLM's tokenizer.model
    from posellm.checkpoint import save_locllm
    image = PromptTokenizer(bundle_tokenizer(tokenizer_dir)).special.image
    cfg = preset("tiny", vocab_size=image, image_token_id=image, connector=connector)
    model = tiny_model(cfg, seed=seed)
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    save_locllm(model, out, tokenizer_dir, safetensors=safetensors, max_shard_bytes=int(total * 0.45))
    shards = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors"))
    assert len(shards) == 2, shards  # the fixture promises exactly what a 7B save looks like: 2 shards + index
    return out


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


def reference_estimator(checkpoint: Path, bundle: Path):
    """The PyTorch reference loaded from the checkpoint files, with the bundle's tokenizer."""
    from posellm.checkpoint import load_checkpoint
    from posellm.reference import ReferenceEstimator
    tok = PromptTokenizer(Tokenizer.from_file(str(bundle / "tokenizer.json")))
    return ReferenceEstimator(load_checkpoint(checkpoint).merge_lora(), tok)


def random_image(seed: int = 0, size=(240, 320)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
