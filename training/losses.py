"""The training objectives of `training.train`: answer cross-entropy with optional pointer (attention) and ViT
heatmap supervision, the vision warm-up's heatmap loss, and its pixel-error probe."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from posellm.model import PoseLLM
from .config import TrainConfig
from .samples import Sampler


def lm_loss(model: PoseLLM, sampler: Sampler, cfg: TrainConfig, pointer_weight: float = 0.0,
            heads: torch.nn.ModuleList | None = None, heatmap_weight: float = 0.0) -> Callable[[], Any]:
    """Answer-only cross-entropy of a fresh multi-round batch (HF shifts the labels).

    pointer_weight > 0 adds an attention-supervision term: at every row that predicts an answer token, head 0 of
    LLM layer `pointer_layer` should put its attention on the image tokens as the bilinear splat of that round's
    keypoint over the patch grid (cross-entropy; that head's attention is recomputed for those rows only, see
    PointerProbe, so the LLM keeps its fused attention). It forms the "look up keypoint k" circuit
    that plain cross-entropy only finds after a long plateau; the fine-tune phase uses plain cross-entropy.
    heatmap_weight > 0 (with the warm-up's `heads`) keeps the vision warm-up loss on the same crops' ViT tokens, so
    the ViT keeps localising while the LLM learns to read it.
    """
    pointer = PointerProbe(model.llm.model.layers[cfg.pointer_layer].self_attn) if pointer_weight > 0 else None

    def loss() -> torch.Tensor:
        batch = sampler.batch(cfg.batch_size, pointer=pointer_weight > 0, heat=heatmap_weight > 0)
        if pointer_weight <= 0 and heatmap_weight <= 0:
            return model(**batch).loss
        rows, target = batch.pop("pointer_rows", None), batch.pop("pointer_target", None)
        heat_target = batch.pop("heat_target", None)
        mask = batch["attention_mask"]
        tokens = model.vision_model(batch["pixel_values"])
        out = model.llm(inputs_embeds=model.embed(batch["input_ids"], model.mm_projector(tokens)),
                        attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        labels=batch["labels"], use_cache=False)
        total = out.loss
        if pointer is not None:
            start = sampler.builder.image_start
            attn = pointer.attention(rows)[:, start:start + target.shape[1]]
            total = total + pointer_weight * -(target * torch.log(attn + 1e-6)).sum(-1).mean()
        if heatmap_weight > 0:
            heat, where = heat_terms(model, heads, tokens, heat_target)
            total = total + heatmap_weight * (heat + 10.0 * where)
        return total, out.loss.detach()
    return loss


class PointerProbe:
    """Head 0's attention of one LlamaAttention for chosen query rows, recomputed from the inputs that module saw
    in the last forward (a pre-hook keeps them): eager attention for 1 head × the supervised rows instead of
    `output_attentions` (eager, every head of every layer, ~2.4× the cost of an SDPA step here). Causal masking is
    enough: sequences are right-padded, so a real row never sees padding."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.inputs: dict[str, Any] = {}
        attn.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs) -> None:
        self.inputs = {"hidden_states": kwargs.get("hidden_states", args[0] if args else None),
                       "position_embeddings": kwargs.get("position_embeddings")}

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [P, 2] (batch row, query position) → attention probabilities [P, sequence] of head 0."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        h, (cos, sin) = self.inputs["hidden_states"], self.inputs["position_embeddings"]
        d = self.attn.head_dim
        q = self.attn.q_proj(h)[..., :d].unsqueeze(1)  # [B, 1, T, d]
        k = self.attn.k_proj(h)[..., :d].unsqueeze(1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = (q[rows[:, 0], 0, rows[:, 1]].unsqueeze(1) * k[rows[:, 0], 0]).sum(-1) * self.attn.scaling
        keys = torch.arange(h.shape[1], device=h.device)
        return scores.masked_fill(keys[None, :] > rows[:, 1:2], float("-inf")).softmax(-1)


def patch_centres(grid: int) -> torch.Tensor:
    """[grid², 2] patch centres as (x, y) / crop side, row-major like the image tokens."""
    ij = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy"), -1).reshape(-1, 2)
    return (ij.float() + 0.5) / grid


def heat_terms(model: PoseLLM, heads: torch.nn.ModuleList, tokens: torch.Tensor, target: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-keypoint cross-entropy of a softmax over the patches against the bilinear splat (heads[0]),
    L1 of each token's own patch centre / crop (heads[1])) on ViT tokens [B, patches, dim]."""
    logp = heads[0](tokens).transpose(1, 2).log_softmax(-1)  # [B, 17, patches]
    labelled = target.sum(-1) > 0
    heat = -(target * logp).sum(-1)[labelled].mean()
    return heat, (heads[1](tokens) - patch_centres(model.cfg.grid)).abs().mean()


def heatmap_loss(model: PoseLLM, heads: torch.nn.ModuleList, sampler: Sampler, batch_size: int
                 ) -> Callable[[], torch.Tensor]:
    """Vision warm-up on the patch tokens: heat_terms' heatmap cross-entropy + 10 × its patch-centre L1, so that
    a token the LLM attends to also tells it *where* it is (values carry no RoPE position)."""
    patch = model.cfg.vision.patch_size

    def loss() -> tuple[torch.Tensor, torch.Tensor]:
        pixels, target, _ = sampler.heatmap_batch(batch_size, patch)
        heat, where = heat_terms(model, heads, model.vision_model(pixels), target)
        return heat + 10.0 * where, heat.detach()
    return loss


def heatmap_probe(model: PoseLLM, heads: torch.nn.ModuleList, batch: tuple[torch.Tensor, ...]) -> Callable[[], str]:
    """Pixel error of the heatmap's expected position (soft-argmax) on fixed un-augmented probe crops: the
    localisation the LLM can at best read out (AP >= 50 needs ~2 px at 112 px)."""
    pixels, target, coords = batch
    crop = model.cfg.crop_size

    def probe() -> str:  # probe.last_px: the mean error of the latest call (the warm-up's stop criterion)
        with torch.no_grad():
            tokens = model.vision_model(pixels)
            prob = heads[0](tokens).transpose(1, 2).softmax(-1)
            heat, _ = heat_terms(model, heads, tokens, target)
        labelled = target.sum(-1) > 0
        err = ((prob @ patch_centres(model.cfg.grid) - coords).norm(dim=-1) * crop)[labelled]
        probe.last_px = float(err.mean())  # type: ignore[attr-defined]
        return (f"heat ce {float(heat):.3f}, soft-argmax error mean {float(err.mean()):.2f} px, "
                f"median {float(err.median()):.2f} px ({int(labelled.sum())} keypoints)")
    return probe


def digit_ids(ptok) -> list[int]:
    """Token ids of the digits 0..9 as they appear inside an answer (LLaMA splits digits: one token each)."""
    head = ptok.encode_chunk("[0.")
    ids = ptok.encode_chunk("[0.0123456789")
    if ids[: len(head)] != head or len(ids) != len(head) + 10:
        raise ValueError(f"digits must be single tokens after '[0.', got {ids}")
    return ids[len(head):]


def ordinal_targets(labels: torch.Tensor, digits: list[int], vocab: int, weight: float, sigma: float = 1.0
                    ) -> torch.Tensor:
    """Soft targets [..., vocab] for digit labels: (1 - weight) × one-hot + weight × a Gaussian (σ in digit
    units) over the ten digit tokens, so a neighbouring digit costs less than a distant one."""
    table = torch.zeros(vocab, vocab)
    table[torch.arange(vocab), torch.arange(vocab)] = 1.0
    value = torch.arange(10, dtype=torch.float32)
    ids = torch.tensor(digits)
    for d, tok in enumerate(digits):
        g = torch.exp(-0.5 * ((value - d) / sigma) ** 2)
        table[tok] *= 1 - weight
        table[tok, ids] += weight * g / g.sum()
    return table[labels]


def rounds_loss(model: PoseLLM, sampler: Sampler, cfg: TrainConfig, pointer_weight: float = 0.0,
                heads: torch.nn.ModuleList | None = None, heatmap_weight: float = 0.0) -> Callable[[], Any]:
    """Answer cross-entropy over every labelled keypoint of each crop in the shared-prefix layout
    (training.shared_prefix), with ordinal soft targets on the first two digits of each coordinate
    (cfg.ordinal_weight), and the optional pointer and heatmap terms of lm_loss. Returns (total, answer CE)."""
    from .shared_prefix import DIGIT_SLOTS, KeptInputs, answer_rows, forward_rounds, head_attention
    kept = KeptInputs(model.llm.model.layers[cfg.pointer_layer].self_attn) if pointer_weight > 0 else None
    ptok = sampler.builder.ptok
    prefix_ids = ptok.prefix_ids()
    vocab = model.cfg.llm.vocab_size
    soft_slots = [s for s in DIGIT_SLOTS if s not in (5, 11)]  # the thousandths stay one-hot
    digits = digit_ids(ptok)

    def loss() -> tuple[torch.Tensor, torch.Tensor]:
        batch = sampler.rounds_batch(cfg.batch_size, cfg.max_rounds)
        fw = forward_rounds(model, batch, prefix_ids)
        rows = answer_rows(batch)  # [R, 14]
        logp = fw.logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, vocab)).log_softmax(-1)  # [R, 14, V]
        labels = batch.ids.gather(1, rows + 1)
        hard = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [R, 14]
        ce = hard.mean()
        if cfg.ordinal_weight > 0:
            soft = ordinal_targets(labels[:, soft_slots], digits, vocab, cfg.ordinal_weight)
            hard = hard.clone()
            hard[:, soft_slots] = -(soft * logp[:, soft_slots]).sum(-1)
        total = hard.mean()
        if kept is not None:
            keys = fw.cache.layers[cfg.pointer_layer].keys
            attn = head_attention(kept, keys, rows, fw.prefix_len)
            start = len(prefix_ids)
            image = attn[..., start:start + batch.splat.shape[1]]  # [R, 14, patches]
            total = total + pointer_weight * -(batch.splat.unsqueeze(1) * torch.log(image + 1e-6)).sum(-1).mean()
        if heatmap_weight > 0:
            heat, where = heat_terms(model, heads, fw.tokens, batch.heat)
            total = total + heatmap_weight * (heat + 10.0 * where)
        return total, ce.detach()
    return loss
