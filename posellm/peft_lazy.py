"""A PEFT LoRA adapter merged into a lazily read base checkpoint, one weight at a time (bounded-memory export).

peft merges by building the whole model (`merge_and_unload`): W += (B @ A) * scaling per targeted Linear. For the
plain LoRA adapters LocLLM-style training produces, that is all a merge is, so here the adapter's factors (small:
MBs) are loaded up front and each targeted base weight gets its delta when it is read — the same float operations
in the same order as peft's merge, so the result is bit-identical (tested). The adapter config is parsed by peft
itself; anything beyond plain LoRA (DoRA, per-module rank/alpha patterns, trained biases, modules_to_save, layer
replication, fan_in_fan_out) is `Unsupported`, and `open_weights` then falls back to peft's own in-memory merge.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import ADAPTER_CONFIG, CheckpointError, peft_adapter_tensors, peft_llm_keys
from .lazy_weights import WeightSource, expected_shapes


class Unsupported(Exception):
    """The adapter uses a peft feature the per-weight merge does not reproduce; use peft's merge instead."""


# LoraConfig fields whose non-default values change what a merge computes (or add modules it would not touch)
_PLAIN = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "layer_replication": None,
          "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
          "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None}


def _plain_lora_problems(cfg) -> list[str]:
    kind = getattr(cfg.peft_type, "value", cfg.peft_type)  # PeftType.LORA or "LORA" (AdaLoRA, LoHa... differ)
    problems = [f"peft_type={kind}"] if kind != "LORA" else []
    for field, plain in _PLAIN.items():
        value = getattr(cfg, field, plain)  # fields newer than the installed peft are absent: plain
        if value and value != plain:
            problems.append(f"{field}={value!r}")
    return problems


class PeftMergedWeights(WeightSource):
    """`base` with a plain-LoRA peft adapter on its LLM folded into each weight as it is read."""

    def __init__(self, base: WeightSource, adapter_dir: Path) -> None:
        from peft import LoraConfig  # heavy; only adapter users pay for it

        root = Path(adapter_dir)
        if not (root / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{root}: not a peft adapter: expected {ADAPTER_CONFIG}")
        cfg = LoraConfig.from_pretrained(str(root))
        problems = _plain_lora_problems(cfg)
        if problems:
            raise Unsupported(f"{root}: {', '.join(problems)}")
        scaling = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        state = peft_llm_keys(peft_adapter_tensors(root), root)  # base_model.model.<llm key>.lora_{A,B}.weight
        shapes = expected_shapes(base.cfg)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            module, _, rest = key[len("base_model.model."):].partition(".lora_")
            if rest not in ("A.weight", "B.weight"):
                raise Unsupported(f"{root}: adapter tensor {key} is not a LoRA A/B factor")
            factors.setdefault(f"llm.{module}.weight", {})[rest[0]] = value.float()
        for name, ab in factors.items():
            meta = shapes.get(name)
            if meta is None or set(ab) != {"A", "B"}:
                raise CheckpointError(f"{root}: adapter factors {sorted(ab)} for {name}, which "
                                      f"{'is not a weight of the LLM' if meta is None else 'needs both A and B'}")
            a, b = ab["A"], ab["B"]
            if a.shape != (cfg.r, meta.shape[1]) or b.shape != (meta.shape[0], cfg.r):
                raise CheckpointError(f"{root}: {name} is {list(meta.shape)} with r={cfg.r}; the adapter's A is "
                                      f"{list(a.shape)}, B {list(b.shape)}")
        self.base, self.cfg, self.factors, self.scaling = base, base.cfg, factors, scaling

    def _merge(self, name: str, w: torch.Tensor) -> torch.Tensor:
        ab = self.factors.get(name)
        if ab is None:
            return w
        return w + (ab["B"] @ ab["A"]) * self.scaling  # peft's Linear.merge: base.weight += (B @ A) * scaling

    def get(self, name: str) -> torch.Tensor:
        return self._merge(name, self.base.get(name))

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self._merge(n, w) for n, w in self.base.get_many(names).items()}

    def stored_dtypes(self) -> set[torch.dtype]:
        return self.base.stored_dtypes()
