"""Cross-request batching of persons: the work of one `@serve.batch` call.

A request becomes one or more `Job`s (its persons' crops, at most the bundle's exported persons per batch each). A
batch of jobs from concurrent requests is grouped by keypoint set — custom keypoints share a decoder batch only with
the same set — and each group is one `Estimator.estimate_crops` call (one vision and one decoder batch). If a group
call fails, its jobs are retried one by one, so a failing request gets its own error and the others their results.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtime.preprocess import CropSpec, crop_persons
from runtime.results import PersonResult

from .payload import KeypointSet, PoseRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Job:
    pixel_values: np.ndarray  # float32 [N, 3, S, S]
    affines: list  # (center, scale) per person
    boxes: list  # the boxes as given, per person
    keypoints: KeypointSet

    @property
    def persons(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class Outcome:
    """What one job gets back: its persons' results, or the error that its own (isolated) call raised."""
    results: list[PersonResult] | None = None
    error: Exception | None = None


def split_request(request: PoseRequest, spec: CropSpec, max_persons: int) -> list[Job]:
    """Crop every person (raises InputError for a bad box) and cut the request into jobs of <= max_persons."""
    pixel_values, crops = crop_persons(request.image, request.boxes, spec)
    jobs = []
    for start in range(0, len(crops), max_persons):
        part = crops[start:start + max_persons]
        jobs.append(Job(pixel_values[start:start + max_persons], [(c.center, c.scale) for c in part],
                        request.boxes[start:start + max_persons], request.keypoints))
    return jobs


def total_persons(jobs: Sequence[Job]) -> int:
    """`serve.batch`'s batch_size_fn: a batch is measured in persons, not requests."""
    return sum(job.persons for job in jobs)


def run_jobs(estimator, jobs: Sequence[Job]) -> list[Outcome]:
    """One estimator call per keypoint set over all its jobs' persons; a failing group is retried job by job."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    groups: dict[KeypointSet, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.keypoints, []).append(i)
    for keypoints, members in groups.items():
        try:
            results = _estimate([jobs[i] for i in members], estimator)
        except Exception as exc:  # noqa: BLE001 - isolate: find which job(s) fail, answer the rest
            if len(members) == 1:
                outcomes[members[0]] = Outcome(error=exc)
                continue
            log.warning("batch of %d jobs failed (%s: %s); retrying one by one", len(members), type(exc).__name__, exc)
            for i in members:
                try:
                    outcomes[i] = Outcome(results=_estimate([jobs[i]], estimator)[0])
                except Exception as single_exc:  # noqa: BLE001
                    outcomes[i] = Outcome(error=single_exc)
            continue
        for i, res in zip(members, results):
            outcomes[i] = Outcome(results=res)
    return outcomes  # type: ignore[return-value]


def _estimate(jobs: list[Job], estimator) -> list[list[PersonResult]]:
    """Concatenate the jobs' persons into one call and cut the results back per job."""
    keypoints = list(jobs[0].keypoints) or None
    pixel_values = np.concatenate([j.pixel_values for j in jobs]) if len(jobs) > 1 else jobs[0].pixel_values
    affines = [a for j in jobs for a in j.affines]
    boxes = [b for j in jobs for b in j.boxes]
    results = estimator.estimate_crops(pixel_values, affines, boxes, keypoints)
    if len(results) != len(boxes):
        raise RuntimeError(f"estimator returned {len(results)} results for {len(boxes)} persons")
    out, start = [], 0
    for job in jobs:
        out.append(results[start:start + job.persons])
        start += job.persons
    return out


class BatchPacer:
    """How long `serve.batch` should collect the next batch. Serve forms a batch as soon as its wait expires, even
    while the previous batch still runs (and then queues it), which left batches of ~2 persons under 8 clients. So
    a batch opened while another runs keeps collecting until that one is expected to finish (persons × a running
    mean of seconds per person); an idle replica waits only the configured minimum."""

    def __init__(self, min_wait_s: float) -> None:
        self.min_wait_s = min_wait_s
        self.s_per_person: float | None = None
        self.busy_until = 0.0
        self._t0 = 0.0

    def wait_s(self) -> float:
        return max(self.min_wait_s, self.busy_until - time.monotonic())

    def started(self, persons: int) -> None:
        self._t0 = time.monotonic()
        self.busy_until = self._t0 + persons * (self.s_per_person or 0.0)

    def finished(self, persons: int) -> None:
        now = time.monotonic()
        per = (now - self._t0) / max(persons, 1)
        self.s_per_person = per if self.s_per_person is None else 0.8 * self.s_per_person + 0.2 * per
        self.busy_until = now
