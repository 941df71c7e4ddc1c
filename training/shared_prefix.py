"""Every keypoint's question of a crop over one shared image prefix: the training layout of inference itself.

Inference asks each keypoint in its own prompt, `prefix + <im_patch>×N + suffix(k)`, and never shows one round to
another. The conversation layout of `samples.SequenceBuilder` puts up to 5 rounds in one sequence, so later rounds
see earlier answers (not what inference sees) and the image forward is paid per 5 answers. Here the LLM runs the
prefix (text prefix + image tokens) once per crop with a KV cache, and the crop's rounds — every labelled keypoint,
up to 17 — run as a batch of suffixes over copies of that cache (positions continue after the prefix, as in a
single prompt). Exactly the computation of 17 separate prompts (tested), at one prefix forward per crop.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, LlamaForCausalLM

from posellm.model import PoseLLM

from .samples import IGNORE_INDEX, SequenceBuilder

# transformers 5 names the KV-cache argument `cache`; 4.x `past_key_values`
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
ANSWER_LEN = 14  # "[0.ddd,0.ddd]" is 13 tokens in both tokenizers, plus </s>
DIGIT_SLOTS = (3, 4, 5, 9, 10, 11)  # answer positions of x's and y's three digits


@dataclass
class RoundBatch:
    """B crops and R rounds. `owner[r]` is round r's crop; `ids`/`labels`/`mask` [R, L] are right-padded
    suffix + answer + </s> rows (labels: answer tokens, as HF labels, unshifted); `first[r]` the row of the last
    suffix token (it predicts the answer's first token); `keypoint[r]` the keypoint index; `splat` [R, patches] its
    bilinear splat on the patch grid (pointer target); `heat` [B, 17, patches] every keypoint's splat per crop."""
    pixel_values: torch.Tensor
    owner: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    first: torch.Tensor
    keypoint: torch.Tensor
    splat: torch.Tensor
    heat: torch.Tensor


def build_rounds(samples: list[tuple[np.ndarray, np.ndarray, list[int], np.ndarray]], builder: SequenceBuilder
                 ) -> RoundBatch:
    """samples: (pixels, joints in crop px [17,2], keypoints to ask, splats [17, patches]) per crop."""
    rows, owner, firsts, kps = [], [], [], []
    for b, (_, pts, keypoints, _) in enumerate(samples):
        for k in keypoints:
            suffix = builder.suffixes[k]
            answer = builder.answer_ids(float(pts[k, 0]), float(pts[k, 1]))
            rows.append((suffix + answer, [IGNORE_INDEX] * len(suffix) + answer))
            owner.append(b)
            firsts.append(len(suffix) - 1)
            kps.append(k)
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), builder.ptok.special.pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    heat = np.stack([s[3] for s in samples])
    owner_t = torch.tensor(owner)
    return RoundBatch(
        pixel_values=torch.from_numpy(np.stack([s[0] for s in samples])), owner=owner_t, ids=ids, labels=labels,
        mask=mask, first=torch.tensor(firsts), keypoint=torch.tensor(kps),
        splat=torch.from_numpy(heat[owner_t.numpy(), np.array(kps)]), heat=torch.from_numpy(heat))


class KeptInputs:
    """A forward pre-hook on one LlamaAttention keeping the inputs of its last call (hidden states and RoPE), so a
    loss can recompute one head's attention for chosen rows without `output_attentions` (eager, every head)."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.hidden: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        attn.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs) -> None:
        self.hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.rope = kwargs.get("position_embeddings")


@dataclass
class PrefixForward:
    logits: torch.Tensor      # [R, L, vocab] over the suffix rows
    tokens: torch.Tensor      # [B, patches, vit_dim]: ViT output (for the heatmap term)
    cache: DynamicCache       # per round: prefix + suffix keys/values (post-RoPE)
    prefix_len: int


def forward_rounds(model: PoseLLM, batch: RoundBatch, prefix_ids: list[int],
                   image_embeds: torch.Tensor | None = None) -> PrefixForward:
    """The prefix once per crop, then every round's suffix over its crop's cached prefix. `image_embeds`
    [B, patches, hidden] replaces the crops' own (the shuffle probe passes another crop's)."""
    tokens = model.vision_model(batch.pixel_values)
    image = model.mm_projector(tokens) if image_embeds is None else image_embeds
    B = image.shape[0]
    head = model.llm.get_input_embeddings()(torch.tensor(prefix_ids)).unsqueeze(0).expand(B, -1, -1)
    prefix = torch.cat([head, image.to(head.dtype)], dim=1)
    P = prefix.shape[1]
    out = model.llm.model(inputs_embeds=prefix, position_ids=torch.arange(P).unsqueeze(0).expand(B, -1),
                          use_cache=True)
    shared = out.cache if hasattr(out, "cache") else out.past_key_values
    cache = DynamicCache()
    for layer, kept in enumerate(shared.layers):
        cache.update(kept.keys[batch.owner], kept.values[batch.owner], layer)
    R, L = batch.ids.shape
    mask = torch.cat([torch.ones(R, P, dtype=batch.mask.dtype), batch.mask], dim=1)
    res = model.llm(inputs_embeds=model.llm.get_input_embeddings()(batch.ids), attention_mask=mask,
                    position_ids=(P + torch.arange(L)).unsqueeze(0).expand(R, -1), use_cache=True,
                    **{_CACHE_KW: cache})
    return PrefixForward(logits=res.logits, tokens=tokens, cache=cache, prefix_len=P)


def answer_rows(batch: RoundBatch) -> torch.Tensor:
    """[R, 14] sequence rows predicting each answer token (row t predicts token t + 1)."""
    return batch.first.unsqueeze(1) + torch.arange(ANSWER_LEN)


def head_attention(kept: KeptInputs, cache_keys: torch.Tensor, rows: torch.Tensor, prefix_len: int,
                   head: int = 0) -> torch.Tensor:
    """Attention probabilities [R, n, prefix + L] of one head at suffix rows [R, n], recomputed from the layer's
    kept inputs and its cached (rotated) keys [R, heads, prefix + L, d]; causal, so right padding is never seen."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = kept.attn
    d = attn.head_dim
    cos, sin = kept.rope
    q = attn.q_proj(kept.hidden)[..., head * d:(head + 1) * d].unsqueeze(1)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    q = q[:, 0].gather(1, rows.unsqueeze(-1).expand(-1, -1, d))  # [R, n, d]
    scores = q @ cache_keys[:, head].transpose(1, 2) * attn.scaling  # [R, n, T]
    keys = torch.arange(cache_keys.shape[2])
    hidden = keys[None, None, :] > (prefix_len + rows).unsqueeze(-1)
    return scores.masked_fill(hidden, float("-inf")).softmax(-1)
