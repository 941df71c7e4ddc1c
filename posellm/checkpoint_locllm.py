"""LocLLM/PoseLLM original checkpoints (SPEC §6): import, and a writer of the same layout (for tests and round trips).

The layout is a transformers-4.31 `save_pretrained` directory of LocLLM's `LocLLMModel` (a LlamaForCausalLM with
`vision_model` and `mm_projector` attached): our names minus the `llm.` prefix. The ViT size is not in config.json,
so it is inferred from tensor shapes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from runtime.paths import UnsafePathError, inside

from .checkpoint import (LOCLLM_CONFIG, CheckpointError, atomic_dir, build_from_state, copy_tokenizer,
                         read_json)
from .config import ConfigError, LLMConfig, LoRAConfig, PoseLLMConfig, VisionConfig
from .model import PoseLLM

MODEL_TYPE = "locllm"
DINO_HEAD_DIM = 64  # DINOv2 uses 64-dim heads at every size (S/B/L/g)
_LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "rms_norm_eps", "max_position_embeddings")
_INV_FREQ = re.compile(r"^model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_SCALE_ALIAS = re.compile(r"^(vision_model\.blocks\.\d+\.ls[12])\.weight$")
_BLOCK = re.compile(r"^vision_model\.blocks\.(\d+)\.")


# -- names --------------------------------------------------------------------------------------------------------
def to_ours(key: str) -> str:
    if key.startswith("model.") or key == "lm_head.weight":
        return "llm." + key
    return key


def to_locllm(key: str) -> str:
    return key[len("llm."):] if key.startswith("llm.") else key


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


# -- reading ------------------------------------------------------------------------------------------------------
def weight_files(root: Path) -> list[Path]:
    """The weight files of a (possibly sharded) `model*.safetensors` or `pytorch_model*.bin` checkpoint, in index
    order; every name checked to stay inside `root`."""
    for index_name, pattern in (("model.safetensors.index.json", "model*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = root / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            odd = next((v for v in weight_map.values() if not isinstance(v, str)), None)
            if odd is not None:
                raise CheckpointError(f"{index}: weight_map value {odd!r:.80}: expected a shard file name")
            names = dict.fromkeys(weight_map.values())  # distinct, in first-seen order
            files = [_inside(root, name, f"{index} weight_map") for name in names]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index}: shard files missing: {absent}")
            return files
        files = [_inside(root, f.name, f"{root}") for f in sorted(root.glob(pattern))]  # a symlink out fails
        if files:
            return files
    raise CheckpointError(f"{root}: no weights: expected model*.safetensors or pytorch_model*.bin "
                          f"(sharded with their .index.json)")


def read_weights(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) `model*.safetensors` or `pytorch_model*.bin` checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(root):
        if file.suffix == ".safetensors":
            shard = load_file(str(file))
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        dup = sorted(set(shard) & set(state))
        if dup:
            raise CheckpointError(f"{file}: tensors already in another shard: {dup[:10]}")
        state.update(shard)
    return state


def _inside(root: Path, name: object, where: str) -> Path:
    try:
        return inside(root, name, where)  # type: ignore[arg-type]  # a non-string is reported, not assumed
    except UnsafePathError as e:
        raise CheckpointError(str(e)) from e


def _vision_from_shapes(state: dict[str, torch.Tensor], root: Path) -> VisionConfig:
    need = ("vision_model.patch_embed.proj.weight", "vision_model.pos_embed")
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"{root}: cannot infer the ViT size: missing {absent}")
    proj, pos = state[need[0]], state[need[1]]
    if proj.dim() != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3] or pos.dim() != 3:
        raise CheckpointError(f"{root}: unexpected ViT shapes: patch_embed.proj.weight {list(proj.shape)} "
                              f"(expected [D,3,p,p]), pos_embed {list(pos.shape)} (expected [1,1+G*G,D])")
    dim, patch = proj.shape[0], proj.shape[2]
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid + 1 != pos.shape[1] or pos.shape[2] != dim or dim % DINO_HEAD_DIM:
        raise CheckpointError(f"{root}: pos_embed {list(pos.shape)} is not [1,1+G*G,{dim}] or embed_dim {dim} "
                              f"is not a multiple of the DINOv2 head dim {DINO_HEAD_DIM}")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    fc1 = state.get("vision_model.blocks.0.mlp.fc1.weight")
    ratio = fc1.shape[0] / dim if fc1 is not None else 4.0  # absent fc1 is reported by the strict check
    return VisionConfig(embed_dim=dim, depth=depth, num_heads=dim // DINO_HEAD_DIM, patch_size=patch,
                        pos_grid=grid, mlp_ratio=ratio)


def _connector_from_keys(state: dict[str, torch.Tensor], root: Path) -> Literal["linear", "mlp2x_gelu"]:
    keys = sorted(k for k in state if k.startswith("mm_projector."))
    names = {k.split(".")[1] for k in keys}
    if names == {"weight", "bias"} or names == {"weight"}:
        return "linear"
    if names == {"0", "2"} and {"mm_projector.0.weight", "mm_projector.2.weight"} <= set(keys):
        return "mlp2x_gelu"
    raise CheckpointError(f"{root}: unknown connector layout: mm_projector keys {keys or 'none'}; expected "
                          f"mm_projector.weight/bias (linear) or mm_projector.0.*/2.* (mlp2x_gelu)")


def _check_model_type(config: dict[str, Any], where: Path) -> None:
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: model_type={config.get('model_type')!r}, expected {MODEL_TYPE!r}")


def config_from_locllm(config: dict[str, Any], state: dict[str, torch.Tensor], root: Path) -> PoseLLMConfig:
    """Our config from LocLLM's config.json (LLaMA + LoRA fields) and the tensors (ViT size, connector kind)."""
    where = root / LOCLLM_CONFIG
    _check_model_type(config, where)
    absent = [k for k in (*_LLAMA_REQUIRED, "im_patch_token") if k not in config]
    if absent:
        raise CheckpointError(f"{where}: missing fields {absent}")
    # Fields whose other values would change the math: refuse rather than silently compute something else.
    for key, ok in (("hidden_act", "silu"), ("rope_scaling", None), ("tie_word_embeddings", False),
                    ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key}={config[key]!r} is not supported (expected {ok!r})")
    heads = config["num_attention_heads"]
    llm = LLMConfig(**{k: config[k] for k in _LLAMA_REQUIRED}, num_key_value_heads=config.get(
        "num_key_value_heads") or heads, rope_theta=float(config.get("rope_theta") or 10000.0))
    lora = LoRAConfig(llm_enable=bool(config.get("lora_llm_enable", False)), llm_r=config.get("lora_llm_r", 8),
                      llm_alpha=float(config.get("lora_llm_alpha", 16)),
                      vision_enable=bool(config.get("lora_vision_enable", False)),
                      vision_r=config.get("lora_vision_r", 8), vision_alpha=float(config.get("lora_vision_alpha", 16)),
                      dropout=float(config.get("lora_llm_dropout", config.get("lora_vision_dropout", 0.05))))
    try:
        cfg = PoseLLMConfig(vision=_vision_from_shapes(state, root), llm=llm,
                            connector=_connector_from_keys(state, root), crop_size=config.get("crop_size", 224),
                            normalization="dino" if config.get("dino_norm") else "clip",
                            image_token_id=config["im_patch_token"], lora=lora)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if config.get("num_patches", cfg.num_patches) != cfg.num_patches:
        raise CheckpointError(f"{where}: num_patches={config['num_patches']} but crop_size {cfg.crop_size} / patch "
                              f"{cfg.vision.patch_size} gives {cfg.num_patches}")
    return cfg


