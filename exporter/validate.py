"""Export-time validation: onnxruntime (CPU) on the written graphs vs the merged PyTorch model.

Shapes differ from the tracing shapes (2 persons × 3 rows vs 2 × 2, a 7-token prefix vs 6, 5-token suffixes), two
suffixes are left padded between prefix and suffix as the runtime pads them, and the decoder is driven like the
runtime drives it: a prefix prefill per person, the suffix prefill of every row on top of
its person's shared prefix, then three single-token steps through the KV cache. The reference is the HF model on the
whole padded sequences, so the check covers the shared-prefix attention, cache handling, RoPE positions and masking,
not just one forward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from posellm.lazy_weights import WeightSource
from posellm.model import PoseLLM
from runtime.answer import step_confidences

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
    embeds: np.ndarray  # [rows, T, H]: prefix + padded suffix + 3 step tokens; rows = persons × per_person
    mask: np.ndarray  # [rows, T]
    logits: np.ndarray  # [rows, T, V]
    persons: int
    prefix: int
    suffix: int


class _StreamedLayer(nn.Module):
    """One LLaMA decoder layer whose weights are read when it runs and dropped when it returns: the reference runs
    transformers' own LlamaModel.forward (mask, RoPE, layer loop) with one layer resident at a time."""

    def __init__(self, source: WeightSource, config, index: int) -> None:
        super().__init__()
        self.source, self.config, self.index = source, config, index

    def forward(self, *args, **kwargs):
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, self.index)
        return _materialize(layer, f"llm.model.layers.{self.index}.", self.source)(*args, **kwargs)


def _materialize(module: nn.Module, prefix: str, source: WeightSource) -> nn.Module:
    names = list(module.state_dict())
    weights = source.get_many(prefix + k for k in names)
    module.load_state_dict({k: weights[prefix + k] for k in names}, strict=True, assign=True)
    return module.eval()


@torch.inference_mode()
def reference_outputs(source: WeightSource, seed: int = 0) -> PrecisionReference:
    """The PyTorch outputs every variant is checked against, in fp32 on the merged weights, without the whole model
    in memory: the ViT + connector (small) whole, the LLM one decoder layer at a time (`_StreamedLayer`), the
    embedding table only while the validation rows are looked up."""
    g = torch.Generator().manual_seed(seed)
    cfg = source.cfg
    with torch.device("meta"):
        model = PoseLLM(cfg)
    _materialize(model.vision_model, "vision_model.", source)
    _materialize(model.mm_projector, "mm_projector.", source)
    px = torch.randn(3, 3, cfg.crop_size, cfg.crop_size, generator=g)
    image_embeds = model.encode_image(px)
    model.vision_model = model.mm_projector = None  # freed before the LLM runs
    persons, per_person, prefix, suffix, steps = 2, 3, 7, 5, 3
    rows, total = persons * per_person, prefix + suffix + steps
    ids = torch.randint(3, cfg.llm.vocab_size, (rows, total), generator=g)
    ids[:, :prefix] = ids[::per_person, :prefix].repeat_interleave(per_person, dim=0)  # one prefix per person
    mask = torch.ones(rows, total, dtype=torch.int64)
    mask[1, prefix:prefix + 2] = 0  # shorter suffixes, padded between prefix and suffix
    mask[3, prefix:prefix + 4] = 0
    embeds = F.embedding(ids, source.get("llm.model.embed_tokens.weight"))
    for n in range(persons):  # image embeddings inside each person's prefix, as in real prompts
        embeds[n * per_person:(n + 1) * per_person, 2:5] = image_embeds[n, :3]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    llm = model.llm
    llm.model.layers = nn.ModuleList(_StreamedLayer(source, llm.config, i) for i in range(cfg.llm.num_hidden_layers))
    _materialize(llm.model.norm, "llm.model.norm.", source)
    _materialize(llm.lm_head, "llm.lm_head.", source)
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm.config)  # buffers on the CPU, as build_from_state
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return PrecisionReference(px.numpy(), image_embeds.numpy(), embeds.numpy(), mask.numpy(),
                              logits.float().numpy(), persons, prefix, suffix)


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


def _decision_checks(label: str, outs: dict[str, np.ndarray], ref_logits: np.ndarray, digit_ids: tuple[int, ...],
                     precision: str) -> list[Check]:
    """The graph's reductions against the reference logits: max_prob vs the softmax max; the chosen token's (and
    digit's) reference logit vs the reference maximum, so a near-tie flipped by rounding passes within tolerance."""
    ref = ref_logits.astype(np.float64)
    max_prob = step_confidences(ref)  # what the reference scores with
    digits = ref[..., list(digit_ids)]
    chosen = np.take_along_axis(ref, outs["argmax"][..., None].astype(np.int64), -1)[..., 0]
    chosen_digit = np.take_along_axis(digits, outs["digit_argmax"][..., None].astype(np.int64), -1)[..., 0]
    return [_check(f"{label}/max_prob", outs["max_prob"], max_prob, precision),
            _check(f"{label}/argmax", chosen, ref.max(-1), precision),
            _check(f"{label}/digit_argmax", chosen_digit, digits.max(-1), precision)]


