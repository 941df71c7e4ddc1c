"""Checkpoint formats: our native directory, LocLLM/PoseLLM originals (`checkpoint_locllm`), PEFT adapters.

Every reader builds the model on the meta device and assigns the stored tensors, so a 7B import never spends minutes
on a random init it then throws away; every reader is strict: one CheckpointError lists all missing, unexpected and
mis-shaped tensors instead of failing on the first or, worse, loading a half-initialised model.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, PoseLLMConfig
from .model import PoseLLM

NATIVE_FORMAT = "posellm-edge-native"
NATIVE_FORMAT_VERSION = 1
NATIVE_CONFIG = "posellm_config.json"
NATIVE_WEIGHTS = "model.safetensors"
LOCLLM_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SUBDIR = "adapter"
# added_tokens.json carries `<im_patch>` for LocLLM's slow tokenizer, so it travels with the others.
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
_MAX_LISTED = 40


class CheckpointError(ValueError):
    """A checkpoint directory is unrecognised, incomplete or does not match the model its config describes."""


# -- strict loading (shared with checkpoint_locllm) -------------------------------------------------------------
def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str,
                problems: list[str] | None = None, display: Callable[[str], str] = str) -> None:
    """Raise ONE CheckpointError naming every missing / unexpected / mis-shaped tensor (plus `problems`)."""
    lines = list(problems or [])
    lines += [f"missing: {display(k)} {_shape(v)}" for k, v in expected.items() if k not in got]
    lines += [f"unexpected: {display(k)} {_shape(v)}" for k, v in got.items() if k not in expected]
    lines += [f"mis-shaped: {display(k)} expected {_shape(v)}, got {_shape(got[k])}"
              for k, v in expected.items() if k in got and v.shape != got[k].shape]
    if lines:
        shown = lines[:_MAX_LISTED] + ([f"... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else [])
        raise CheckpointError(f"{source}: checkpoint does not match the model its config describes "
                              f"({len(lines)} problems):\n  " + "\n  ".join(shown))


def build_from_state(cfg: PoseLLMConfig, state: dict[str, torch.Tensor], source: str, *,
                     dtype: torch.dtype | None = torch.float32, problems: list[str] | None = None,
                     display: Callable[[str], str] = str) -> PoseLLM:
    """A PoseLLM for `cfg` holding exactly `state` (fp tensors cast to `dtype` unless None), in eval mode."""
    with torch.device("meta"):  # shapes only: no random init of weights we overwrite anyway
        model = PoseLLM(cfg)
    check_state(model.state_dict(), state, source, problems, display)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE inv_freq) are not in any checkpoint: recompute them on the CPU.
    rotary = model.llm.model.rotary_emb
    model.llm.model.rotary_emb = type(rotary)(config=model.llm.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors left uninitialised after loading: {left}")
    return model.eval()


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; rename it into place only if the body succeeds (no half-written dirs)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists: choose a new directory or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    except RecursionError:  # the stdlib parser recurses once per nesting level
        raise CheckpointError(f"{path}: cannot read JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# -- tokenizer ----------------------------------------------------------------------------------------------------
def tokenizer_files(path: str | Path) -> dict[str, Path]:
    """The tokenizer files present in `path` (name → file); needs tokenizer.json or tokenizer.model.

    A PEFT adapter dir without its own tokenizer uses its base checkpoint's (peft does not save one).
    """
    root = Path(path)
    found = {name: root / name for name in TOKENIZER_NAMES if (root / name).is_file()}
    if not found and _kind(root) == "adapter":
        return tokenizer_files(adapter_base(root))
    if "tokenizer.json" not in found and "tokenizer.model" not in found:
        raise CheckpointError(f"{root}: no tokenizer: expected tokenizer.json and/or tokenizer.model (with "
                              f"tokenizer_config.json, special_tokens_map.json); found {sorted(found) or 'none'}")
    return found


def copy_tokenizer(tokenizer_dir: str | Path | None, out: Path) -> None:
    if tokenizer_dir is not None:
        for name, src in tokenizer_files(tokenizer_dir).items():
            shutil.copy2(src, out / name)


# -- native format ------------------------------------------------------------------------------------------------
def save_native(model: PoseLLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                overwrite: bool = False) -> Path:
    """Config + `model.safetensors` (LoRA tensors kept unmerged) + tokenizer files, written atomically."""
    config = {**model.cfg.to_dict(), "format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / NATIVE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / NATIVE_WEIGHTS), metadata={"format": "pt", "posellm_format": NATIVE_FORMAT})
        copy_tokenizer(tokenizer_dir, tmp)
    return Path(out_dir)


def load_native(path: str | Path, *, dtype: torch.dtype | None = torch.float32) -> PoseLLM:
    root = Path(path)
    cfg = native_config(root)
    if not (root / NATIVE_WEIGHTS).is_file():
        raise CheckpointError(f"{root}: missing {NATIVE_WEIGHTS}")
    return build_from_state(cfg, load_file(str(root / NATIVE_WEIGHTS)), str(root), dtype=dtype)


def native_config(root: Path) -> PoseLLMConfig:
    data = read_json(root / NATIVE_CONFIG)
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != NATIVE_FORMAT or version != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{root / NATIVE_CONFIG}: format={fmt!r} format_version={version!r}; expected "
                              f"{NATIVE_FORMAT!r} version {NATIVE_FORMAT_VERSION}")
    try:
        cfg = PoseLLMConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{root / NATIVE_CONFIG}: {e}") from e
    return cfg


# -- LocLLM original format (implemented in checkpoint_locllm; imported lazily, it imports this module) ---------
def load_locllm(path: str | Path, *, dtype: torch.dtype | None = torch.float32) -> PoseLLM:
    from .checkpoint_locllm import load_locllm as _load
    return _load(path, dtype=dtype)


def save_locllm(model: PoseLLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                **kwargs: Any) -> Path:
    from .checkpoint_locllm import save_locllm as _save
    return _save(model, out_dir, tokenizer_dir, **kwargs)


# -- LoRA and PEFT ------------------------------------------------------------------------------------------------
def merge_lora(model: PoseLLM) -> PoseLLM:
    """Fold every adapter (ViT q/v thirds, LLM LoRALinear) into the base weights, in place."""
    model.merge_lora()
    left = [k for k in model.state_dict() if "lora_" in k]
    if left or model.has_lora():
        raise CheckpointError(f"LoRA tensors left after merging: {left}")
    return model


def apply_peft_adapter(model: PoseLLM, adapter_dir: str | Path) -> PoseLLM:
    """Load a peft adapter trained on the LLM and merge it into `model.llm` (merge_and_unload), in place.

    Any built-in LoRA of `model` is merged first, so the result holds no adapters at all. On a CheckpointError
    raised after the adapter was injected, `model` is left half-modified: load it again.
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict  # heavy; only adapter users pay for it

    root = Path(adapter_dir)
    if not (root / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{root}: not a peft adapter: expected {ADAPTER_CONFIG} + adapter_model.safetensors")
    state = peft_llm_keys(peft_adapter_tensors(root), root)
    if model.has_lora():
        merge_lora(model)  # peft should wrap plain nn.Linear: fold our own LoRA deltas (ViT and LLM) first
    try:
        peft_model = PeftModel(model.llm, PeftConfig.from_pretrained(str(root)))
    except ValueError as e:  # e.g. target_modules that do not exist in a LLaMA
        raise CheckpointError(f"{root}: adapter does not fit the LLM: {e}") from e
    try:
        result: Any = set_peft_model_state_dict(peft_model, state)  # torch's _IncompatibleKeys
    except RuntimeError as e:  # size mismatches (e.g. r differs from adapter_config.json)
        raise CheckpointError(f"{root}: adapter tensors do not fit: {e}") from e
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{root}: adapter tensors do not match its config: missing {missing}, "
                              f"unexpected {list(result.unexpected_keys)}")
    model.llm = peft_model.merge_and_unload()
    return model.eval()


