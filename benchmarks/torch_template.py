"""The strongest plain-PyTorch way a user could write template decoding: the baseline the runtime must beat.

Same work plan as the runtime's template mode (runtime/decoding.py), written with transformers' own cache: the
vision tower once per person, the prompt prefix (`<s> ▁Image :` + image tokens) prefilled once and its KV cache
shared by the 17 keypoint rows (`DynamicCache.batch_repeat_interleave`: HF attention has no grouped-prefix kernel,
so it is a copy, not a recomputation), the keypoint suffixes + the fixed answer head `▁[ 0 .` in one batched pass,
then the template's remaining decisions in 5 passes (3 single digits, `d , 0 .` together, 2 single digits), and the
lm_head only at the positions whose confidence or digit is used (10 of 13 answer steps). Answers and scores go
through the same parser as the reference and the runtime.
"""
from __future__ import annotations

import numpy as np
import torch

from posellm.model import PoseLLM
from posellm.reference import Generation, ReferenceEstimator
from runtime.answer import step_confidences
from runtime.prompts import DIGIT_POSITIONS, PromptTokenizer

# answer steps whose confidences LocLLM's score reads: the two `0.ddd` spans (steps 1-5 and 7-11)
SCORED_STEPS = frozenset(range(1, 6)) | frozenset(range(7, 12))


class TorchTemplateEstimator(ReferenceEstimator):
    def __init__(self, model: PoseLLM, tokenizer: PromptTokenizer, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(model, tokenizer, dtype)
        template = tokenizer.answer_template()
        if template is None:
            raise ValueError("this tokenizer does not split the answer one char per token: no template decoding")
        self.template = torch.tensor(template)
        self.digits = torch.tensor(tokenizer.digit_ids())
        self.prefix = torch.tensor(tokenizer.prefix_ids())
        head = template[:DIGIT_POSITIONS[0]]  # `▁[ 0 .` rides along with the suffix prefill
        seqs = [tokenizer.suffix_ids(n, d) + head for n, d in self.keypoints]
        width = max(len(s) for s in seqs)
        self.ids = torch.full((len(seqs), width), tokenizer.special.pad, dtype=torch.long)
        self.mask = torch.zeros_like(self.ids)
        for i, s in enumerate(seqs):  # padded between prefix and suffix, as the runtime pads
            self.ids[i, width - len(s):] = torch.tensor(s)
            self.mask[i, width - len(s):] = 1

    @torch.inference_mode()
    def generate(self, pixel_values: np.ndarray) -> Generation:
        llm = self.model.llm
        table = llm.get_input_embeddings()
        px = torch.from_numpy(np.ascontiguousarray(pixel_values))[None].to(self.dtype)
        prefix = torch.cat((table(self.prefix)[None], self.model.encode_image(px)), dim=1)
        plen, rows = prefix.shape[1], self.ids.shape[0]
        cache = llm.model(inputs_embeds=prefix, use_cache=True).cache
        cache.batch_repeat_interleave(rows)
        mask = torch.cat((torch.ones(rows, plen, dtype=torch.long), self.mask), dim=1)
        pos = plen + (self.mask.cumsum(-1) - 1).clamp(min=0)
        hidden = llm.model(inputs_embeds=table(self.ids), attention_mask=mask, position_ids=pos,
                           cache=cache, use_cache=True).last_hidden_state
        gen = self.template.repeat(rows, 1)
        conf = np.zeros((rows, len(self.template) - 1))

        def take(h: torch.Tensor, first_step: int) -> None:
            """Position j of `h` predicts answer step first_step + j: lm_head only where a score or digit is read."""
            steps = [first_step + j for j in range(h.shape[1])]
            keep = [j for j, s in enumerate(steps) if s in SCORED_STEPS or s in DIGIT_POSITIONS]
            logits = llm.lm_head(h[:, keep]).float()
            for i, j in enumerate(keep):
                step = steps[j]
                conf[:, step] = step_confidences(logits[:, i].numpy())
                if step in DIGIT_POSITIONS:
                    gen[:, step] = self.digits[logits[:, i, self.digits].argmax(-1)]

        first, second = DIGIT_POSITIONS[:3], DIGIT_POSITIONS[3:]
        take(hidden[:, -first[0]:], 1)  # the head's positions predict steps 1 .. first[0]
        last = pos[:, -1]
        plan = [[p] for p in first[1:]] + [list(range(first[-1] + 1, second[0] + 1))] + [[p] for p in second[1:]]
        for targets in plan:
            feed = gen[:, targets[0] - 1:targets[-1]]
            width = feed.shape[1]
            mask = torch.cat((mask, torch.ones(rows, width, dtype=torch.long)), dim=1)
            step_pos = last[:, None] + torch.arange(1, width + 1)
            last = step_pos[:, -1]
            hidden = llm.model(inputs_embeds=table(feed), attention_mask=mask, position_ids=step_pos,
                               cache=cache, use_cache=True).last_hidden_state
            take(hidden, targets[0])
        tokens = gen.tolist()
        return Generation(tokens=tokens, texts=[self.tok.decode(t) for t in tokens], conf=conf)
