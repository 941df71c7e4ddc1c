"""LoRA layers with LocLLM's parameter names, so LocLLM checkpoints load without renaming.

LLM:  `...q_proj.lora_A` [r, in], `...q_proj.lora_B` [out, r] on an nn.Linear (loralib style).
ViT:  `blocks.N.attn.lora_A_q/lora_B_q/lora_A_v/lora_B_v` on the fused qkv (see vision.Attention).
The delta is `scale * B @ A` with scale = alpha / r.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scale * B @ A in fp32 (the one formula every merge uses: in-memory modules and streamed export alike)."""
    return (b.float() @ a.float()) * scaling


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scale * B @ A, summed in fp32 and returned in W's dtype."""
    return (weight.float() + lora_delta(a, b, scaling)).to(weight.dtype)


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if r <= 0:
            raise ValueError(f"LoRA rank r={r}: expected r >= 1")
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale * B @ A (computed in fp32, stored in the weight's dtype)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def wrap_linear(linear: nn.Linear, r: int, alpha: float, dropout: float) -> LoRALinear:
    """Replace a trained nn.Linear by a LoRALinear with the same base weights and B = 0 (no change yet)."""
    lora = LoRALinear(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None)
    lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        lora.weight.copy_(linear.weight)
        if linear.bias is not None:
            lora.bias.copy_(linear.bias)
    return lora
