"""Checkpoint weights read one tensor at a time, LoRA merged per weight: what a bounded-memory export reads.

`load_checkpoint` builds the whole model in memory (fp32: 28 GB for a 7B). `open_weights` instead indexes the
checkpoint's files (safetensors headers; `.bin` shards opened with `torch.load(mmap=True)`, which maps the zip
without reading it) and serves each merged tensor on request: the file is opened, the one tensor (and its LoRA
factors) copied out, the file closed again, so neither a whole shard nor an fp32 copy of the model is ever resident.
The strictness is the eager readers': the same CheckpointError lists every missing, unexpected or mis-shaped
tensor before anything is read. PEFT adapters (a plain-LoRA adapter directory, or a bundled `adapter/`) are merged
per weight on top of the lazily read base (`peft_lazy.py`); other adapters fall back to peft's in-memory merge.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import (ADAPTER_CONFIG, ADAPTER_SUBDIR, NATIVE_WEIGHTS, CheckpointError, _kind, adapter_base,
                         check_state, load_checkpoint, native_config, read_json)
from .config import PoseLLMConfig
from .lora import merged_weight
from .model import PoseLLM
from .vision import merge_qkv_lora

_LLM_LORA = re.compile(r"^(llm\.model\.layers\.\d+\.self_attn\.[qkvo]_proj)\.weight$")
_VIT_QKV = re.compile(r"^(vision_model\.blocks\.\d+\.attn)\.qkv\.weight$")


def merged_config(cfg: PoseLLMConfig) -> PoseLLMConfig:
    """The config of the model after every adapter is folded in (what the bundle describes)."""
    return cfg.replace(lora=dataclasses.replace(cfg.lora, llm_enable=False, vision_enable=False))


def expected_shapes(cfg: PoseLLMConfig) -> dict[str, torch.Tensor]:
    """Name → meta tensor of every tensor a checkpoint for `cfg` holds (no memory: built on the meta device)."""
    with torch.device("meta"):
        return dict(PoseLLM(cfg).state_dict())


class WeightSource(ABC):
    """Merged fp32 tensors of a PoseLLM by our state-dict names (those of `PoseLLM(cfg)`, `cfg` merged)."""

    cfg: PoseLLMConfig

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One merged fp32 tensor."""

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors (a layer, the small ones): a reader may open each file once for all of them."""
        return {n: self.get(n) for n in names}

    @abstractmethod
    def stored_dtypes(self) -> set[torch.dtype]:
        """The floating dtypes the weights are stored in (bf16 / fp16 / fp32)."""


class _Entry:
    __slots__ = ("file", "key")

    def __init__(self, file: Path, key: str) -> None:
        self.file, self.key = file, key


def _read(file: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """`keys` of one weight file. safetensors copies each tensor out of its map; a zipfile `.bin` is mapped and the
    tensors stay views of it (file-backed pages, only those read become resident, dropped with the tensors)."""
    keys = list(keys)
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    try:  # zipfile-format .bin (torch >= 1.6 save)
        shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) pickle: no mmap possible; this reads the whole shard once
        shard = torch.load(file, map_location="cpu", weights_only=True)
    return {k: shard[k] for k in keys}


def _headers(file: Path) -> dict[str, torch.Tensor]:
    """Key → meta tensor (shape, dtype) of every tensor in one file, without reading the data."""
    if file.suffix == ".safetensors":
        dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = torch.empty(s.get_shape(), dtype=dtypes.get(s.get_dtype(), torch.float32), device="meta")
            return out
    try:
        shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        shard = torch.load(file, map_location="cpu", weights_only=True)
    out = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in shard.items()}
    del shard
    return out


class LazyCheckpoint(WeightSource):
    """Native or LocLLM-format checkpoint; `get` reads one merged tensor (plus its LoRA factors) at a time."""

    def __init__(self, cfg: PoseLLMConfig, entries: dict[str, _Entry], headers: dict[str, torch.Tensor]) -> None:
        self.source_cfg = cfg
        self.cfg = merged_config(cfg)
        self._entries = entries
        self._headers = headers
        self.names = list(expected_shapes(self.cfg))

    def stored_dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self._headers.values() if t.is_floating_point()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[name].shape)

    def _raw(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._entries[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, ours in by_file.items():
            got = _read(file, [self._entries[n].key for n in ours])
            out.update({n: got[self._entries[n].key] for n in ours})
        return out

    def _lora_owner(self, name: str) -> str | None:
        """The module prefix whose LoRA factors fold into weight `name`, if the checkpoint has any."""
        m = _LLM_LORA.match(name) or _VIT_QKV.match(name)
        if m and (f"{m.group(1)}.lora_A" in self._headers or f"{m.group(1)}.lora_A_q" in self._headers):
            return m.group(1)
        return None

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        plain = [n for n in names if n in self._headers and "lora_" not in n and self._lora_owner(n) is None]
        raw = self._raw(plain)
        out = {n: (v.float() if v.is_floating_point() else v) for n, v in raw.items()}
        return {n: out[n] if n in out else self.get(n) for n in names}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._headers or "lora_" in name:
            raise KeyError(f"{name}: not a tensor of the merged model")
        lora, owner = self.source_cfg.lora, self._lora_owner(name)
        if owner is not None and _LLM_LORA.match(name):
            a, b = f"{owner}.lora_A", f"{owner}.lora_B"
            t = self._raw([name, a, b])
            return merged_weight(t[name].float(), t[a], t[b], lora.llm_alpha / lora.llm_r)
        if owner is not None:
            keys = [name] + [f"{owner}.lora_{x}" for x in ("A_q", "B_q", "A_v", "B_v")]
            t = self._raw(keys)
            return merge_qkv_lora(t[name].float(), *(t[k] for k in keys[1:]), lora.vision_alpha / lora.vision_r)
        value = self._raw([name])[name]
        return value.float() if value.is_floating_point() else value


class InMemoryWeights(WeightSource):
    """A merged in-memory model as a WeightSource (PEFT adapters, tests)."""

    def __init__(self, model: PoseLLM) -> None:
        if model.has_lora():
            model.merge_lora()
        self.cfg = model.cfg
        self._state = model.state_dict()

    def get(self, name: str) -> torch.Tensor:
        t = self._state[name]
        return t.float() if t.is_floating_point() else t

    def stored_dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self._state.values() if t.is_floating_point()}


def _native(root: Path) -> LazyCheckpoint:
    cfg = native_config(root)
    file = root / NATIVE_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{root}: missing {NATIVE_WEIGHTS}")
    headers = _headers(file)
    check_state(expected_shapes(cfg), headers, str(root))
    return LazyCheckpoint(cfg, {k: _Entry(file, k) for k in headers}, headers)


def _locllm(root: Path) -> LazyCheckpoint:
    from .checkpoint_locllm import (LOCLLM_CONFIG, _check_model_type, config_from_locllm, inv_freq_problems,
                                    is_inv_freq, stored_name, to_locllm, weight_files)
    config = read_json(root / LOCLLM_CONFIG)
    _check_model_type(config, root / LOCLLM_CONFIG)
    raw: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for file in weight_files(root):
        shard = _headers(file)
        dup = sorted(set(shard) & set(raw))
        if dup:
            raise CheckpointError(f"{file}: tensors already in another shard: {dup[:10]}")
        raw.update(shard)
        where.update(dict.fromkeys(shard, file))
    cfg = config_from_locllm(config, raw, root)
    headers: dict[str, torch.Tensor] = {}
    entries: dict[str, _Entry] = {}
    problems: list[str] = []
    for key, meta in raw.items():
        if is_inv_freq(key):  # derivable RoPE buffers (transformers 4.31): check the (small) values, then drop
            problems += inv_freq_problems(key, _read(where[key], [key])[key], cfg)
            continue
        ours = stored_name(key, raw)
        if ours is not None:
            headers[ours] = meta
            entries[ours] = _Entry(where[key], key)
    check_state(expected_shapes(cfg), headers, str(root), problems, display=to_locllm)
    return LazyCheckpoint(cfg, entries, headers)


def open_weights(path: str | Path) -> WeightSource:
    """Native or LocLLM directory → LazyCheckpoint; a PEFT adapter directory, or a base with a bundled `adapter/`,
    → that base read lazily with the adapter merged per weight (`peft_lazy`), or — for adapters using more than
    plain LoRA — peft's own in-memory merge (bounded by the fp32 model, not the bundle)."""
    from .peft_lazy import PeftMergedWeights, Unsupported
    root = Path(path)
    kind = _kind(root)
    if kind == "adapter":
        base, adapter = adapter_base(root), root
    elif kind in ("native", "locllm"):
        base, adapter = root, root / ADAPTER_SUBDIR if (root / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file() else None
    else:
        return InMemoryWeights(load_checkpoint(root))  # raises the usual CheckpointError for unknown directories
    lazy = _native(base) if _kind(base) == "native" else _locllm(base)
    if adapter is None:
        return lazy
    try:
        return PeftMergedWeights(lazy, adapter)
    except Unsupported as e:
        warnings.warn(f"{e}: not plain LoRA, merged by peft in memory instead of per weight", stacklevel=2)
        return InMemoryWeights(load_checkpoint(root))