def is_inv_freq(key: str) -> bool:
    return _INV_FREQ.match(key) is not None


def inv_freq_problems(key: str, value: torch.Tensor, cfg: PoseLLMConfig) -> list[str]:
    """[] if a saved RoPE `inv_freq` buffer is what cfg's head_dim and rope_theta give (to its dtype's precision)."""
    want = rope_inv_freq(cfg.llm.head_dim, cfg.llm.rope_theta).to(value.dtype).float()
    rtol = max(1e-4, 2 * torch.finfo(value.dtype).eps) if value.is_floating_point() else 1e-4
    if value.shape == want.shape and torch.allclose(value.float(), want, rtol=rtol, atol=0.0):
        return []
    return [f"mismatched: {key} {list(value.shape)} is not RoPE inv_freq for head_dim {cfg.llm.head_dim}, "
            f"rope_theta {cfg.llm.rope_theta}"]


def stored_name(key: str, stored: Mapping[str, object]) -> str | None:
    """Our name for a stored LocLLM tensor; None for a LayerScale `.weight` alias whose `.gamma` is stored too
    (`.gamma` is the stored name and wins)."""
    alias = _LAYER_SCALE_ALIAS.match(key)
    if alias:
        if f"{alias.group(1)}.gamma" in stored:
            return None
        key = f"{alias.group(1)}.gamma"
    return to_ours(key)


