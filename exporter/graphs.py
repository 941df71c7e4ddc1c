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
    """(inputs_embeds, attention_mask, position_ids, prefix k/v × layers, past k/v × layers)
    → (logits, max_prob, argmax, digit_argmax for the last K positions, present k/v × layers).

    The greedy decision and the keypoint score need only the reductions: `max_prob` (the max softmax probability
    over the vocab, LocLLM's step confidence), `argmax` and `digit_argmax` (index into the answer digits `0`..`9`).
    The runtime reads those and leaves `logits` [B, K, vocab] on the device (17 × 4 × 32000 floats per pass on 7B).

    Shared-prefix attention: the batch holds `persons` groups of `batch / persons` consecutive rows (one person's
    keypoint queries), and every row of a group attends to the group's one copy of the prefix K/V (prompt prefix +
    image tokens, `[persons, kv_heads, prefix, D]`) before its own past/new tokens. The prefix is never repeated per
    row, so nothing scales with keypoints × prefix length except the attention itself, and the prefix scores of a
    group are one matmul. `attention_mask` covers prefix + past + new tokens (like transformers'), `present` only
    the non-prefix ones. The prefix prefill passes a one-token dummy prefix (zeros, masked out: its softmax weight
    is exactly 0) with persons = batch; its `present` is then the prefix of every later call. So no call has an
    empty prefix: no MatMul ever has a 0-length dimension (onnxruntime's CUDA EP rejects a 0-length inner dimension
    before 1.19, microsoft/onnxruntime#21483) and every Reshape's target shape is spelled out from Shape ops, never
    -1 (with `allowzero=1` the ONNX spec forbids -1 next to a 0, and TensorRT's shuffle layer rejects it).
    """

    def __init__(self, model: PoseLLM, logits_positions: int, digit_ids: tuple[int, ...]) -> None:
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
        self.register_buffer("digit_ids", torch.tensor(digit_ids, dtype=torch.int64), persistent=False)

    def _kv(self, t: torch.Tensor) -> torch.Tensor:
        """K/V heads repeated for grouped-query attention."""
        if self.num_kv_heads == self.num_heads:
            return t
        return t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *kv: torch.Tensor):
        n_layers = len(self.layers)
        prefix, past = kv[:2 * n_layers], kv[2 * n_layers:]
        dtype = inputs_embeds.dtype
        bsz, seq = inputs_embeds.shape[:2]
        persons, prefix_len = prefix[0].shape[0], prefix[0].shape[2]
        group = bsz // persons  # rows per person, explicit: no -1 in any Reshape (see the class docstring)
        past_len = past[0].shape[2]
        heads, hd = self.num_heads, self.head_dim
        # RoPE in fp32 like transformers, then cast to the activation dtype.
        freqs = position_ids.float()[:, :, None] * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
        # Additive masks, finite: [B,1,1,prefix] over the prefix (padding only: the dummy prefix of the prefix
        # prefill), [B,1,S,past+S] over past+new (causal over the new tokens, padding from attention_mask).
        zero, masked = torch.zeros((), dtype=torch.float32), torch.full((), MASK_VALUE, dtype=torch.float32)
        prefix_bias = torch.where(attention_mask[:, None, None, :prefix_len] > 0, zero, masked)
        key_pos = torch.arange(past_len + seq, device=inputs_embeds.device)
        query_pos = torch.arange(seq, device=inputs_embeds.device) + past_len
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & \
            (attention_mask[:, None, None, prefix_len:] > 0)
        bias = torch.where(allowed, zero, masked)
        scale = hd ** -0.5
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(h, layer.input_layernorm.weight, self.eps)
            k = attn.k_proj(x).view(bsz, seq, self.num_kv_heads, hd).transpose(1, 2)
            v = attn.v_proj(x).view(bsz, seq, self.num_kv_heads, hd).transpose(1, 2)
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            # The last layer only feeds the last K logits: every token still needs its K/V (the cache), but
            # queries, attention output and MLP run on the last K positions only (exact; -27% FLOPs at 3 layers).
            q_cos, q_sin, q_bias = cos, sin, bias
            if i == len(self.layers) - 1:
                x, h = x[:, -self.k:], h[:, -self.k:]
                q_cos, q_sin, q_bias = cos[:, :, -self.k:], sin[:, :, -self.k:], bias[:, :, -self.k:]
            q_len = x.shape[1]
            q = attn.q_proj(x).view(bsz, q_len, heads, hd).transpose(1, 2)
            q = q * q_cos + _rotate_half(q) * q_sin
            # A group's queries side by side: [B,H,S,D] → [persons, H, group * S, D].
            grouped = q.reshape(persons, group, heads, q_len, hd).transpose(1, 2) \
                .reshape(persons, heads, group * q_len, hd)
            s_prefix = (grouped @ self._kv(prefix[2 * i]).transpose(-2, -1)).float() * scale
            s_prefix = s_prefix.reshape(persons, heads, group, q_len, prefix_len).transpose(1, 2) \
                .reshape(bsz, heads, q_len, prefix_len) + prefix_bias
            s_own = (q @ self._kv(k).transpose(-2, -1)).float() * scale + q_bias  # scores and softmax in fp32
            probs = torch.cat((s_prefix, s_own), dim=-1).softmax(dim=-1).to(dtype)
            p_prefix = probs[..., :prefix_len].reshape(persons, group, heads, q_len, prefix_len).transpose(1, 2) \
                .reshape(persons, heads, group * q_len, prefix_len)
            o_prefix = (p_prefix @ self._kv(prefix[2 * i + 1])).reshape(persons, heads, group, q_len, hd) \
                .transpose(1, 2).reshape(bsz, heads, q_len, hd)
            o = o_prefix + probs[..., prefix_len:] @ self._kv(v)
            o = o.transpose(1, 2).reshape(bsz, q_len, heads * hd)
            h = h + attn.o_proj(o)
            x = _rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = _rms_norm(h, self.norm.weight, self.eps)  # already the last K positions
        logits = self.lm_head(h).float()
        # max softmax prob = 1 / sum(exp(logits - max)); indices as int32 (every engine's native index type)
        top = logits.max(dim=-1, keepdim=True).values
        max_prob = 1.0 / (logits - top).exp().sum(dim=-1)
        argmax = logits.argmax(dim=-1).to(torch.int32)
        digit_argmax = logits.index_select(-1, self.digit_ids).argmax(dim=-1).to(torch.int32)
        return (logits, max_prob, argmax, digit_argmax, *presents)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits", "max_prob", "argmax", "digit_argmax"]
    for i in range(num_layers):
        inputs += [f"prefix_key_values.{i}.key", f"prefix_key_values.{i}.value"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs
