"""What training checks at each probe: is the LLM reading the image? (issue #21, item 3)

On fixed, un-augmented probe crops in the shared-prefix layout: the cross-entropy of each of the six answer digits,
the *image-shuffle gap* (digit CE with another crop's image tokens minus with the right crop's: ~0 means the LLM
ignores the image), and the pointer head's hit rate (its most-attended image patch is one of the 4 patches the
keypoint's bilinear splat covers).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from posellm.model import PoseLLM

from .shared_prefix import DIGIT_SLOTS, KeptInputs, RoundBatch, answer_rows, forward_rounds, head_attention


def digit_ce(model: PoseLLM, batch: RoundBatch, prefix_ids: list[int], image_embeds: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, object]:
    """→ (CE per digit slot [6], answer rows [R, 14], the forward)."""
    fw = forward_rounds(model, batch, prefix_ids, image_embeds)
    rows = answer_rows(batch)
    vocab = fw.logits.shape[-1]
    logp = fw.logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, vocab)).log_softmax(-1)
    labels = batch.ids.gather(1, rows + 1)
    ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [R, 14]
    return ce[:, list(DIGIT_SLOTS)].mean(0), rows, fw


def answer_probe(model: PoseLLM, batch: RoundBatch, prefix_ids: list[int], pointer_layer: int
                 ) -> Callable[[], str]:
    kept = KeptInputs(model.llm.model.layers[pointer_layer].self_attn)
    start = len(prefix_ids)

    def probe() -> str:
        with torch.no_grad():
            right, rows, fw = digit_ce(model, batch, prefix_ids)
            attn = head_attention(kept, fw.cache.layers[pointer_layer].keys, rows, fw.prefix_len)
            image = attn[..., start:start + batch.splat.shape[1]]  # [R, 14, patches]
            top = image.argmax(-1)  # [R, 14]
            hit = batch.splat.gather(1, top) > 0
            mass = (image * (batch.splat.unsqueeze(1) > 0)).sum(-1).mean()
            other = model.mm_projector(model.vision_model(batch.pixel_values)).roll(1, dims=0)
            shuffled, _, _ = digit_ce(model, batch, prefix_ids, other)
        per = " ".join(f"{v:.2f}" for v in right.tolist())
        return (f"digit ce [x3 y3] {per} (mean {float(right.mean()):.3f}); shuffle gap "
                f"{float((shuffled - right).mean()):+.3f} nats; pointer hit {float(hit.float().mean()):.2f}, "
                f"mass on splat {float(mass):.2f} ({batch.ids.shape[0]} rounds)")
    return probe
