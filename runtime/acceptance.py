"""Which persons get a speculative draft: a running rate of how often last frame's answers held whole.

A draft only pays when a keypoint's six digits all hold (one pass verifies it); a row with a wrong digit costs a
correction pass, and the batch waits for its slowest row. So a person whose keypoints' drafts keep failing is
decoded without a draft (template decoding's passes: speculation never costs more than template for them).

The rate is measured in the shadow of every frame, drafted or not: last frame's digits against this frame's
answer, which is exactly what verification would have accepted (the answers equal template decoding's). So a
person decoded without a draft starts speculating again as soon as its answers settle; no probing frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from .results import PersonResult
from .speculative import NO_DRAFT, draft_digits


@dataclass(frozen=True)
class AcceptanceConfig:
    # speculate for a person while at least this share of its keypoints' drafts held whole (running rate); measured
    # on the shipped model (benchmarks/results/README.md): all held 1.22x template, 21% held 0.9x; 0: always draft
    min_rate: float = 0.5
    decay: float = 0.5  # weight of the newest frame in the running rate
    start: float = 1.0  # rate of a new person (its first draft is tried)

    def __post_init__(self) -> None:
        if not (0.0 <= self.min_rate <= 1.0 and 0.0 < self.decay <= 1.0 and 0.0 <= self.start <= 1.0):
            raise ValueError(f"{self}: expected min_rate, start in [0, 1] and decay in (0, 1]")


@dataclass
class AcceptanceTracker:
    digit_ids: tuple[int, ...]
    digit_positions: tuple[int, ...]
    config: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    rates: dict[Hashable, float] = field(default_factory=dict)
    offered: np.ndarray = field(default_factory=lambda: np.zeros(6, np.int64))  # shadow counts per digit position
    held: np.ndarray = field(default_factory=lambda: np.zeros(6, np.int64))
    drafted: int = 0  # persons given a draft / persons with a last answer
    candidates: int = 0

    def drafts(self, keys: Sequence[Hashable], lasts: Sequence[PersonResult | None]) -> list[PersonResult | None]:
        """Per person, its last result as the draft, or None where its running rate is below min_rate."""
        out = []
        for key, last in zip(keys, lasts, strict=True):
            use = last is not None and self.rates.get(key, self.config.start) >= self.config.min_rate
            self.candidates += last is not None
            self.drafted += use
            out.append(last if use else None)
        return out

    def update(self, keys: Sequence[Hashable], lasts: Sequence[PersonResult | None],
               results: Sequence[PersonResult]) -> None:
        """Shadow measurement: per person, the share of keypoints whose six digits equal last frame's."""
        for key, last, now in zip(keys, lasts, results, strict=True):
            if last is None or len(last.tokens) != len(now.tokens) or not now.tokens:
                continue
            was = draft_digits(last.tokens, self.digit_ids, self.digit_positions)
            got = draft_digits(now.tokens, self.digit_ids, self.digit_positions)
            ok = (was != NO_DRAFT) & (was == got)
            self.offered += (was != NO_DRAFT).sum(axis=0)
            self.held += ok.sum(axis=0)
            whole = float(ok.all(axis=1).mean())
            old = self.rates.get(key, self.config.start)
            self.rates[key] = (1 - self.config.decay) * old + self.config.decay * whole

    def forget(self, keep: Sequence[Hashable]) -> None:
        """Drop the rates of persons no longer tracked (ids are never reused; this bounds the dict)."""
        self.rates = {k: v for k, v in self.rates.items() if k in set(keep)}

    def to_json(self) -> dict:
        return {"config": {"min_rate": self.config.min_rate, "decay": self.config.decay, "start": self.config.start},
                "drafted_persons": self.drafted, "persons_with_last": self.candidates,
                "shadow_acceptance": [float(h / o) if o else None for h, o in zip(self.held, self.offered)]}
