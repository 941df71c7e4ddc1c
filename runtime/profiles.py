"""TensorRT optimization profiles from a bundle's manifest: what the native engines are built with and what the
onnxruntime TensorRT EP is given, so both cover exactly the shapes the runtime sends (tests/exporter/test_trt_build.py
checks every call of a real run against them). Torch-free: the runtime computes them for the TensorRT EP.
"""
from __future__ import annotations

from typing import Any

from .errors import BundleError, InputError
from .manifest import GraphSpec, Manifest, Variant

DECODE_MAX_SEQ = 4  # template decoding feeds `d , 0 .` in one pass; free decoding feeds 1 token

def engine_profiles(manifest: Manifest, variant: Variant, max_persons: int) -> dict[str, tuple[dict[str, Any], ...]]:
    """Per graph, the optimization profiles as {input name: [min, opt, max] shape}."""
    p = manifest.prompts
    keypoints = len(p.keypoints)
    prefix = len(p.prefix_ids) + p.num_image_tokens
    longest_suffix = max(len(k.suffix_ids) for k in p.keypoints)
    head = p.digit_positions[0] if p.answer_template_ids else 0  # `▁[ 0 .` rides with the suffix prefill
    max_seq = max(prefix, longest_suffix + p.max_new_tokens)
    rows = max_persons * keypoints
    ctx = manifest.max_context - prefix  # the decoder's past/present never hold the shared prefix
    suffix_opt = longest_suffix + head
    decode_past_opt = min(ctx, longest_suffix + p.max_new_tokens // 2)
    vision = {"batch": (1, 1, max_persons)}
    # Prefill: the prefix call (batch = persons, a one-token masked dummy prefix, seq = prefix) and the suffix call
    # (batch = rows, prefix = the shared prefix); neither has a past. `total` (the mask) = prefix + past + seq.
    prefill = {"batch": (1, keypoints, rows), "persons": (1, 1, max_persons), "prefix": (1, prefix, prefix),
               "seq": (1, suffix_opt, max_seq), "past": (0, 0, 0),
               "total": (2, prefix + suffix_opt, prefix + max_seq)}
    decode = {"batch": (1, keypoints, rows), "persons": (1, 1, max_persons), "prefix": (prefix, prefix, prefix),
              "seq": (1, 1, DECODE_MAX_SEQ), "past": (1, decode_past_opt, ctx),
              "total": (prefix + 2, prefix + decode_past_opt + 1, prefix + ctx + DECODE_MAX_SEQ)}
    form = variant.form("tensorrt")  # weight-only variants: the Q/DQ graphs, not onnxruntime's MatMulNBits
    out = {"vision": (_materialize(form.vision, vision),),
           "decoder": (_materialize(form.decoder, prefill), _materialize(form.decoder, decode))}
    return out


def _materialize(spec: GraphSpec, dims: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    """Shapes of every input for min/opt/max dim values; checks them against the graph's exported ranges."""
    for name, (lo, opt, hi) in dims.items():
        if not lo <= opt <= hi:
            raise InputError(f"{spec.file}: profile for dim {name!r} is min {lo}, opt {opt}, max {hi}")
        exported = spec.dynamic_ranges.get(name)
        if exported is not None and (lo < exported[0] or hi > exported[1]):
            raise InputError(f"{spec.file}: engine range {name}={lo}..{hi} exceeds the graph's exported range "
                             f"{exported[0]}..{exported[1]}; re-export with larger limits (--max-persons, "
                             "--max-context) or build with a smaller --max-persons")
    profile = {}
    for t in spec.inputs:
        missing = [s for s in t.shape if isinstance(s, str) and s not in dims]
        if missing:
            raise BundleError(f"{spec.file}: input {t.name} has dynamic dims {missing} with no profile range")
        profile[t.name] = [[s if isinstance(s, int) else dims[s][k] for s in t.shape] for k in range(3)]
    return profile
