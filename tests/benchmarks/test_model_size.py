"""The README's size table: parameter counts from the real module shapes, and the byte model per precision."""
from __future__ import annotations

import pytest

from benchmarks.model_size import PRECISIONS, kv_cache_bytes, param_counts, size_table, weight_bytes
from posellm.config import preset


def test_counts_cover_every_parameter_of_the_model():
    from posellm.model import PoseLLM
    cfg = preset("tiny")
    p = param_counts(cfg)
    total = sum(t.numel() for t in PoseLLM(cfg).parameters())
    parts = p.vision_linear + p.vision_other + p.decoder_linear + p.decoder_other + p.lm_head + p.embedding
    assert parts == total
    c = cfg.llm
    kv = c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    assert p.decoder_linear == c.num_hidden_layers * per_layer
    assert p.lm_head == c.hidden_size * c.vocab_size


def test_7b_table_meets_the_size_targets_and_counts_the_kv_cache():
    rows = {r["precision"]: r for r in size_table("posellm-7b", persons=4, suffix_tokens=48)}
    assert list(rows) == list(PRECISIONS)
    fp16 = rows["fp16"]["decoder"]
    print({k: round(r["decoder"] / fp16, 3) for k, r in rows.items()})
    assert 6.4 < rows["fp16"]["decoder"] * 1024 ** 3 / 2 / 1e9 < 6.9  # Vicuna-7B decoder: ~6.7 B parameters
    assert rows["int4"]["decoder"] <= 0.30 * fp16 and rows["int8wo"]["decoder"] <= 0.55 * fp16
    cfg = preset("posellm-7b")
    one = kv_cache_bytes(cfg, 1, 48, "fp16")
    assert kv_cache_bytes(cfg, 4, 48, "fp16") == pytest.approx(4 * one)
    assert rows["int4"]["kv_cache"] * 1024 ** 3 == pytest.approx(4 * one)
    assert rows["int4"]["total"] == pytest.approx(sum(rows["int4"][k] for k in
                                                      ("vision", "decoder", "embedding", "kv_cache")))


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="int3"):
        weight_bytes(param_counts(preset("tiny")), "int3")