def peft_adapter_tensors(root: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft saved them (safetensors, else the legacy .bin)."""
    weights = root / "adapter_model.safetensors"
    if weights.is_file():
        return load_file(str(weights))
    if (root / "adapter_model.bin").is_file():
        return torch.load(root / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{root}: missing adapter_model.safetensors (or adapter_model.bin)")


def peft_llm_keys(raw: dict[str, torch.Tensor], root: Path) -> dict[str, torch.Tensor]:
    """Normalise to `base_model.model.model.layers...` (peft wrapping a LlamaForCausalLM, which we wrap too).

    Adapters trained on a LocLLMModel already have that form; ones trained on our whole PoseLLM carry `llm.`.
    """
    prefix, out, foreign = "base_model.model.", {}, []
    for key, value in raw.items():
        rest = key[len(prefix):] if key.startswith(prefix) else key
        if rest.startswith("llm."):
            rest = rest[len("llm."):]
        if rest.startswith("layers."):  # trained on a bare LlamaModel
            rest = "model." + rest
        if not rest.startswith(("model.", "lm_head.")):
            foreign.append(key)
        out[prefix + rest] = value
    if foreign:
        raise CheckpointError(f"{root}: adapter touches modules outside the LLM (only LLM adapters are "
                              f"supported): {foreign[:_MAX_LISTED]}")
    return out


# -- auto-detection and hashing -----------------------------------------------------------------------------------
def _kind(root: Path) -> str | None:
    if (root / NATIVE_CONFIG).is_file():
        return "native"
    if (root / LOCLLM_CONFIG).is_file():
        return "locllm"
    if (root / ADAPTER_CONFIG).is_file():
        return "adapter"
    return None


def adapter_base(adapter_dir: Path) -> Path:
    """The base checkpoint an adapter names (`base_model_name_or_path`, absolute or relative to the adapter)."""
    name = read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    base = Path(name) if name else None
    if base is not None and not base.is_absolute():
        base = adapter_dir / base
    if base is None or _kind(base) not in ("native", "locllm"):
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path={name!r} is not a local "
                              f"native or LocLLM checkpoint directory (absolute, or relative to the adapter)")
    return base.resolve()


def load_checkpoint(path: str | Path, adapter_dir: str | Path | None = None, *,
                    bundled_adapter: bool = True, dtype: torch.dtype | None = torch.float32) -> PoseLLM:
    """Native, LocLLM or PEFT-adapter directory → PoseLLM (eval mode).

    A base directory's `adapter/` subdir is merged unless `bundled_adapter=False`; `adapter_dir` overrides it.
    """
    root = Path(path)
    kind = _kind(root)
    if kind is None:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "not a directory"
        raise CheckpointError(
            f"{root}: not a recognised checkpoint: expected {NATIVE_CONFIG} (native), {LOCLLM_CONFIG} with "
            f"model_type 'locllm' (LocLLM/PoseLLM original) or {ADAPTER_CONFIG} (PEFT adapter); found {found}")
    if kind == "adapter":
        return apply_peft_adapter(load_checkpoint(adapter_base(root), bundled_adapter=False, dtype=dtype), root)
    model = load_native(root, dtype=dtype) if kind == "native" else load_locllm(root, dtype=dtype)
    if adapter_dir is None and bundled_adapter and (root / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file():
        adapter_dir = root / ADAPTER_SUBDIR
    return apply_peft_adapter(model, adapter_dir) if adapter_dir is not None else model


def _hashed_files(root: Path, label: str = "", follow: bool = True) -> list[tuple[str, Path]]:
    """Weights and configs (not tokenizer files) of what load_checkpoint(root) loads: + adapter/ or base."""
    def wanted(p: Path) -> bool:
        return p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in (
            NATIVE_CONFIG, LOCLLM_CONFIG, ADAPTER_CONFIG) or p.name.endswith(".index.json"))
    files = [(label + p.name, p) for p in sorted(root.iterdir()) if wanted(p)]
    kind = _kind(root) if follow else None  # one level: an adapter's base, or a base's bundled adapter/
    if kind == "adapter":
        files += _hashed_files(adapter_base(root), label + "base/", follow=False)
    elif kind is not None and (root / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file():
        files += _hashed_files(root / ADAPTER_SUBDIR, label + ADAPTER_SUBDIR + "/", follow=False)
    return files


def checkpoint_hash(path: str | Path) -> str:
    """sha256 (hex) over the sorted weight + config files: names, sizes and contents (for bundle manifests)."""
    root = Path(path)
    files = sorted(_hashed_files(root)) if root.is_dir() else []
    if not any(p.suffix in (".safetensors", ".bin") for _, p in files):
        raise CheckpointError(f"{root}: no weight files (*.safetensors, *.bin) to hash")
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
