"""DINOv2 ViT with the official parameter names (`patch_embed.proj`, `blocks.N.attn.qkv`, `ls1.gamma`, ...).

Written out (rather than transformers' Dinov2Model) because (1) LocLLM checkpoints use these names and put LoRA on
the q and v thirds of the fused qkv, and (2) export needs the position embedding resampled once and folded as a
constant, plain softmax attention and exact GELU.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import LoRAConfig, VisionConfig
from .lora import lora_delta


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as DINOv2
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def merge_qkv_lora(qkv: torch.Tensor, a_q: torch.Tensor, b_q: torch.Tensor, a_v: torch.Tensor, b_v: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """The fused qkv weight with the q and v adapters folded into its first and last thirds (fp32 sums, qkv's dtype)."""
    dim = qkv.shape[1]
    with torch.no_grad():
        w = qkv.float().clone()  # .float() of an fp32 weight is the weight itself: never add into the caller's
        w[:dim] += lora_delta(a_q, b_q, scaling)
        w[2 * dim:] += lora_delta(a_v, b_v, scaling)
    return w.to(qkv.dtype)


class Attention(nn.Module):
    """Fused-qkv attention; optional LoRA on the q and v thirds (LocLLM's LoRADINOAttention)."""

    def __init__(self, dim: int, num_heads: int, lora_r: int = 0, lora_alpha: float = 1.0,
                 lora_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.lora_r = lora_r
        if lora_r > 0:
            self.lora_scaling = lora_alpha / lora_r
            self.lora_A_q = nn.Parameter(torch.zeros(lora_r, dim))
            self.lora_B_q = nn.Parameter(torch.zeros(dim, lora_r))
            self.lora_A_v = nn.Parameter(torch.zeros(lora_r, dim))
            self.lora_B_v = nn.Parameter(torch.zeros(dim, lora_r))
            self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            nn.init.kaiming_uniform_(self.lora_A_q, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_A_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        if self.lora_r > 0:
            xd = self.lora_dropout(x)
            q = q + F.linear(F.linear(xd, self.lora_A_q), self.lora_B_q) * self.lora_scaling
            v = v + F.linear(F.linear(xd, self.lora_A_v), self.lora_B_v) * self.lora_scaling
        # explicit head size, no -1: exported Reshapes stay valid under allowzero=1 (exporter/reshape_check.py)
        q, k, v = (t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        # softmax in fp32 even in an fp16 model/graph (no-op in fp32)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    def merge_lora(self) -> None:
        """Fold the q/v adapters into the fused qkv weight and drop them."""
        if self.lora_r == 0:
            return
        with torch.no_grad():
            self.qkv.weight.copy_(merge_qkv_lora(self.qkv.weight, self.lora_A_q, self.lora_B_q, self.lora_A_v,
                                                 self.lora_B_v, self.lora_scaling))
        for name in ("lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v", "lora_dropout"):
            delattr(self, name)
        self.lora_r = 0


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, lora: LoRAConfig | None) -> None:
        super().__init__()
        dim = cfg.embed_dim
        r = lora.vision_r if lora is not None and lora.vision_enable else 0
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, r, lora.vision_alpha if r else 1.0, lora.dropout if r else 0.0)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The official DINOv2 resampling (what LocLLM runs at every forward): bicubic with scale (grid+0.1)/N."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if side == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    factor = (grid + 0.1) / side
    patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                              scale_factor=(factor, factor), mode="bicubic")
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"resampled position grid {tuple(patch_pos.shape[-2:])}, expected {(grid, grid)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((cls_pos, patch_pos), dim=1).to(pos_embed.dtype)


class DinoVisionTransformer(nn.Module):
    """Returns the final-norm patch tokens with CLS dropped (`x_norm_patchtokens`): [B, grid², embed]."""

    def __init__(self, cfg: VisionConfig, lora: LoRAConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept for checkpoint compatibility
        self.blocks = nn.ModuleList(Block(cfg, lora) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.folded_pos_embed: torch.Tensor | None = None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def fold_position_embedding(self, grid: int) -> None:
        """Resample once for the crop grid; forward then adds a constant (no Resize op in an exported graph)."""
        with torch.no_grad():
            self.folded_pos_embed = interpolate_pos_embed(self.pos_embed, grid).detach().clone()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        grid = pixel_values.shape[-1] // self.cfg.patch_size
        pos = self.folded_pos_embed
        if pos is None or pos.shape[1] != x.shape[1]:
            pos = interpolate_pos_embed(self.pos_embed, grid)
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]

    def merge_lora(self) -> None:
        for block in self.blocks:
            block.attn.merge_lora()
