"""The bundle's tokenizer.json: taken from the checkpoint, or converted from LocLLM's SentencePiece model."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from runtime.errors import InputError
from runtime.prompts import IMAGE_TOKEN


def bundle_tokenizer(checkpoint: Path) -> Tokenizer:
    """A `tokenizers` tokenizer with `<im_patch>` registered (LocLLM adds it as the first id after the vocab)."""
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    fast = directory / "tokenizer.json"
    slow = directory / "tokenizer.model"
    if fast.is_file():
        tokenizer = Tokenizer.from_file(str(fast))
    elif slow.is_file():
        # transformers converts the SentencePiece model to the equivalent fast tokenizer (legacy LLaMA behaviour).
        from transformers import LlamaTokenizerFast
        tokenizer = LlamaTokenizerFast(vocab_file=str(slow), legacy=True, from_slow=True).backend_tokenizer
    else:
        raise InputError(f"{directory}: no tokenizer found; expected tokenizer.json or tokenizer.model "
                         "(SentencePiece) next to the weights")
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        tokenizer.add_special_tokens([IMAGE_TOKEN])
    return tokenizer
