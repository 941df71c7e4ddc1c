"""Lazy checkpoint weights (the bounded-memory export's reader) against the eager loader: bit-identical merged
tensors for every format, the same strict errors, and no shard held between reads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from posellm.checkpoint import CheckpointError, load_checkpoint, save_native
from posellm.lazy_weights import InMemoryWeights, LazyCheckpoint, open_weights


def _eager_merged(path: Path) -> dict[str, torch.Tensor]:
    model = load_checkpoint(path)
    model.merge_lora()
    return model.state_dict()


@pytest.mark.parametrize("fmt", ["native", "locllm-bin", "locllm-safetensors"])
def test_lazy_tensors_equal_eager_merged_model(tmp_path, tokenizer_dir, locllm_tokenizer_dir, fmt):
    """Every tensor of the merged model, read lazily (LoRA folded per weight, bf16 LLM widened to fp32), equals the
    eagerly loaded and merged model's bit for bit: the export streams exactly what the old export held."""
    if fmt == "native":
        ckpt = tmp_path / "native"
        save_native(tiny.tiny_model(tiny.tiny_config(tokenizer_dir)), ckpt, tokenizer_dir)
    else:
        ckpt = tiny.locllm_checkpoint(tmp_path / fmt, locllm_tokenizer_dir, seed=7,
                                      safetensors=fmt.endswith("safetensors"))
    source = open_weights(ckpt)
    assert isinstance(source, LazyCheckpoint)
    eager = _eager_merged(ckpt)
    assert sorted(source.names) == sorted(eager), "lazy and eager models name different tensors"
    assert source.cfg == load_checkpoint(ckpt).merge_lora().cfg
    diffs = {n: float((source.get(n).float() - eager[n].float()).abs().max()) for n in eager}
    print(f"{fmt}: {len(diffs)} tensors, max |lazy - eager| = {max(diffs.values()):.1e} (tolerance: exactly 0)")
    assert [n for n in eager if not torch.equal(source.get(n), eager[n])] == []
    if fmt != "native":
        assert torch.bfloat16 in source.stored_dtypes()  # LocLLM's trainer stores the LLM in bf16


def test_lora_factors_are_merged_not_served(tmp_path, tokenizer_dir):
    ckpt = tmp_path / "native"
    save_native(tiny.tiny_model(tiny.tiny_config(tokenizer_dir)), ckpt, tokenizer_dir)
    source = open_weights(ckpt)
    assert not any("lora_" in n for n in source.names)
    assert not source.cfg.lora.llm_enable and not source.cfg.lora.vision_enable
    with pytest.raises(KeyError, match="lora_A"):
        source.get("llm.model.layers.0.self_attn.q_proj.lora_A")


def test_lazy_reader_is_as_strict_as_the_eager_one(tmp_path, tokenizer_dir):
    """A missing and a mis-shaped tensor: one CheckpointError naming both, before anything is read."""
    ckpt = tmp_path / "native"
    save_native(tiny.tiny_model(tiny.tiny_config(tokenizer_dir)), ckpt, tokenizer_dir)
    state = load_file(str(ckpt / "model.safetensors"))
    del state["llm.model.norm.weight"]
    state["llm.lm_head.weight"] = state["llm.lm_head.weight"][:, :8].contiguous()
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        open_weights(ckpt)
    assert "missing: llm.model.norm.weight" in str(err.value)
    assert "mis-shaped: llm.lm_head.weight" in str(err.value)


def test_in_memory_weights_serve_the_model(tokenizer_dir):
    """The eager fallback (adapters beyond plain LoRA) as a WeightSource: the model's own tensors."""
    model = tiny.tiny_model(tiny.tiny_config(tokenizer_dir, lora=False))
    source = InMemoryWeights(model)
    assert torch.equal(source.get("llm.lm_head.weight"), model.state_dict()["llm.lm_head.weight"])


