"""The bundle's tokenizer.json: taken from the checkpoint, or converted from LocLLM's SentencePiece model."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from posellm.checkpoint import tokenizer_files
from runtime.prompts import IMAGE_TOKEN


def bundle_tokenizer(checkpoint: Path) -> Tokenizer:
    """A `tokenizers` tokenizer with `<im_patch>` registered (LocLLM adds it as the first id after the vocab).

    `tokenizer_files` resolves a PEFT adapter to its base and raises, naming the expected files, when none exist.
    """
    files = tokenizer_files(checkpoint)
    if "tokenizer.json" in files:
        tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
    else:
        # transformers converts the SentencePiece model to the equivalent fast tokenizer (legacy LLaMA behaviour);
        # tests check the ids equal LocLLM's token for token.
        from transformers import LlamaTokenizer
        tokenizer = LlamaTokenizer.from_pretrained(str(files["tokenizer.model"].parent), legacy=True).backend_tokenizer
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        tokenizer.add_special_tokens([IMAGE_TOKEN])
    return tokenizer
