"""Model pieces: the folded position embedding equals LocLLM's per-forward resampling; the image splice."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

import tiny
from posellm.model import PoseLLM


def _locllm_interpolate(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """LocLLM/DINOv2 `interpolate_pos_encoding`, re-stated here as the independent reference."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos = F.interpolate(pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim)
                              .permute(0, 3, 1, 2), scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
                              mode="bicubic")
    return torch.cat((pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def test_folded_position_embedding_equals_locllm_resampling(tokenizer_dir):
    model = tiny.tiny_model(tiny.tiny_config(tokenizer_dir))
    vit = model.vision_model
    expected = _locllm_interpolate(vit.pos_embed.detach(), 224, 224, 14)
    assert expected.shape[1] == 1 + 16 * 16
    vit.fold_position_embedding(16)
    diff = (vit.folded_pos_embed - expected).abs().max().item()
    print(f"folded vs per-forward pos embed max abs diff {diff:.2e} (tolerance 0)")
    assert diff == 0.0
    px = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        folded = vit(px)
        vit.folded_pos_embed = None
        live = vit(px)
    assert torch.equal(folded, live)


def test_image_embeddings_replace_the_patch_run(tokenizer_dir):
    cfg = tiny.tiny_config(tokenizer_dir)
    model = PoseLLM(cfg).eval()
    n = cfg.num_patches
    img = cfg.image_token_id
    ids = torch.tensor([[0, 0, 1, 5] + [img] * n + [7, 8], [1, 5, 6, 9] + [img] * n + [7, 8]])
    image_embeds = torch.randn(2, n, cfg.llm.hidden_size)
    with torch.no_grad():
        emb = model.embed(ids, image_embeds)
        table = model.llm.get_input_embeddings().weight
    assert torch.equal(emb[0, 4:4 + n], image_embeds[0]) and torch.equal(emb[1, 4:4 + n], image_embeds[1])
    assert torch.equal(emb[1, 0], table[1]) and torch.equal(emb[0, -1], table[8])
