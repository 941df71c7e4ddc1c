"""Answer parsing and keypoint scoring with LocLLM's semantics (SPEC §3, LocLLM `utils/valid2d.py`).

Shared by the PyTorch reference and the runtime so both score identically.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

ANSWER_PATTERN = re.compile(r"0\.\d+")


@dataclass(frozen=True)
class KeypointAnswer:
    text: str
    x: float  # crop pixels (0 when absent, as LocLLM)
    y: float
    score: float
    ok: bool  # the answer held exactly two coordinates
    flag: str  # "" when ok; else why the answer was not well-formed


def step_confidences(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability over the full vocab at each generation step: [steps, vocab] → [steps]."""
    logits = np.asarray(logits, dtype=np.float64)
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return (p.max(axis=-1) / p.sum(axis=-1)).astype(np.float64)


def _span_score(conf: np.ndarray, start: int, length: int) -> tuple[float, bool]:
    span = conf[start:start + length]
    if span.size == 0:  # LocLLM would average an empty slice (NaN); we score 0 and flag it
        return 0.0, False
    return float(span.mean()), True


def parse_answer(text: str, conf: np.ndarray, crop_size: int) -> KeypointAnswer:
    """Parse the stripped decoded text and score it.

    `conf` holds the per-step max probabilities of the generation *as LocLLM indexes them*: the scores of every
    generated step except the last one of the batch (`torch.stack(output_scores[:-1])`). Character offsets of each
    matched number in `text` are used as step indices (one char = one token for well-formed answers).
    """
    matches = ANSWER_PATTERN.findall(text)
    if not matches:
        return KeypointAnswer(text, 0.0, 0.0, 0.0, False, "no coordinate in answer")
    x = float(matches[0]) * crop_size
    sx, okx = _span_score(conf, text.find(matches[0]), len(matches[0]))
    if len(matches) == 1:
        return KeypointAnswer(text, x, 0.0, (sx + 0.0) / 2.0, False, "one coordinate in answer")
    y = float(matches[1]) * crop_size
    sy, oky = _span_score(conf, text.find(matches[1]), len(matches[1]))
    flag = "" if len(matches) == 2 else f"{len(matches)} coordinates in answer"
    if not (okx and oky):
        flag = flag or "coordinate beyond the scored steps"
    return KeypointAnswer(text, x, y, (sx + sy) / 2.0, flag == "", flag)
