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


def test_bundled_adapter_falls_back_to_the_eager_loader(tmp_path, tokenizer_dir):
    """Directories with a PEFT adapter go through peft's merge (in memory), still as a WeightSource."""
    model = tiny.tiny_model(tiny.tiny_config(tokenizer_dir, lora=False))
    source = InMemoryWeights(model)
    assert torch.equal(source.get("llm.lm_head.weight"), model.state_dict()["llm.lm_head.weight"])
