"""Shared fixtures: tiny tokenizer/checkpoints/bundles built once per session (seconds, no downloads)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny` from any test folder

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tiny.tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """Native checkpoint of a random tiny model with nonzero (unmerged) LoRA adapters."""
    from posellm.checkpoint import save_native
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_native(tiny.tiny_model(tiny.tiny_config(tokenizer_dir)), out, tokenizer_dir)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    from exporter.bundle import ExportConfig, export_bundle
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(ExportConfig(tiny_checkpoint, out, precisions=("fp32", "fp16"), max_persons=3))
    return out


@pytest.fixture(scope="session")
def grammar_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny model trained for a few steps so greedy answers follow `[0.ddd,0.ddd]` (template-mode parity)."""
    from posellm.checkpoint import save_native
    out = tmp_path_factory.mktemp("grammar") / "tiny"
    save_native(tiny.grammar_model(tokenizer_dir), out, tokenizer_dir)
    return out


@pytest.fixture(scope="session")
def locllm_tokenizer_dir(tmp_path_factory) -> Path:
    return tiny.locllm_tokenizer_dir(tmp_path_factory.mktemp("locllm-tok"))


@pytest.fixture(scope="session")
def locllm_checkpoint(tmp_path_factory, locllm_tokenizer_dir) -> Path:
    """A tiny checkpoint exactly as LocLLM's training writes it: <im_patch> = vocab_size = 32000, bf16 LLM, fp32
    ViT/projector/LoRA, two .bin shards + index (tiny.locllm_checkpoint)."""
    return tiny.locllm_checkpoint(tmp_path_factory.mktemp("locllm") / "ckpt", locllm_tokenizer_dir, seed=5)


@pytest.fixture(scope="session")
def locllm_bundle(tmp_path_factory, locllm_checkpoint) -> Path:
    from exporter.bundle import ExportConfig, export_bundle
    out = tmp_path_factory.mktemp("locllm-bundle") / "b"
    export_bundle(ExportConfig(locllm_checkpoint, out, precisions=("fp32", "fp16"), max_persons=3))
    return out
