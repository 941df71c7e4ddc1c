"""Reference inference with LocLLM's semantics (SPEC §3): per person 17 full prompts, left padded, HF greedy
generate for 13 tokens, LocLLM parsing and scoring. This is what every exported variant is measured against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig

from runtime.answer import parse_answer, step_confidences
from runtime.decoding import until_eos
from runtime.keypoints import standard_keypoints
from runtime.image_io import ensure_rgb
from runtime.preprocess import (CLIP_MEAN, CLIP_STD, DINO_MEAN, DINO_STD, CropSpec, crop_at_center_scale,
                                crop_persons)
from runtime.prompts import PromptTokenizer
from runtime.results import PersonResult, person_result

from .model import PoseLLM

MAX_NEW_TOKENS = 13


@dataclass(frozen=True)
class Generation:
    """Raw greedy output for one person: generated ids per prompt (up to and incl. EOS) and step confidences."""

    tokens: list[list[int]]
    texts: list[str]
    conf: np.ndarray  # [prompts, steps-1]: LocLLM scores stack, last step dropped


class ReferenceEstimator:
    def __init__(self, model: PoseLLM, tokenizer: PromptTokenizer, dtype: torch.dtype = torch.float32,
                 keypoints: list[tuple[str, str]] | None = None) -> None:
        model.cfg.check_image_token(tokenizer.special.image, "reference tokenizer")
        self.model = model.to(dtype).eval()
        self.tok = tokenizer
        self.dtype = dtype
        self.keypoints = keypoints or standard_keypoints()
        cfg = model.cfg
        mean, std = (CLIP_MEAN, CLIP_STD) if cfg.normalization == "clip" else (DINO_MEAN, DINO_STD)
        self.crop_spec = CropSpec(crop_size=cfg.crop_size, mean=mean, std=std)
        self.prompts = [tokenizer.prompt_ids(n, d, cfg.num_patches) for n, d in self.keypoints]
        self.gen_config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                           output_scores=True, return_dict_in_generate=True,
                                           pad_token_id=tokenizer.special.pad, eos_token_id=tokenizer.special.eos,
                                           bos_token_id=tokenizer.special.bos)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt batch (pad = <unk>, mask 0), as LocLLM's tokenizer(padding='longest')."""
        width = max(len(p) for p in self.prompts)
        ids = torch.full((len(self.prompts), width), self.tok.special.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(self.prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask

    @torch.inference_mode()
    def generate(self, pixel_values: np.ndarray) -> Generation:
        """One person's crop [3,S,S] → the 17 greedy answers."""
        ids, mask = self._batch()
        px = torch.from_numpy(np.ascontiguousarray(pixel_values))[None].to(self.dtype)
        image_embeds = self.model.encode_image(px).expand(len(self.prompts), -1, -1)
        embeds = self.model.embed(ids, image_embeds)
        out = self.model.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=self.gen_config)
        new = out.sequences[:, -len(out.scores):].tolist()
        steps = torch.stack(out.scores[:-1], dim=1).float().numpy() if len(out.scores) > 1 else \
            np.zeros((len(self.prompts), 0, 1), np.float32)
        conf = np.stack([step_confidences(s) for s in steps]) if steps.shape[1] else np.zeros((len(new), 0))
        tokens = [until_eos(t, self.tok.special.eos) for t in new]
        return Generation(tokens=tokens, texts=[self.tok.decode(t) for t in tokens], conf=conf)

    def _estimate(self, pixel_values: np.ndarray, affines: list, boxes) -> list[PersonResult]:
        results = []
        names = [n for n, _ in self.keypoints]
        for px, (center, scale), box in zip(pixel_values, affines, boxes):
            gen = self.generate(px)
            answers = [parse_answer(t, c, self.crop_spec.crop_size) for t, c in zip(gen.texts, gen.conf)]
            results.append(person_result(box, center, scale, self.crop_spec.crop_size, names, answers,
                                         gen.tokens))
        return results

    def estimate(self, image, boxes) -> list[PersonResult]:
        """Same contract as the runtime's Estimator.estimate."""
        pixel_values, crops = crop_persons(ensure_rgb(image), boxes, self.crop_spec)
        return self._estimate(pixel_values, [(c.center, c.scale) for c in crops], boxes)

    def estimate_records(self, image, records) -> list[PersonResult]:
        """COCO GT persons, cropped from each record's centre/scale (as LocLLM evaluation does)."""
        rgb = ensure_rgb(image)
        pixel_values = np.stack([crop_at_center_scale(rgb, r.center, r.scale, self.crop_spec) for r in records])
        return self._estimate(pixel_values, [(r.center, r.scale) for r in records], [r.box for r in records])

