"""A small LLaMA-style tokenizer for tiny test models and the shipped small model.

Same conventions as the LLaMA tokenizer where our code depends on them: SentencePiece-style `▁` word prefix
(normalizer Prepend + Replace), `<unk>`=0 / `<s>`=1 / `</s>`=2, digits and `.`/`,`/`]` as single tokens so the
answer `[0.123,0.456]` is the same 13-token shape (`▁[` `0` `.` d d d `,` `0` `.` d d d `]`), and `<im_patch>` an
added special token after the base vocabulary. Built deterministically from the prompt texts.
"""
from __future__ import annotations

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


def build_small_tokenizer(vocab_size: int = 600) -> Tokenizer:
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
    tok.add_special_tokens([IMAGE_TOKEN])
    return tok


if __name__ == "__main__":
    import sys
    build_small_tokenizer().save(sys.argv[1] if len(sys.argv) > 1 else "tokenizer.json")
