"""LocLLM's keypoint prompt (conv format "keypoint") and its exact tokenization (SPEC §2).

LocLLM's tokenizer (transformers 4.31 slow LlamaTokenizer, `<im_patch>` an added special token) strips whitespace on
both sides of a special token and tokenizes each remaining text chunk as a fresh SentencePiece sequence (dummy-prefix
`▁` included). Trained checkpoints depend on that, so we tokenize the chunks around the `<im_patch>` run separately,
each stripped: `<s>` + tok("Image:") + `<im_patch>`×N + tok("Keypoint: …\nAnswer:").
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from .errors import InputError

IMAGE_TOKEN = "<im_patch>"
IMAGE_PREFIX = "Image: "
ANSWER_TEMPLATE_TEXT = "[0.000,0.000]"
# Positions of the six digits inside the 13-token answer `▁[ 0 . d d d , 0 . d d d ]`.
DIGIT_POSITIONS = (3, 4, 5, 9, 10, 11)


def question(name: str) -> str:
    return f"Where is the {name} of this person in this image? Please provide its coordinates."


def suffix_text(name: str, description: str) -> str:
    return f"Keypoint: {description}\nQuestion: {question(name)}\nAnswer:"


def prompt_text(name: str, description: str, num_patches: int) -> str:
    """The string LocLLM builds (before tokenization)."""
    return IMAGE_PREFIX + IMAGE_TOKEN * num_patches + "\n" + suffix_text(name, description)


def parse_keypoint_spec(spec: str) -> tuple[str, str]:
    """`"name: description"` → (name, description)."""
    name, sep, description = spec.partition(":")
    if not sep or not name.strip() or not description.strip():
        raise InputError(f"keypoint {spec!r}: expected 'name: description'")
    return name.strip(), description.strip()


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    image: int


class PromptTokenizer:
    """Tokenizes prompts exactly as LocLLM's environment did, with a `tokenizers` tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        image = tokenizer.token_to_id(IMAGE_TOKEN)
        if image is None:  # the LLaMA tokenizer.json has no <im_patch>: LocLLM adds it as the next id
            tokenizer.add_special_tokens([IMAGE_TOKEN])
            image = tokenizer.token_to_id(IMAGE_TOKEN)
        ids = {name: tokenizer.token_to_id(tok) for name, tok in
               (("bos", "<s>"), ("eos", "</s>"), ("pad", "<unk>"))}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise InputError(f"tokenizer lacks special tokens {missing}; expected <s>, </s>, <unk>")
        self.special = SpecialIds(bos=ids["bos"], eos=ids["eos"], pad=ids["pad"], image=image)

    @classmethod
    def from_file(cls, path: str) -> "PromptTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def encode_chunk(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.strip(), add_special_tokens=False).ids

    def prefix_ids(self) -> list[int]:
        """`<s> ▁Image :` — the shared text before the image slot."""
        return [self.special.bos] + self.encode_chunk(IMAGE_PREFIX)

    def suffix_ids(self, name: str, description: str) -> list[int]:
        return self.encode_chunk(suffix_text(name, description))

    def prompt_ids(self, name: str, description: str, num_patches: int) -> list[int]:
        return self.prefix_ids() + [self.special.image] * num_patches + self.suffix_ids(name, description)

    def answer_template(self) -> list[int] | None:
        """The 13 ids of `[0.ddd,0.ddd]`, or None when this tokenizer does not split it one char per token."""
        ids = self.encode_chunk(ANSWER_TEMPLATE_TEXT)
        if len(ids) != 13 or any(self.tokenizer.id_to_token(ids[p]) != "0" for p in DIGIT_POSITIONS):
            return None
        return ids

    def digit_ids(self) -> list[int] | None:
        """Ids of '0'..'9' as single tokens (never contiguous in the LLaMA vocab: look them up)."""
        ids = [self.tokenizer.token_to_id(str(d)) for d in range(10)]
        return None if any(i is None for i in ids) else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
