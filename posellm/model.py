"""PoseLLM / LocLLM: DINOv2 → connector → LLaMA, image embeddings spliced over the `<im_patch>` run."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .config import PoseLLMConfig
from .lora import LoRALinear, wrap_linear
from .vision import DinoVisionTransformer


def build_connector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear` (LocLLM) keys `mm_projector.weight`; `mlp2x_gelu` (PoseLLM) keys `mm_projector.0.*`/`.2.*`."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"connector {kind!r}: expected 'linear' or 'mlp2x_gelu'")


def llama_config(cfg: PoseLLMConfig, attn_implementation: str = "eager") -> LlamaConfig:
    c = cfg.llm
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, attn_implementation=attn_implementation,
    )


class PoseLLM(nn.Module):
    def __init__(self, cfg: PoseLLMConfig, attn_implementation: str = "eager") -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = DinoVisionTransformer(cfg.vision, cfg.lora)
        self.mm_projector = build_connector(cfg.connector, cfg.vision.embed_dim, cfg.llm.hidden_size)
        self.llm = LlamaForCausalLM(llama_config(cfg, attn_implementation))
        if cfg.lora.llm_enable:
            for layer in self.llm.model.layers:
                attn = layer.self_attn
                attn.q_proj = wrap_linear(attn.q_proj, cfg.lora.llm_r, cfg.lora.llm_alpha, cfg.lora.dropout)
                attn.v_proj = wrap_linear(attn.v_proj, cfg.lora.llm_r, cfg.lora.llm_alpha, cfg.lora.dropout)

    # -- pieces -------------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,crop,crop] → image embeddings [B, num_patches, hidden]."""
        return self.mm_projector(self.vision_model(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's run of `<im_patch>` replaced by that row's image embeddings."""
        is_image = input_ids == self.cfg.image_token_id
        counts = is_image.sum(dim=1)
        n = image_embeds.shape[1]
        if bool((counts != n).any()):
            raise ValueError(f"each prompt must hold exactly {n} <im_patch> tokens, got {counts.tolist()}")
        # Image positions are never looked up (LocLLM embeds only the text around the patch run): their id may be
        # vocab_size, one past the table. Any in-range id serves as the placeholder; the splice overwrites it.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        mask = is_image.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        """Full-sequence forward (used for training and parity tests). `pixel_values` has one crop per row."""
        inputs_embeds = self.embed(input_ids, self.encode_image(pixel_values))
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, use_cache=False)

    # -- LoRA ---------------------------------------------------------------------------------------------------
    def has_lora(self) -> bool:
        return any(isinstance(m, LoRALinear) for m in self.modules()) or any(
            b.attn.lora_r > 0 for b in self.vision_model.blocks)

    def merge_lora(self) -> "PoseLLM":
        """Fold every adapter into the base weights (in place); the config then says LoRA is off."""
        self.vision_model.merge_lora()
        for layer in self.llm.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                proj = getattr(attn, name)
                if isinstance(proj, LoRALinear):
                    setattr(attn, name, proj.merged())
        self.cfg = self.cfg.replace(lora=dataclasses.replace(self.cfg.lora, llm_enable=False, vision_enable=False))
        return self
