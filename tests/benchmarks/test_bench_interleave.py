"""Interleaved bench timing: every variant runs every person, in rotating order, so they share the machine's load."""
from __future__ import annotations

from pathlib import Path

from benchmarks.bench import BenchConfig, _time_interleaved


class _Recorder:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def estimate_records(self, image, records):
        self.calls.append((self.name, records[0]))


def test_each_variant_times_the_same_persons_in_rotating_order():
    calls: list = []
    ests = [_Recorder(n, calls) for n in ("a", "b", "c")]
    persons = [(None, i) for i in range(4)]
    cfg = BenchConfig(bundles=(), coco=Path("x"), images=Path("y"), warmup=1)
    out = _time_interleaved(ests, persons, cfg, n=5)
    assert len(calls) == 3 * 6 and all(len(t["ms_per_person"]) == 3 for t in out)
    for e in "abc":  # the same persons, in the same order, for every variant
        assert [p for n, p in calls if n == e] == [i % 4 for i in range(6)]
    firsts = [calls[3 * i][0] for i in range(6)]
    assert firsts[:3] == ["a", "b", "c"]  # who goes first rotates: no variant always gets the cold start
