"""Checkpoint import/export on tiny random models (CPU): LocLLM original format, native format, LoRA, PEFT."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
try:
    import posellm  # noqa: F401
except ImportError:  # a plain checkout without an install: make the repo root importable
    sys.path.insert(0, str(REPO))

from posellm import checkpoint as ck  # noqa: E402
from posellm.checkpoint import (CheckpointError, apply_peft_adapter, checkpoint_hash, load_checkpoint,  # noqa: E402
                                load_locllm, load_native, merge_lora, save_locllm, save_native, tokenizer_files)
from posellm.checkpoint_locllm import is_llm_base, to_locllm  # noqa: E402
from posellm.config import ConfigError, LoRAConfig, PoseLLMConfig, VisionConfig, preset  # noqa: E402
from posellm.model import PoseLLM  # noqa: E402

# LocLLM's layout: LLaMA's 32000-row table, `<im_patch>` = 32000 just past it (never looked up).
VOCAB, IMAGE_ID = 32000, 32000


def tiny_cfg(connector: str = "mlp2x_gelu", *, vision: VisionConfig | None = None) -> PoseLLMConfig:
    cfg = preset("tiny", vocab_size=VOCAB, image_token_id=IMAGE_ID, connector=connector)  # small vocab: fast
    return cfg.replace(vision=vision) if vision is not None else cfg


def random_model(cfg: PoseLLMConfig, seed: int = 0) -> PoseLLM:
    """Random weights with NONZERO LoRA B and non-trivial LayerScale/norm values (so every mapping matters)."""
    torch.manual_seed(seed)
    model = PoseLLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            elif "gamma" in name or "norm" in name or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_inputs(cfg: PoseLLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: BOS + text + 256 image tokens + text; row 1 left-padded (pad id 0, mask 0)."""
    g = torch.Generator().manual_seed(123)
    n = cfg.num_patches
    row0 = [1, 11, 12, 13] + [IMAGE_ID] * n + [21, 22, 23, 24]
    row1 = [0, 0] + [1, 14, 15] + [IMAGE_ID] * n + [25, 26, 27]
    ids = torch.tensor([row0, row1])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return torch.randn(2, 3, cfg.crop_size, cfg.crop_size, generator=g), ids, mask


@torch.no_grad()
def logits(model: PoseLLM, cfg: PoseLLMConfig) -> torch.Tensor:
    px, ids, mask = make_inputs(cfg)
    return model(px, ids, attention_mask=mask).logits


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    d = (a - b).abs().max().item()
    print(f"{what}: max abs diff {d:.3e}")
    return d


@pytest.fixture()
def tok_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (d / name).write_text("{}" if name.endswith(".json") else "sp-model-bytes")
    return d


