"""Prompt tokenization (SPEC §2, LocLLM's whitespace quirk) and answer parsing/scoring (SPEC §3)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

import tiny
from runtime.answer import parse_answer, step_confidences
from runtime.keypoints import KEYPOINT_NAMES, standard_keypoints
from runtime.prompts import PromptTokenizer, prompt_text

LLAMA = tiny.SHARED / "fixtures" / "llama-tokenizer"
needs_llama = pytest.mark.skipif(not (LLAMA / "tokenizer.json").exists(),
                                 reason=f"{LLAMA} not found (../shared is not part of a user's clone)")


@needs_llama
def test_prompts_equal_locllm_ids_token_for_token():
    expected = json.loads((LLAMA / "locllm_prompt_ids.json").read_text())
    tok = PromptTokenizer(Tokenizer.from_file(str(LLAMA / "tokenizer.json")))
    assert tok.special.image == expected["image_token_id"] == 32000
    assert [p["keypoint"] for p in expected["prompts"]] == list(KEYPOINT_NAMES)
    for (name, desc), p in zip(standard_keypoints(), expected["prompts"]):
        assert prompt_text(name, desc, 256) == p["prompt"]
        ids = tok.prompt_ids(name, desc, 256)
        assert tok.prefix_ids() == p["prefix_ids"] == [1, 7084, 29901]
        assert tok.suffix_ids(name, desc) == p["suffix_ids"]
        assert len(ids) == p["total_len"]
    nose = tok.prompt_ids(*standard_keypoints()[0], 256)
    naive = tok.tokenizer.encode(prompt_text(*standard_keypoints()[0], 256)).ids  # whitespace kept
    print(f"nose prompt: {len(nose)} ids (LocLLM), naive tokenization {len(naive)}")
    assert len(nose) == 306 and len(naive) == 309


@needs_llama
def test_llama_answer_is_13_tokens_with_looked_up_digits():
    tok = PromptTokenizer(Tokenizer.from_file(str(LLAMA / "tokenizer.json")))
    ids = tok.encode_chunk("[0.123,0.456]")
    assert len(ids) == 13
    assert [tok.tokenizer.id_to_token(i) for i in ids] == ["▁[", "0", ".", "1", "2", "3", ",", "0", ".", "4", "5",
                                                           "6", "]"]
    digits = tok.digit_ids()
    assert digits[0] == 29900 and digits[1] == 29896 and digits[2] == 29906  # not contiguous: looked up
    assert tok.answer_template() is not None
    assert tok.decode(ids + [tok.special.eos]) == "[0.123,0.456]"


@needs_llama
def test_sentencepiece_model_converts_to_the_same_ids(tmp_path):
    """A LocLLM checkpoint ships tokenizer.model only: the exporter's conversion must give identical ids."""
    from exporter.tokenizer import bundle_tokenizer
    shutil.copy(LLAMA / "tokenizer.model", tmp_path / "tokenizer.model")
    converted = PromptTokenizer(bundle_tokenizer(tmp_path))
    reference = PromptTokenizer(Tokenizer.from_file(str(LLAMA / "tokenizer.json")))
    for name, desc in standard_keypoints():
        assert converted.prompt_ids(name, desc, 256) == reference.prompt_ids(name, desc, 256)
    assert converted.special == reference.special


def test_small_tokenizer_has_the_llama_answer_shape(tokenizer_dir):
    tok = PromptTokenizer(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    assert tok.answer_template() is not None and len(tok.encode_chunk("[0.987,0.654]")) == 13
    assert (tok.special.pad, tok.special.bos, tok.special.eos) == (0, 1, 2)
    assert tok.special.image == tok.tokenizer.get_vocab_size() - 1


# -- parsing and scoring (LocLLM valid2d.py) -------------------------------------------------------------------

def _conf(n: int) -> np.ndarray:
    return np.linspace(0.5, 0.9, n)  # a distinct confidence per generation step


def test_well_formed_answer():
    conf = _conf(12)
    a = parse_answer("[0.123,0.456]", conf, 224)
    assert a.ok and a.flag == ""
    assert a.x == pytest.approx(0.123 * 224) and a.y == pytest.approx(0.456 * 224)
    # x: characters 1..5 → steps 1..5; y: characters 7..11 → steps 7..11
    assert a.score == pytest.approx((conf[1:6].mean() + conf[7:12].mean()) / 2, abs=1e-12)


def test_one_number_answer():
    conf = _conf(12)
    a = parse_answer("[0.25", conf, 224)
    assert not a.ok and a.x == pytest.approx(56.0) and a.y == 0.0
    assert a.score == pytest.approx(conf[1:5].mean() / 2)


def test_garbage_answer():
    a = parse_answer("I see a person", _conf(12), 224)
    assert not a.ok and (a.x, a.y, a.score) == (0.0, 0.0, 0.0) and a.flag


def test_extra_numbers_use_the_first_two_and_flag():
    a = parse_answer("[0.1,0.2,0.3]", _conf(12), 100)
    assert (a.x, a.y) == (pytest.approx(10.0), pytest.approx(20.0)) and not a.ok


def test_span_beyond_scored_steps_scores_zero_part():
    a = parse_answer("[0.123,0.456]", _conf(6), 224)  # steps for y were never scored
    assert a.score == pytest.approx(_conf(6)[1:6].mean() / 2) and a.flag


def test_step_confidences_is_max_softmax():
    logits = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, -1.0]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(step_confidences(logits), p.max(-1), rtol=1e-12)
