"""The pose service's request handling, free of Ray: parse and bound a request, cut it into jobs, answer.

`PoseService` holds one `Estimator` and answers the routes of `routes.build_api`. On Ray Serve (app.py) a subclass
sends each job through `@serve.batch`, so persons of concurrent requests share a batch; built directly (tests, the
API fuzzers) every job runs on its own. The handlers are the same code either way.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from runtime.errors import InputError
from runtime.estimator import Estimator, EstimatorConfig

from . import payload
from .batching import BatchPacer, Job, Outcome, run_jobs, split_request, total_persons
from .config import ServeConfig

log = logging.getLogger("posellm.serve")


class RequestError(Exception):
    """A client error with its HTTP status (400 bad value, 413 too large, 415 wrong content type)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    """Every error answer: one `{"error": ...}` message on one line."""
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


async def _form(request: Request, body: bytes) -> "tuple[bytes, object, object]":
    """Parse the already-read multipart body (replayed to Starlette's parser) into image bytes, boxes, keypoints."""
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form()
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for a malformed body
        detail = getattr(exc, "detail", None) or exc
        raise InputError(f"malformed multipart body: {type(exc).__name__}: {detail}") from None
    try:
        image = form.get("image")
        if image is None or isinstance(image, str):
            raise InputError("multipart field image: expected a file upload of the encoded image")
        if form.get("boxes") is None:
            raise InputError("multipart field boxes is missing; expected JSON [[x, y, w, h], ...]")
        return await image.read(), form.get("boxes"), form.get("keypoints")
    finally:
        await form.close()


class PoseService:
    def __init__(self, config: ServeConfig, estimator: Estimator | None = None) -> None:
        self.config = config
        self.layout = None  # the deployment's serve.layout.Layout, set on a Ray replica
        self.node_id: str | None = None  # the Ray node of that replica
        self.ready = False
        self.estimator = estimator or Estimator(
            config.bundle, EstimatorConfig(precision=config.precision, backend=config.backend,
                                           decoding=config.decoding, threads=config.threads))
        exported = self.estimator.manifest.max_persons
        self.max_persons = config.max_persons_per_batch or exported
        if self.max_persons > exported:
            raise InputError(f"max_persons_per_batch={self.max_persons} exceeds the bundle's exported max persons "
                             f"{exported}; re-export with --max-persons {self.max_persons} or lower it")
        self.pacer = BatchPacer(config.batch_wait_ms / 1000.0)
        self.stats = {"requests": 0, "batches": 0, "persons": 0, "max_batch_persons": 0, "failed_jobs": 0,
                      "in_flight_at_batch_start": 0}
        self.in_flight = 0  # requests inside `pose` now (parsing, queued for a batch, or in one)
        self._warm_up()
        self.ready = True

    def _warm_up(self) -> None:
        """One full-size batch so the first client does not pay for session/arena start-up."""
        size = 2 * self.estimator.crop_spec.crop_size
        image = np.full((size, size, 3), 127, np.uint8)
        t0 = time.perf_counter()
        self.estimator.estimate(image, [[8.0 + i, 8.0, size / 2, size - 16.0] for i in range(self.max_persons)])
        log.info("warmed up with %d persons in %.2fs", self.max_persons, time.perf_counter() - t0)

    def check_health(self) -> None:  # Ray Serve's replica health check
        if not self.ready:
            raise RuntimeError("bundle not loaded yet")

    # -- probes ---------------------------------------------------------------------------------------------------
    def healthz(self) -> dict:
        return {"status": "alive"}

    def readyz(self):
        if not self.ready:
            return JSONResponse({"ready": False}, status_code=503)
        m = self.estimator.manifest
        return {"ready": True, "bundle": str(self.config.bundle), "precision": self.config.precision,
                "backend": self.config.backend, "decoding": self.config.decoding,
                "max_persons_per_batch": self.max_persons, "keypoints": [k.name for k in m.prompts.keypoints]}

    def stats_snapshot(self) -> dict:
        batches = max(self.stats["batches"], 1)
        return {**self.stats, "mean_batch_persons": self.stats["persons"] / batches,
                "mean_in_flight_at_batch_start": self.stats["in_flight_at_batch_start"] / batches,
                "pid": os.getpid(), "node_id": self.node_id,
                "layout": self.layout.to_json() if self.layout else None}

    # -- pose -----------------------------------------------------------------------------------------------------
    async def pose(self, request: Request, tokens: bool = False):
        self.in_flight += 1
        try:
            return await self._pose(request, tokens)
        finally:
            self.in_flight -= 1

    async def _pose(self, request: Request, tokens: bool):
        try:
            req = await self._parse(request)
            jobs = await asyncio.to_thread(self._jobs, req)
        except RequestError as exc:
            return error(exc.status, str(exc))
        except InputError as exc:
            return error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug, but still one JSON message and the replica lives on
            log.exception("cannot prepare a pose request")
            return error(500, f"cannot prepare the request: {type(exc).__name__}: {exc}")
        self.stats["requests"] += 1
        outcomes: list[Outcome] = await asyncio.gather(*(self.submit(job) for job in jobs))
        failed = next((o.error for o in outcomes if o.error is not None), None)
        if isinstance(failed, InputError):
            return error(400, str(failed))
        if failed is not None:
            log.error("pose request failed: %s: %s", type(failed).__name__, failed)
            return error(500, f"inference failed: {type(failed).__name__}: {failed}")
        persons = []
        for outcome in outcomes:
            for r in outcome.results:
                entry = r.to_json()  # the same per-person entry as `posellm-edge run --json`
                if tokens:
                    entry["tokens"] = [list(t) for t in r.tokens]
                persons.append(entry)
        return {"precision": self.config.precision, "decoding": self.config.decoding, "persons": persons}

    def _jobs(self, req: payload.PoseRequest) -> list[Job]:
        if req.keypoints:  # too many / too long for this bundle's graphs: one line naming the keypoint, not a 500
            self.estimator.queries(list(req.keypoints))
        return split_request(req, self.estimator.crop_spec, self.max_persons)

    async def submit(self, job: Job) -> Outcome:
        """One job → its outcome. Here: a batch of its own; the Ray deployment batches jobs across requests."""
        return (await self.run_batch([job]))[0]

    async def run_batch(self, jobs: list[Job]) -> list[Outcome]:
        """Persons of concurrent requests → one vision + decoder batch per keypoint set (see batching.py)."""
        self.stats["in_flight_at_batch_start"] += self.in_flight
        n = total_persons(jobs)
        self.pacer.started(n)
        try:
            outcomes = await asyncio.to_thread(run_jobs, self.estimator, jobs)
        finally:
            self.pacer.finished(n)
        self.stats["batches"] += 1
        self.stats["persons"] += n
        self.stats["max_batch_persons"] = max(self.stats["max_batch_persons"], n)
        self.stats["failed_jobs"] += sum(o.error is not None for o in outcomes)
        return outcomes

    async def _parse(self, request: Request) -> payload.PoseRequest:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {int(declared)} bytes; at most {limit} are accepted "
                                    f"(--max-body-mb {self.config.max_body_mb:g})")
        body = bytearray()
        async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"request body exceeds {limit} bytes (--max-body-mb "
                                        f"{self.config.max_body_mb:g})")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limits = self.config.limits
        if kind == "application/json":
            return await asyncio.to_thread(payload.from_json, bytes(body), limits)
        if kind == "multipart/form-data":
            fields = await _form(request, bytes(body))
            return await asyncio.to_thread(payload.from_fields, *fields, limits)
        raise RequestError(415, f"content-type {kind or '(none)'!r}: expected application/json or "
                                "multipart/form-data")
