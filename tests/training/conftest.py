"""Fixtures of the training tests: the small tokenizer and a few synthetic people (seconds, no downloads)."""
from __future__ import annotations

import pytest

from posellm.small_tokenizer import build_small_tokenizer
from runtime.prompts import PromptTokenizer
from training.samples import PersonSet, ensure_dataset


@pytest.fixture(scope="session")
def ptok():
    return PromptTokenizer(build_small_tokenizer())


@pytest.fixture(scope="session")
def people(tmp_path_factory):
    return PersonSet(ensure_dataset(tmp_path_factory.mktemp("synth"), num_images=4, seed=3))