def session_options(precision: str) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # weight-only, as OrtRunner
    # onnxruntime's x86 CPU EP has no fp16 MatMul: it runs those nodes in fp32 behind Cast nodes on the weights.
    # In its default (topological) order every weight's Cast runs first, so fp32 copies of all weights are alive at
    # once (2x an fp16 variant on top of its mmapped bytes); priority-based order runs each Cast just before its
    # MatMul, so one weight's copy at a time is (tests/exporter/test_validate_memory.py).
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_cpu_mem_arena = False  # the arena would keep the largest transient copy after the run
    if precision == "fp16":  # and no constant folding of those Casts into resident fp32 weights
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def validate_variant(ref: PrecisionReference, vision_path: Path, decoder_path: Path, precision: str,
                     num_layers: int, kv_heads: int, head_dim: int, logits_positions: int,
                     digit_ids: tuple[int, ...], decoder_session: Any = None) -> list[Check]:
    """`decoder_session`: an InferenceSession-like object (get_outputs, run) to use instead of opening the whole
    decoder (quantize passes a segmented one: calibration/segmented.py)."""
    opts = session_options(precision)
    providers = ["CPUExecutionProvider"]
    vision = ort.InferenceSession(str(vision_path), opts, providers=providers)
    checks = [_check("image_embeds", vision.run(None, {"pixel_values": ref.pixel_values})[0], ref.image_embeds,
                     precision)]
    del vision  # never both graphs' weights at once
    decoder = decoder_session or ort.InferenceSession(str(decoder_path), opts, providers=providers)
    act = np.float16 if precision == "fp16" else np.float32

    rows, lp, ls = ref.embeds.shape[0], ref.prefix, ref.suffix
    per_person = rows // ref.persons
    names = [o.name for o in decoder.get_outputs()]
    kv_names = [f"{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    pos = np.clip(ref.mask.cumsum(-1) - 1, 0, None).astype(np.int64)

    def zeros(batch: int, kind: str, length: int) -> dict[str, np.ndarray]:
        return {f"{kind}_key_values.{n}": np.zeros((batch, kv_heads, length, head_dim), act) for n in kv_names}

    def run(rows_sel, start: int, stop: int, prefix: dict, past: dict, mask: np.ndarray | None = None
            ) -> dict[str, np.ndarray]:
        feeds = {"inputs_embeds": ref.embeds[rows_sel, start:stop].astype(act),
                 "attention_mask": ref.mask[rows_sel, :stop] if mask is None else mask,
                 "position_ids": pos[rows_sel, start:stop], **prefix, **past}
        return dict(zip(names, decoder.run(None, feeds)))

    heads = slice(None, None, per_person)  # one row per person
    # The prefix prefill as the runtime runs it: a one-token dummy prefix, masked out.
    dummy_mask = np.concatenate([np.zeros((ref.persons, 1), ref.mask.dtype), ref.mask[heads, :lp]], axis=1)
    outs = run(heads, 0, lp, zeros(ref.persons, "prefix", 1), zeros(ref.persons, "past", 0), dummy_mask)
    ref_logits = ref.logits[heads, lp - min(logits_positions, lp):lp]
    checks.append(_check("logits/prefix", outs["logits"], ref_logits, precision))
    checks += _decision_checks("prefix", outs, ref_logits, digit_ids, precision)
    prefix = {f"prefix_key_values.{n}": outs[f"present.{n}"] for n in kv_names}
    outs = run(slice(None), lp, lp + ls, prefix, zeros(rows, "past", 0))
    k = min(logits_positions, ls)
    checks.append(_check("logits/suffix", outs["logits"], ref.logits[:, lp + ls - k:lp + ls], precision))
    checks += _decision_checks("suffix", outs, ref.logits[:, lp + ls - k:lp + ls], digit_ids, precision)
    for step in range(ref.embeds.shape[1] - lp - ls):
        t = lp + ls + step
        past = {f"past_key_values.{n}": outs[f"present.{n}"] for n in kv_names}
        outs = run(slice(None), t, t + 1, prefix, past)
        checks.append(_check(f"logits/step{step + 1}", outs["logits"], ref.logits[:, t:t + 1], precision))
        checks += _decision_checks(f"step{step + 1}", outs, ref.logits[:, t:t + 1], digit_ids, precision)
    return checks


def report(checks_by_precision: dict[str, list[Check]]) -> dict:
    return {
        "tolerance_rule": "max|ort - torch| <= atol + rtol * max|torch|",
        "tolerances": {p: {"atol": a, "rtol": r} for p, (a, r) in TOLERANCES.items()},
        "variants": {p: [asdict(c) for c in checks] for p, checks in checks_by_precision.items()},
        "passed": all(c.passed for checks in checks_by_precision.values() for c in checks),
    }


def format_checks(precision: str, checks: list[Check]) -> str:
    lines = [f"  {precision}: {'output':<22} {'max_abs':>10} {'max_rel':>10} {'tolerance':>10}"]
    for c in checks:
        lines.append(f"  {'':{len(precision)}}  {c.output:<22} {c.max_abs:10.3e} {c.max_rel:10.3e} "
                     f"{c.tolerance:10.3e} {'ok' if c.passed else 'FAIL'}")
    return "\n".join(lines)
