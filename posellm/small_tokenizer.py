"""A small LLaMA-style tokenizer for tiny test models and the shipped small model.

Same conventions as the LLaMA tokenizer where our code depends on them: SentencePiece-style `▁` word prefix
(normalizer Prepend + Replace), `<unk>`=0 / `<s>`=1 / `</s>`=2, digits and `.`/`,`/`]` as single tokens so the
answer `[0.123,0.456]` is the same 13-token shape (`▁[` `0` `.` d d d `,` `0` `.` d d d `]`), and `<im_patch>` an
added special token after the base vocabulary. Built deterministically from the prompt texts.
"""
from __future__ import annotations

import itertools
import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from runtime.keypoints import standard_keypoints
from runtime.prompts import IMAGE_PREFIX, IMAGE_TOKEN, suffix_text

SPECIALS = ["<unk>", "<s>", "</s>"]


def _corpus() -> list[str]:
    texts = [IMAGE_PREFIX.strip()]
    for name, description in standard_keypoints():
        texts.append(suffix_text(name, description))
    texts += [f"[0.{i:03d},0.{(i * 37) % 1000:03d}]" for i in range(0, 1000, 7)]
    texts += ["The person in this image has a head, a torso, two arms and two legs.",
              "Where is the keypoint? Please provide its coordinates."]
    return texts


def build_small_tokenizer(vocab_size: int = 600, base_vocab: int | None = None) -> Tokenizer:
    """`base_vocab` pads the model vocabulary with never-produced pieces (`<0xNN>` byte tokens, then `<unused_i>`)
    to exactly that many ids before `<im_patch>` is added, which then gets id `base_vocab` — the layout of a
    LocLLM checkpoint's tokenizer (LLaMA's 32000 pieces + `<im_patch>` = 32000)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Digits and answer punctuation never merge with neighbours (LLaMA splits digits too).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"),  # words start with ▁, as SentencePiece pieces
        pre_tokenizers.Split(Regex(r"\d|[.,\]]"), behavior="isolated"),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=list("0123456789.,[]▁"))
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if base_vocab is not None:
        tok = _padded(tok, base_vocab)
    tok.add_special_tokens([IMAGE_TOKEN])
    return tok


def _padded(tok: Tokenizer, size: int) -> Tokenizer:
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    if size < len(vocab):
        raise ValueError(f"base_vocab={size} is smaller than the trained vocabulary ({len(vocab)})")
    fillers = (f"<0x{b:02X}>" for b in range(256))
    extra = (f"<unused_{i}>" for i in range(size))
    for piece in itertools.chain(fillers, extra):
        if len(vocab) == size:
            break
        vocab.setdefault(piece, len(vocab))
    return Tokenizer.from_str(json.dumps(data))


if __name__ == "__main__":
    import sys
    build_small_tokenizer().save(sys.argv[1] if len(sys.argv) > 1 else "tokenizer.json")
