"""Export-time torch modules: what exactly goes into `vision.onnx` and `decoder.onnx`.

The decoder is written out over the HF LLaMA weights instead of tracing `LlamaForCausalLM` because the graph must be
a plain function of explicit tensors: past K/V in, present K/V out, a finite additive mask, RoPE from position_ids,
logits for the last K positions only, no cache objects and no `If`. Export-time validation compares it with the HF
model, so any drift from transformers' semantics fails the export.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from posellm.model import PoseLLM

# Finite "minus infinity" for masked scores: exp() underflows to exactly 0 in fp32 and fp16, and a fully masked row
# (padding) stays finite instead of producing NaN. Representable in fp16 with head-room for the scores added to it.
MASK_VALUE = -30000.0


class VisionGraph(nn.Module):
    """pixel_values [B,3,S,S] → image_embeds [B, (S/patch)², hidden]: DINOv2 + connector."""

    def __init__(self, model: PoseLLM) -> None:
        super().__init__()
        self.vision = model.vision_model
        self.connector = model.mm_projector
        self.vision.fold_position_embedding(model.cfg.grid)
        self.out_dtype = next(self.connector.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.out_dtype)
        return self.connector(self.vision(x))


class Fp32LayerNorm(nn.Module):
    """LayerNorm whose statistics and affine run in fp32 whatever the activation dtype (fp16 graphs)."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.eps = ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)


def keep_norms_fp32(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(module, name, Fp32LayerNorm(child))
        else:
            keep_norms_fp32(child)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm exactly as transformers computes it: statistics in fp32, scale in the weight dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderGraph(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, past k/v × layers) → (logits[:, -K:], present k/v × layers)."""

    def __init__(self, model: PoseLLM, logits_positions: int) -> None:
        super().__init__()
        llm = model.llm
        cfg = model.cfg.llm
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        self.lm_head = llm.lm_head
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.k = logits_positions
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float()
                                             / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor):
        dtype = inputs_embeds.dtype
        bsz, seq = inputs_embeds.shape[:2]
        past_len = past[0].shape[2]
        # RoPE in fp32 like transformers, then cast to the activation dtype.
        freqs = position_ids.float()[:, :, None] * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
        # Additive mask [B,1,S,P+S]: causal over the new tokens, padding from attention_mask, finite everywhere.
        key_pos = torch.arange(past_len + seq, device=inputs_embeds.device)
        query_pos = torch.arange(seq, device=inputs_embeds.device) + past_len
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = torch.where(allowed, torch.zeros((), dtype=torch.float32),
                           torch.full((), MASK_VALUE, dtype=torch.float32))
        scale = self.head_dim ** -0.5
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(h, layer.input_layernorm.weight, self.eps)
            q = attn.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            if self.num_kv_heads != self.num_heads:  # grouped-query attention
                rep = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q @ k.transpose(-2, -1)).float() * scale + bias  # scores and softmax in fp32
            probs = scores.softmax(dim=-1).to(dtype)
            o = (probs @ v).transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
            h = h + attn.o_proj(o)
            x = _rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = _rms_norm(h[:, -self.k:], self.norm.weight, self.eps)
        logits = self.lm_head(h).float()
        return (logits, *presents)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs
