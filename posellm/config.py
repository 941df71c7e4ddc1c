"""Typed configuration of a PoseLLM/LocLLM model (SPEC §1), with presets.

Every dataclass is frozen and built from dicts strictly: an unknown key is an error, so a typo in a config file
never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONNECTOR_KINDS = ("linear", "mlp2x_gelu")
NORMALIZATIONS = ("clip", "dino")


class ConfigError(ValueError):
    """A configuration value is unknown or out of range."""


@dataclass(frozen=True)
class VisionConfig:
    """DINOv2 ViT. `pos_grid` is the side of the position grid it was trained at (37 for 518 px / 14)."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    pos_grid: int = 37
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class LLMConfig:
    """LLaMA fields (HF LlamaConfig names)."""

    vocab_size: int = 32000  # Vicuna/LLaMA; LocLLM never resizes the table for <im_patch>
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA as LocLLM trains it: LLM q/v projections, ViT q/v thirds of the fused qkv; scale = alpha / r."""

    llm_enable: bool = False
    llm_r: int = 8
    llm_alpha: float = 16.0
    vision_enable: bool = False
    vision_r: int = 8
    vision_alpha: float = 16.0
    dropout: float = 0.05


@dataclass(frozen=True)
class PoseLLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    connector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
    crop_size: int = 224
    normalization: Literal["clip", "dino"] = "clip"
    # LocLLM adds `<im_patch>` to the tokenizer as id vocab_size without resizing the embedding table: image
    # positions are never looked up in it (their embeddings are the image features), so id == vocab_size is valid.
    image_token_id: int = 32000
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.connector not in CONNECTOR_KINDS:
            raise ConfigError(f"connector={self.connector!r}: expected one of {CONNECTOR_KINDS}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization={self.normalization!r}: expected one of {NORMALIZATIONS}")
        if self.crop_size % self.vision.patch_size:
            raise ConfigError(
                f"crop_size={self.crop_size} is not a multiple of patch_size={self.vision.patch_size}")
        if self.vision.embed_dim % self.vision.num_heads:
            raise ConfigError(f"vision embed_dim={self.vision.embed_dim} not divisible by "
                              f"num_heads={self.vision.num_heads}")
        if not 0 <= self.image_token_id <= self.llm.vocab_size:
            raise ConfigError(f"image_token_id={self.image_token_id} is beyond vocab_size={self.llm.vocab_size}: "
                              f"expected an id in the table or the one just after it (LocLLM's <im_patch> = "
                              f"vocab_size)")

    def check_image_token(self, tokenizer_id: int, tokenizer_source: str) -> None:
        """The tokenizer's `<im_patch>` id must be the one the weights were trained with (config `im_patch_token`)."""
        if tokenizer_id != self.image_token_id:
            raise ConfigError(f"{tokenizer_source}: <im_patch> id {tokenizer_id} disagrees with the model config's "
                              f"image token id {self.image_token_id} (im_patch_token): tokenizer and weights do "
                              f"not belong together")

    @property
    def grid(self) -> int:
        return self.crop_size // self.vision.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PoseLLMConfig":
        data = dict(data)
        nested = {"vision": VisionConfig, "llm": LLMConfig, "lora": LoRAConfig}
        for key, sub in nested.items():
            if key in data:
                data[key] = _strict(sub, data[key], key)
        return _strict(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PoseLLMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "PoseLLMConfig":
        return dataclasses.replace(self, **changes)


def _strict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected a subset of {sorted(names)}")
    return cls(**data)


def preset(name: str, *, vocab_size: int | None = None, image_token_id: int | None = None,
           connector: str | None = None) -> PoseLLMConfig:
    """`tiny` runs in seconds on a CPU; `posellm-7b` has ViT-L/14 + MLP + Vicuna-7B dims."""
    if name == "posellm-7b":
        cfg = PoseLLMConfig()
    elif name == "tiny":
        cfg = PoseLLMConfig(
            vision=VisionConfig(embed_dim=128, depth=2, num_heads=2, patch_size=14, pos_grid=37),
            llm=LLMConfig(vocab_size=32000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
            lora=LoRAConfig(llm_enable=True, llm_r=4, llm_alpha=8, vision_enable=True, vision_r=4,
                            vision_alpha=8, dropout=0.0),
        )
    else:
        raise ConfigError(f"preset {name!r}: expected one of ['tiny', 'posellm-7b']")
    changes: dict[str, Any] = {}
    if vocab_size is not None:
        changes["llm"] = dataclasses.replace(cfg.llm, vocab_size=vocab_size)
    if image_token_id is not None:
        changes["image_token_id"] = image_token_id
    if connector is not None:
        changes["connector"] = connector
    return cfg.replace(**changes)
