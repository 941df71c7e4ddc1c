"""Export-time validation: onnxruntime (CPU) on the written graphs vs the merged PyTorch model.

Shapes differ from the tracing shapes (batch 3 vs 2, 7-token prefill vs 3, past 0 and 7..9 vs 5), one row is left
padded, and the decoder is driven like the runtime drives it: a prefill, then three single-token steps through the
KV cache. The reference is the HF model on the whole sequence, so the check covers cache handling, RoPE positions and
masking, not just one forward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from posellm.model import PoseLLM

# |ort - torch| <= atol + rtol * max|torch|, per output. fp32: only reduction order differs. fp16: weights and
# activations rounded to 11-bit mantissas through every layer.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}


class ValidationError(RuntimeError):
    """An exported graph disagrees with the PyTorch model beyond the stated tolerance."""


@dataclass(frozen=True)
class Check:
    output: str
    max_abs: float
    max_rel: float
    ref_max: float
    tolerance: float
    passed: bool


@dataclass(frozen=True)
class PrecisionReference:
    """Reference outputs computed once from the fp32 model, before it is cast for lower precisions."""

    pixel_values: np.ndarray
    image_embeds: np.ndarray
    embeds: np.ndarray  # [B, T, H] prefill + 3 step tokens
    mask: np.ndarray  # [B, T]
    logits: np.ndarray  # [B, T, V]
    prefill: int


@torch.inference_mode()
def reference_outputs(model: PoseLLM, seed: int = 0) -> PrecisionReference:
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    model = model.float().eval()
    px = torch.randn(3, 3, cfg.crop_size, cfg.crop_size, generator=g)
    image_embeds = model.encode_image(px)
    prefill, steps, batch = 7, 3, 3
    total = prefill + steps
    ids = torch.randint(3, cfg.llm.vocab_size, (batch, total), generator=g)
    mask = torch.ones(batch, total, dtype=torch.int64)
    mask[0, :2] = 0  # row 0 left padded
    embeds = model.llm.get_input_embeddings()(ids)
    embeds[1, 2:5] = image_embeds[1, :3]  # a few image embeddings among the text, as in real prompts
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return PrecisionReference(px.numpy(), image_embeds.numpy(), embeds.numpy(), mask.numpy(),
                              logits.float().numpy(), prefill)


def _check(name: str, got: np.ndarray, ref: np.ndarray, precision: str) -> Check:
    atol, rtol = TOLERANCES[precision]
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    diff = np.abs(got - ref)
    ref_max = float(np.abs(ref).max())
    tol = atol + rtol * ref_max
    finite = bool(np.isfinite(got).all())
    max_abs = float(diff.max()) if finite else float("inf")
    return Check(name, max_abs, float((diff / (np.abs(ref) + 1e-6)).max()) if finite else float("inf"),
                 ref_max, tol, finite and max_abs <= tol)


def validate_variant(ref: PrecisionReference, vision_path: Path, decoder_path: Path, precision: str,
                     num_layers: int, kv_heads: int, head_dim: int, logits_positions: int) -> list[Check]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    vision = ort.InferenceSession(str(vision_path), opts, providers=providers)
    decoder = ort.InferenceSession(str(decoder_path), opts, providers=providers)
    act = np.float16 if precision == "fp16" else np.float32
    checks = [_check("image_embeds", vision.run(None, {"pixel_values": ref.pixel_values})[0], ref.image_embeds,
                     precision)]

    batch, p = ref.embeds.shape[0], ref.prefill
    past = {f"past_key_values.{i}.{kv}": np.zeros((batch, kv_heads, 0, head_dim), act)
            for i in range(num_layers) for kv in ("key", "value")}
    pos = np.clip(ref.mask.cumsum(-1) - 1, 0, None).astype(np.int64)
    names = [o.name for o in decoder.get_outputs()]
    feeds = {"inputs_embeds": ref.embeds[:, :p].astype(act), "attention_mask": ref.mask[:, :p],
             "position_ids": pos[:, :p], **past}
    outs = dict(zip(names, decoder.run(None, feeds)))
    k = min(logits_positions, p)
    checks.append(_check("logits/prefill", outs["logits"], ref.logits[:, p - k:p], precision))
    for step in range(ref.embeds.shape[1] - p):
        t = p + step
        feeds = {"inputs_embeds": ref.embeds[:, t:t + 1].astype(act), "attention_mask": ref.mask[:, :t + 1],
                 "position_ids": pos[:, t:t + 1]}
        feeds.update({f"past_key_values.{i}.{kv}": outs[f"present.{i}.{kv}"]
                      for i in range(num_layers) for kv in ("key", "value")})
        outs = dict(zip(names, decoder.run(None, feeds)))
        checks.append(_check(f"logits/step{step + 1}", outs["logits"], ref.logits[:, t:t + 1], precision))
    return checks


def report(checks_by_precision: dict[str, list[Check]]) -> dict:
    return {
        "tolerance_rule": "max|ort - torch| <= atol + rtol * max|torch|",
        "tolerances": {p: {"atol": a, "rtol": r} for p, (a, r) in TOLERANCES.items()},
        "variants": {p: [asdict(c) for c in checks] for p, checks in checks_by_precision.items()},
        "passed": all(c.passed for checks in checks_by_precision.values() for c in checks),
    }


def format_checks(precision: str, checks: list[Check]) -> str:
    lines = [f"  {precision}: {'output':<16} {'max_abs':>10} {'max_rel':>10} {'tolerance':>10}"]
    for c in checks:
        lines.append(f"  {'':{len(precision)}}  {c.output:<16} {c.max_abs:10.3e} {c.max_rel:10.3e} "
                     f"{c.tolerance:10.3e} {'ok' if c.passed else 'FAIL'}")
    return "\n".join(lines)
