"""Typed configuration of `training.train`: phases, model size, synthetic domain, objectives (strict JSON)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posellm.config import LLMConfig, LoRAConfig, PoseLLMConfig, VisionConfig, _strict
from .data.synthetic import DOMAIN_KEYS


@dataclass(frozen=True)
class PhaseConfig:
    steps: int
    minutes: float = 0.0  # wall-clock cap (0 = none)
    lr: float = 1e-3
    warmup_frac: float = 0.03


@dataclass(frozen=True)
class TrainConfig:
    # model
    crop_size: int = 112
    patch_size: int = 14
    vit_dim: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_intermediate: int = 344
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    llm_init_std: float = 0.0  # >0: re-initialise the LLM's linear and embedding weights N(0, std); 0 = HF 0.02
    # data
    data_dir: str = "/tmp/posellm-synth"
    train_images: int = 4000
    train_seed: int = 1000
    val_images: int = 80
    val_seed: int = 2000
    max_rounds: int = 5
    # 'conversation': up to max_rounds Q/A rounds in one sequence (later rounds see earlier answers);
    # 'shared_prefix': every round over one cached image prefix, as inference asks them (training.shared_prefix)
    round_layout: str = "conversation"
    ordinal_weight: float = 0.0  # shared_prefix: weight of the ordinal soft target on each coordinate's 2 first digits
    augment: bool = True
    rot_factor: float = 40.0  # augmentation rotation ±deg (p 0.5), LocLLM's 40
    # synthetic domain (SyntheticConfig), the same for train, probe and val sets
    background: str = "mixed"
    occluder_prob: float = 0.3
    truncation_prob: float = 0.15
    max_persons: int = 3
    probe_images: int = 0  # >0: AP on this many images of probe_seed (never the val seed) at each base checkpoint
    probe_seed: int = 3000
    # optimisation
    seed: int = 0
    batch_size: int = 16
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    vision: PhaseConfig = PhaseConfig(steps=0)  # optional ViT warm-up (0 steps = none)
    vision_batch_size: int = 64
    vision_stop_px: float = 0.0  # >0: the warm-up ends at the first probe whose mean pixel error is at most this
    pointer_weight: float = 0.0  # base phase: attention supervision (see lm_loss); 0 = plain cross-entropy
    pointer_layer: int = 1
    heatmap_weight: float = 0.0  # base phase: keep the vision warm-up's heatmap loss on the ViT tokens
    base: PhaseConfig = PhaseConfig(steps=1000)
    finetune: PhaseConfig = PhaseConfig(steps=200, lr=5e-4)
    log_every: int = 10
    checkpoint_minutes: float = 5.0
    threads: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        for key in ("vision", "base", "finetune"):
            if key in data:
                data[key] = _strict(PhaseConfig, data[key], key)
        return _strict(cls, data, "train config")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        if self.round_layout not in ("conversation", "shared_prefix"):
            raise ValueError(f"round_layout {self.round_layout!r}: expected 'conversation' or 'shared_prefix'")
        if not 0.0 <= self.ordinal_weight <= 1.0:
            raise ValueError(f"ordinal_weight {self.ordinal_weight}: expected a weight in [0, 1]")

    def domain(self) -> dict[str, Any]:
        """SyntheticConfig overrides of the data domain (`python -m training.data.synthetic` flags of the same names)."""
        return {key: getattr(self, key) for key in DOMAIN_KEYS}

    def model_config(self, vocab_size: int, image_token_id: int, lora: bool) -> PoseLLMConfig:
        grid = self.crop_size // self.patch_size
        return PoseLLMConfig(
            vision=VisionConfig(embed_dim=self.vit_dim, depth=self.vit_depth, num_heads=self.vit_heads,
                                patch_size=self.patch_size, pos_grid=grid),
            llm=LLMConfig(vocab_size=vocab_size, hidden_size=self.llm_hidden, intermediate_size=self.llm_intermediate,
                          num_hidden_layers=self.llm_layers, num_attention_heads=self.llm_heads,
                          num_key_value_heads=self.llm_heads, max_position_embeddings=1024),
            connector="mlp2x_gelu", crop_size=self.crop_size, normalization="clip", image_token_id=image_token_id,
            lora=LoRAConfig(llm_enable=lora, llm_r=self.lora_r, llm_alpha=self.lora_alpha, vision_enable=lora,
                            vision_r=self.lora_r, vision_alpha=self.lora_alpha, dropout=self.lora_dropout))