def as_trained_by_locllm(model: PoseLLM) -> PoseLLM:
    """What a LocLLM checkpoint of `model` holds, widened back: LLM base weights rounded to bf16 (its trainer casts
    `model.model` and `lm_head`), ViT / projector / LoRA factors untouched."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in [*out.named_parameters(), *out.named_buffers()]:
            if is_llm_base(to_locllm(name)) and t.is_floating_point() and "rotary_emb" not in name:
                t.copy_(t.to(torch.bfloat16).float())
    return out


def assert_same_state(a: PoseLLM, b: PoseLLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, bad


# -- LocLLM original format ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("connector", ["linear", "mlp2x_gelu"])
def test_locllm_import_matches_native(tmp_path: Path, tok_dir: Path, connector: str) -> None:
    cfg = tiny_cfg(connector)
    model = random_model(cfg)
    out = save_locllm(model, tmp_path / "locllm", tok_dir)
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in saved and "lm_head.weight" in saved
    assert "vision_model.blocks.0.ls1.gamma" in saved and "model.layers.0.self_attn.q_proj.lora_B" in saved
    assert "vision_model.embed_dim" not in json.loads((out / "config.json").read_text())
    assert saved["lm_head.weight"].dtype == saved["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert saved["model.layers.0.self_attn.q_proj.lora_B"].dtype == torch.float32  # LoRA factors back in fp32
    assert saved["vision_model.blocks.0.ls1.gamma"].dtype == saved["mm_projector.0.weight" if connector ==
                                                                   "mlp2x_gelu" else "mm_projector.weight"].dtype
    loaded = load_locllm(out)
    assert loaded.cfg == cfg and loaded.cfg.image_token_id == loaded.cfg.llm.vocab_size == 32000
    trained = as_trained_by_locllm(model)
    assert_same_state(trained, loaded)  # bf16 -> fp32 widening is exact
    assert max_diff(logits(trained, cfg), logits(loaded, cfg), f"locllm import vs native [{connector}]") <= 1e-5
    assert set(tokenizer_files(out)) == {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                                         "added_tokens.json"}
    assert isinstance(load_checkpoint(out), PoseLLM)


@pytest.mark.parametrize("embed,depth,patch,grid", [(128, 2, 14, 37), (192, 3, 16, 20)])
def test_vit_size_inferred_from_shapes(tmp_path: Path, embed: int, depth: int, patch: int, grid: int) -> None:
    vision = VisionConfig(embed_dim=embed, depth=depth, num_heads=embed // 64, patch_size=patch, pos_grid=grid)
    cfg = tiny_cfg(vision=vision)
    model = random_model(cfg)
    loaded = load_locllm(save_locllm(model, tmp_path / "c", inv_freq=False))
    assert loaded.cfg.vision == vision and loaded.cfg.vision.num_heads == embed // 64
    assert_same_state(as_trained_by_locllm(model), loaded)


def test_bin_safetensors_and_shards_agree(tmp_path: Path) -> None:
    cfg = tiny_cfg("linear")
    model = random_model(cfg, seed=1)
    ref = load_locllm(save_locllm(model, tmp_path / "bin"))
    variants: list[tuple[str, dict[str, Any]]] = [
        ("st", {"safetensors": True}), ("st_sharded", {"safetensors": True, "max_shard_bytes": 1 << 20}),
        ("bin_sharded", {"max_shard_bytes": 1 << 20})]
    for name, kw in variants:
        out = save_locllm(model, tmp_path / name, **kw)
        if "sharded" in name:
            index = next(out.glob("*.index.json"))
            assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
        assert_same_state(ref, load_locllm(out))


def test_layer_scale_weight_alias(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = random_model(cfg)
    out = save_locllm(model, tmp_path / "c", safetensors=True)
    state = load_file(str(out / "model.safetensors"))
    state = {k.replace("ls1.gamma", "ls1.weight"): v for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"))
    assert_same_state(as_trained_by_locllm(model), load_locllm(out))


# -- errors -------------------------------------------------------------------------------------------------------
def test_bad_tensors_reported_together(tmp_path: Path) -> None:
    out = save_locllm(random_model(tiny_cfg()), tmp_path / "c")
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["vision_model.blocks.0.attn.extra"] = torch.zeros(3)
    state["mm_projector.2.bias"] = torch.zeros(7)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = state["model.layers.0.self_attn.rotary_emb.inv_freq"] * 2
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_locllm(out)
    msg = str(err.value)
    print(msg)
    assert "missing: model.layers.1.mlp.up_proj.weight [176, 64]" in msg
    assert "unexpected: vision_model.blocks.0.attn.extra [3]" in msg
    assert "mis-shaped: mm_projector.2.bias expected [64], got [7]" in msg
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in msg and "4 problems" in msg


def test_unknown_model_type_and_connector(tmp_path: Path) -> None:
    out = save_locllm(random_model(tiny_cfg()), tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llava_llama"}))
    with pytest.raises(CheckpointError, match="model_type='llava_llama'"):
        load_checkpoint(out)
    (out / "config.json").write_text(json.dumps(config))
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    state = {k.replace("mm_projector.2.", "mm_projector.1."): v for k, v in state.items()}
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"unknown connector.*mm_projector\.1\.weight"):
        load_locllm(out)


def test_unrecognised_dir_and_missing_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(CheckpointError, match="posellm_config.json.*config.json.*adapter_config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer.json and/or tokenizer.model"):
        tokenizer_files(tmp_path)


# -- native format ------------------------------------------------------------------------------------------------
def test_native_round_trip_bit_identical(tmp_path: Path, tok_dir: Path) -> None:
    cfg = tiny_cfg()
    model = random_model(cfg, seed=2)
    out = save_native(model, tmp_path / "native", tok_dir)
    config = json.loads((out / "posellm_config.json").read_text())
    assert config["format"] == "posellm-edge-native" and config["format_version"] == 1
    assert any("lora_B" in k for k in load_file(str(out / "model.safetensors")))  # unmerged
    loaded = load_native(out)
    assert loaded.cfg == cfg
    assert_same_state(model, loaded)
    assert max_diff(logits(model, cfg), logits(load_checkpoint(out), cfg), "native round trip") == 0.0
    assert (out / "tokenizer.model").is_file() and (out / "added_tokens.json").is_file()
    h = checkpoint_hash(out)
    assert h == checkpoint_hash(out) and len(h) == 64
    (out / "tokenizer_config.json").write_text('{"changed": 1}')  # tokenizer files are not hashed
    assert checkpoint_hash(out) == h
    with pytest.raises(CheckpointError, match="already exists"):
        save_native(model, out)
    save_native(random_model(cfg, seed=3), out, overwrite=True)
    assert checkpoint_hash(out) != h


def test_native_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        save_native(random_model(tiny_cfg()), parent / "native")
    assert list(parent.iterdir()) == []


# -- LoRA ---------------------------------------------------------------------------------------------------------
def test_merge_lora(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = random_model(cfg, seed=4)
    unmerged = logits(model, cfg)
    merged_model = merge_lora(copy.deepcopy(model))
    assert not merged_model.has_lora() and not any("lora_" in k for k in merged_model.state_dict())
    assert not merged_model.cfg.lora.llm_enable and not merged_model.cfg.lora.vision_enable
    assert max_diff(unmerged, logits(merged_model, cfg), "merged vs unmerged LoRA") <= 1e-4
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in zeroed.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert max_diff(unmerged, logits(zeroed, cfg), "nonzero vs zeroed LoRA B") > 1e-3
    reloaded = load_native(save_native(merged_model, tmp_path / "merged"))
    assert max_diff(logits(merged_model, cfg), logits(reloaded, cfg), "merged native round trip") == 0.0


# -- PEFT ---------------------------------------------------------------------------------------------------------
def test_peft_adapter_merges_like_live_peft(tmp_path: Path, tok_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    # LLM LoRA off (peft adds it); ViT LoRA on, so apply_peft_adapter must fold it in first.
    cfg = tiny_cfg().replace(lora=LoRAConfig(llm_enable=False, vision_enable=True, vision_r=4, vision_alpha=8,
                                             dropout=0.0))
    base_dir = save_native(random_model(cfg, seed=5), tmp_path / "base", tok_dir)
    live = load_native(base_dir)
    peft_llm = get_peft_model(live.llm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    live.llm = peft_llm  # type: ignore[assignment]  # the live peft model, as a trainer holds it
    want = logits(live.eval(), cfg)
    adapter = tmp_path / "adapter"
    peft_llm.save_pretrained(str(adapter))
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))

    got = apply_peft_adapter(load_native(base_dir), adapter)
    assert not any("lora" in k for k in got.state_dict())
    assert max_diff(want, logits(got, cfg), "peft adapter merged vs live peft") <= 1e-5
    assert max_diff(want, logits(load_checkpoint(adapter), cfg), "load_checkpoint(adapter dir)") <= 1e-5
    assert checkpoint_hash(adapter) != checkpoint_hash(base_dir)
    assert tokenizer_files(adapter)["tokenizer.model"] == (base_dir / "tokenizer.model").resolve()
    base_hash, adapter_hash = checkpoint_hash(base_dir), checkpoint_hash(adapter)

    # Bundled adapter/ subdir, with keys as peft saves them when wrapping our whole PoseLLM (`llm.` prefix).
    bundled = base_dir / "adapter"
    bundled.mkdir()
    (bundled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    save_file({k.replace("base_model.model.", "base_model.model.llm."): v for k, v in keys.items()},
              str(bundled / "adapter_model.safetensors"))
    assert max_diff(want, logits(load_checkpoint(base_dir), cfg), "bundled adapter/ subdir") <= 1e-5
    # The bundled adapter is part of what base_dir loads, but not of what the adapter dir (base + adapter) loads.
    assert checkpoint_hash(base_dir) != base_hash and checkpoint_hash(adapter) == adapter_hash
    plain = load_checkpoint(base_dir, bundled_adapter=False)
    assert max_diff(want, logits(plain, cfg), "base without adapter") > 1e-3

    save_file({"base_model.model.vision_model.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 128)},
              str(bundled / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="outside the LLM"):
        load_checkpoint(base_dir)


# -- what LocLLM's training writes (utils/train2d.py): <im_patch> = vocab_size, bf16 LLM, 2 shards ---------------
@pytest.mark.parametrize("safetensors", [False, True])
def test_training_layout_loads_exactly(tmp_path: Path, safetensors: bool) -> None:
    import tiny
    out = tiny.locllm_checkpoint(tmp_path / "ck", tiny.locllm_tokenizer_dir(tmp_path), safetensors=safetensors)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == config["im_patch_token"] == 32000
    index = json.loads(next(out.glob("*.index.json")).read_text())
    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        stored.update(load_file(str(out / shard)) if safetensors else
                      torch.load(out / shard, weights_only=True))
    dtypes = {k: v.dtype for k, v in stored.items()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.self_attn.q_proj.lora_A"] == torch.float32
    assert dtypes["vision_model.patch_embed.proj.weight"] == dtypes["mm_projector.0.weight"] == torch.float32
    assert stored["model.embed_tokens.weight"].shape[0] == 32000  # never resized for <im_patch>

    mixed = load_locllm(out, dtype=None)  # stored dtypes kept
    master = load_locllm(out)  # the fp32 master
    assert mixed.llm.lm_head.weight.dtype == torch.bfloat16 and master.llm.lm_head.weight.dtype == torch.float32
    for key, value in master.state_dict().items():  # every bf16 tensor widened exactly
        assert torch.equal(value, mixed.state_dict()[key].float()), key
    px, ids, mask = make_inputs(master.cfg)  # image positions hold id 32000: never looked up in the table
    with torch.no_grad():
        out_logits = master(px, ids, attention_mask=mask).logits
    assert out_logits.shape[-1] == 32000 and torch.isfinite(out_logits).all()


def test_image_token_beyond_vocab_names_both_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_token_id=32001 is beyond vocab_size=32000"):
        tiny_cfg().replace(image_token_id=32001)
    out = save_locllm(random_model(tiny_cfg()), tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "im_patch_token": 32001}))
    with pytest.raises(CheckpointError) as err:
        load_locllm(out)
    print(err.value)
    assert "image_token_id=32001" in str(err.value) and "vocab_size=32000" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shard_name", ["../outside.bin", "/tmp/abs.bin", "link.bin", 7])
def test_shard_index_paths_stay_inside(tmp_path: Path, shard_name: Any) -> None:
    out = save_locllm(random_model(tiny_cfg()), tmp_path / "c", max_shard_bytes=1 << 20)
    index_file = out / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.bin"
    (out / first).rename(outside)
    if shard_name == "link.bin":
        (out / "link.bin").symlink_to(outside)
    index["weight_map"] = {k: (shard_name if v == first else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_locllm(out)
    print(err.value)
    assert "weight_map" in str(err.value) and repr(shard_name) in str(err.value) and "\n" not in str(err.value)


def test_unindexed_shard_symlinked_out_is_refused(tmp_path: Path) -> None:
    out = save_locllm(random_model(tiny_cfg()), tmp_path / "c", safetensors=True)
    (out / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (out / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        load_locllm(out)
