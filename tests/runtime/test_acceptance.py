"""AcceptanceTracker: who gets a speculative draft, from a running rate measured in the shadow of every frame."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.acceptance import AcceptanceConfig, AcceptanceTracker
from runtime.results import PersonResult

DIGITS = tuple(range(10, 20))  # token id of digit d: 10 + d
POSITIONS = (3, 4, 5, 9, 10, 11)


def _person(values: list[tuple[str, str]]) -> PersonResult:
    """A result whose keypoint k answered `[0.xxx,0.yyy]` (token ids: 1 for fixed tokens, 10 + d for digits)."""
    tokens = []
    for x, y in values:
        ids = [1] * 13
        for p, d in zip(POSITIONS, x + y):
            ids[p] = 10 + int(d)
        tokens.append(tuple(ids))
    n = len(values)
    return PersonResult((0, 0, 1, 1), tuple(f"k{i}" for i in range(n)), np.zeros((n, 3)), 0.0, ("",) * n, ("",) * n,
                        tuple(tokens))


def test_gate_follows_the_share_of_whole_drafts():
    t = AcceptanceTracker(DIGITS, POSITIONS, AcceptanceConfig(min_rate=0.5, decay=0.5))
    a = _person([("420", "100"), ("440", "070")])
    assert t.drafts(["p"], [None]) == [None]  # nothing to draft from
    assert t.drafts(["p"], [a]) == [a]  # a new person: its first draft is tried (start 1.0)
    moved = _person([("430", "100"), ("450", "070")])  # both keypoints' second digit changed
    t.update(["p"], [a], [moved])
    assert t.rates["p"] == pytest.approx(0.5)  # 0.5 * 1.0 + 0.5 * 0/2
    assert t.drafts(["p"], [moved]) == [moved]  # 0.5 >= 0.5
    t.update(["p"], [moved], [_person([("440", "100"), ("450", "070")])])  # 1 of 2 held whole
    assert t.rates["p"] == pytest.approx(0.5)
    t.update(["p"], [moved], [a])  # 0 of 2
    assert t.rates["p"] == pytest.approx(0.25)
    assert t.drafts(["p"], [a]) == [None]  # gated off: template decoding's passes for this person
    t.update(["p"], [a], [a])  # measured in the shadow while gated: all held, the draft comes back
    assert t.rates["p"] == pytest.approx(0.625) and t.drafts(["p"], [a]) == [a]
    j = t.to_json()
    print("shadow acceptance per digit", j["shadow_acceptance"], "drafted", j["drafted_persons"], "of",
          j["persons_with_last"])
    # over 4 updates × 2 keypoints: the first digit never moved (8 of 8), the second held in 0 + 1 + 0 + 2 of them
    assert j["shadow_acceptance"][:2] == [pytest.approx(1.0), pytest.approx(3 / 8)]
    assert (j["drafted_persons"], j["persons_with_last"]) == (3, 4)


def test_keypoint_set_change_and_forget():
    t = AcceptanceTracker(DIGITS, POSITIONS, AcceptanceConfig(min_rate=0.9))
    a, b = _person([("420", "100")]), _person([("420", "100"), ("440", "070")])
    t.update([1], [a], [b])  # a different keypoint set: nothing comparable, nothing recorded
    assert t.rates == {}
    t.update([1, 2], [a, a], [a, _person([("999", "999")])])
    assert t.rates == {1: pytest.approx(1.0), 2: pytest.approx(0.5)}
    t.forget([2])
    assert list(t.rates) == [2]


def test_config_is_checked():
    with pytest.raises(ValueError):
        AcceptanceConfig(min_rate=1.5)
    with pytest.raises(ValueError):
        AcceptanceConfig(decay=0.0)