def _peft_adapter(tmp_path: Path, tokenizer_dir: Path, **lora) -> tuple[Path, Path]:
    """A native base (ViT LoRA on, LLM LoRA off) and a peft adapter saved by peft itself on its LLM, nonzero B."""
    import json

    from peft import LoraConfig, get_peft_model
    cfg = tiny.tiny_config(tokenizer_dir)
    cfg = cfg.replace(lora=cfg.lora.__class__(**{**cfg.lora.__dict__, "llm_enable": False}))
    base = save_native(tiny.tiny_model(cfg, seed=3), tmp_path / "base", tokenizer_dir)
    llm = get_peft_model(load_checkpoint(base).llm, LoraConfig(lora_dropout=0.0, **lora))
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    adapter = tmp_path / "adapter"
    llm.save_pretrained(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))
    return base, adapter


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                  dict(r=2, lora_alpha=5, use_rslora=True,
                                       target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"])])
def test_peft_adapter_merges_per_weight_exactly_as_peft(tmp_path, tokenizer_dir, lora):
    """A plain-LoRA peft adapter is merged per weight on the lazily read base, bit for bit as peft's own
    merge_and_unload (the eager loader) does it — as an adapter directory and as a base's bundled `adapter/`."""
    import shutil

    from posellm.peft_lazy import PeftMergedWeights
    base, adapter = _peft_adapter(tmp_path, tokenizer_dir, **lora)
    eager = _eager_merged(adapter)
    bundled = base / "adapter"
    shutil.copytree(adapter, bundled)
    for path in (adapter, base):
        source = open_weights(path)
        assert isinstance(source, PeftMergedWeights) and isinstance(source.base, LazyCheckpoint)
        changed = 0
        for name, want in eager.items():
            got = source.get(name)
            assert torch.equal(got, want.float()), name
            changed += name in source.factors
        assert changed == len(source.factors) > 0
        assert torch.equal(source.get_many(list(eager))["llm.lm_head.weight"], eager["llm.lm_head.weight"])
    print(f"{len(source.factors)} weights merged per weight, all equal to peft's merge")


@pytest.mark.parametrize("extra, why", [
    (dict(target_modules=["q_proj"], use_dora=True), "use_dora=True"),
    # peft then also saves lm_head's full weight in the adapter (save_embedding_layers), replacing the base's
    (dict(target_modules=["q_proj", "lm_head"]), "lm_head.base_layer.weight is not a LoRA A/B factor")])
def test_adapter_beyond_plain_lora_falls_back_to_peft(tmp_path, tokenizer_dir, extra, why):
    _, adapter = _peft_adapter(tmp_path, tokenizer_dir, r=4, lora_alpha=8, **extra)
    with pytest.warns(UserWarning, match=why):
        source = open_weights(adapter)
    assert isinstance(source, InMemoryWeights)
    eager = _eager_merged(adapter)
    assert all(torch.equal(source.get(n), t.float()) for n, t in eager.items())


def test_only_plain_lora_configs_pass_the_per_weight_merge():
    from peft import LoraConfig, PeftType

    from posellm.peft_lazy import _plain_lora_problems
    assert _plain_lora_problems(LoraConfig(r=4, use_rslora=True, target_modules=["q_proj"])) == []
    other = LoraConfig(r=4, rank_pattern={"q_proj": 8}, modules_to_save=["lm_head"])
    assert _plain_lora_problems(other) == ["modules_to_save=['lm_head']", "rank_pattern={'q_proj': 8}"]
    other.peft_type = PeftType.ADALORA  # a different merge, though its name contains LORA
    assert _plain_lora_problems(other)[0] == "peft_type=ADALORA"


def test_adapter_factors_of_the_wrong_shape_are_named(tmp_path, tokenizer_dir):
    _, adapter = _peft_adapter(tmp_path, tokenizer_dir, r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in weights if "layers.0.self_attn.q_proj.lora_A" in k)
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"llm\.model\.layers\.0\.self_attn\.q_proj\.weight is \[.*r=4"):
        open_weights(adapter)


def test_adapter_directory_exports_through_the_lazy_path(tmp_path, tokenizer_dir):
    """`posellm-edge export ADAPTER_DIR` end to end: base tokenizer, per-weight merge, graphs validated; the
    bundle's decoder weights are the eager peft merge's."""
    import json

    import numpy as np
    import onnx

    from exporter.bundle import ExportConfig, export_bundle
    _, adapter = _peft_adapter(tmp_path, tokenizer_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = export_bundle(ExportConfig(adapter, tmp_path / "bundle", precisions=("fp32",), max_persons=2)).bundle
    assert json.loads((out / "validation.json").read_text())["passed"]
    eager = _eager_merged(adapter)
    q = eager["llm.model.layers.0.self_attn.q_proj.weight"].numpy().T
    graph = onnx.load(str(out / "fp32" / "decoder.onnx"))
    found = [t.name for t in graph.graph.initializer if tuple(t.dims) == q.shape
             and np.array_equal(onnx.numpy_helper.to_array(t), q)]
    assert found, "layer 0 q_proj (merged with the adapter) not among the decoder's weights"