def load_locllm(path: str | Path, *, dtype: torch.dtype | None = torch.float32) -> PoseLLM:
    """Import a LocLLM/PoseLLM `from_pretrained` directory (strict: one error lists every bad tensor)."""
    root = Path(path)
    config = read_json(root / LOCLLM_CONFIG)
    _check_model_type(config, root / LOCLLM_CONFIG)  # before reading (possibly huge) weights
    raw = read_weights(root)
    cfg = config_from_locllm(config, raw, root)
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if is_inv_freq(key):  # transformers 4.31 saved RoPE buffers: derivable, so check and drop
            problems += inv_freq_problems(key, value, cfg)
            continue
        ours = stored_name(key, raw)
        if ours is not None:
            state[ours] = value
    return build_from_state(cfg, state, str(root), dtype=dtype, problems=problems, display=to_locllm)


# -- writing ------------------------------------------------------------------------------------------------------
def locllm_config(cfg: PoseLLMConfig) -> dict[str, Any]:
    """config.json as LocLLM's `LocLLMConfig.save_pretrained` writes it (ViT size deliberately absent)."""
    c, lora = cfg.llm, cfg.lora
    return {
        "architectures": ["LocLLMModel"], "model_type": MODEL_TYPE, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_scaling": None, "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "transformers_version": "4.31.0", "llama_path": None, "dino_path": None,
        "lora_llm_enable": lora.llm_enable, "lora_llm_r": lora.llm_r, "lora_llm_alpha": lora.llm_alpha,
        "lora_llm_dropout": lora.dropout, "lora_vision_enable": lora.vision_enable, "lora_vision_r": lora.vision_r,
        "lora_vision_alpha": lora.vision_alpha, "lora_vision_dropout": lora.dropout,
        "crop_size": cfg.crop_size, "im_patch_token": cfg.image_token_id, "num_patches": cfg.num_patches,
        "dino_norm": cfg.normalization == "dino",
    }


def is_llm_base(locllm_key: str) -> bool:
    """LLM tensors LocLLM's training casts to bf16 (`model.model`, `lm_head`); its LoRA factors go back to fp32."""
    return locllm_key.startswith(("model.", "lm_head.")) and "lora_" not in locllm_key


def save_locllm(model: PoseLLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                safetensors: bool = False, max_shard_bytes: int | None = None, inv_freq: bool = True,
                llm_dtype: torch.dtype | None = torch.bfloat16, overwrite: bool = False) -> Path:
    """Write `model` as LocLLM's training saves it (utils/train2d.py): the LLM base weights (and the 4.31-style
    RoPE inv_freq buffers, unless `inv_freq=False`) in `llm_dtype` — bf16, as its trainer casts them — while the
    ViT, the projector and every LoRA factor stay fp32; `llm_dtype=None` keeps the model's own dtypes."""
    state = {to_locllm(k): v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if inv_freq:
        freq = rope_inv_freq(model.cfg.llm.head_dim, model.cfg.llm.rope_theta)
        for i in range(model.cfg.llm.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = freq.clone()
    if llm_dtype is not None:
        state = {k: v.to(llm_dtype) if is_llm_base(k) and v.is_floating_point() else v for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():  # greedy sharding in key order, as transformers does
        nbytes = value.numel() * value.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = ([f"{stem}.{ext}"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    with atomic_dir(out_dir, overwrite) as tmp:
        (tmp / LOCLLM_CONFIG).write_text(json.dumps(locllm_config(model.cfg), indent=2) + "\n")
        for name, shard in zip(names, shards):
            if safetensors:
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
            else:
                torch.save(shard, tmp / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            (tmp / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_tokenizer(tokenizer_dir, tmp)
    return Path(out_dir)
