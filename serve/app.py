"""The Ray Serve application: a FastAPI ingress over one `Estimator` per replica, persons batched across requests.

    POST /v1/pose   JSON {"image": base64, "boxes": [[x, y, w, h], ...], "keypoints": [...]} or multipart
                    (file `image`, form `boxes` / `keypoints` as JSON) → {"precision", "decoding", "persons": [...]},
                    each person exactly `run --json`'s entry; `?tokens=true` adds the generated token ids
    GET  /healthz   the replica is alive
    GET  /readyz    the bundle is loaded and warmed up (503 until then)
    GET  /v1/stats  this replica's batching counters (requests, batches, persons per batch) and the service's layout

Bad input → 4xx with `{"error": "<one message>"}`; the failure of one request never fails the others of its batch.
"""

import asyncio
import logging
import os
import time

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from runtime.errors import InputError
from runtime.estimator import Estimator, EstimatorConfig

from . import payload
from .batching import BatchPacer, Job, Outcome, run_jobs, split_request, total_persons
from .config import ServeConfig
from .layout import Layout

log = logging.getLogger("posellm.serve")
api = FastAPI(title="posellm-edge", description="language-guided pose estimation on person boxes")


class RequestError(Exception):
    """A client error with its HTTP status (400 bad value, 413 too large, 415 wrong content type)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _form(request: Request, body: bytes) -> "tuple[bytes, str | None, str | None]":
    """Parse the already-read multipart body (replayed to Starlette's parser) into image bytes, boxes, keypoints."""
    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form()
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types for a malformed body
        raise InputError(f"malformed multipart body: {type(exc).__name__}: {exc}") from None
    try:
        image = form.get("image")
        if image is None or isinstance(image, str):
            raise InputError("multipart field image: expected a file upload of the encoded image")
        if form.get("boxes") is None:
            raise InputError("multipart field boxes is missing; expected JSON [[x, y, w, h], ...]")
        return await image.read(), form.get("boxes"), form.get("keypoints")
    finally:
        await form.close()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# Helpers live above the deployment: Serve pickles the class when it is decorated, with the globals defined so far.
@serve.deployment(name="PoseService")
@serve.ingress(api)
class PoseService:
    def __init__(self, config: ServeConfig, layout: Layout | None = None) -> None:
        self.config = config
        self.layout = layout  # replicas / threads / resources as `serve` resolved them (flags or the machine)
        self.node_id = ray.get_runtime_context().get_node_id()  # where Ray placed this replica
        self.ready = False
        self.estimator = Estimator(config.bundle, EstimatorConfig(precision=config.precision, backend=config.backend,
                                                                  decoding=config.decoding, threads=config.threads))
        exported = self.estimator.manifest.max_persons
        self.max_persons = config.max_persons_per_batch or exported
        if self.max_persons > exported:
            raise InputError(f"max_persons_per_batch={self.max_persons} exceeds the bundle's exported max persons "
                             f"{exported}; re-export with --max-persons {self.max_persons} or lower it")
        self._batch.set_max_batch_size(self.max_persons)
        self.pacer = BatchPacer(config.batch_wait_ms / 1000.0)
        self._batch.set_batch_wait_timeout_s(self.pacer.min_wait_s)
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
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "alive"}

    @api.get("/readyz")
    def readyz(self):
        if not self.ready:
            return JSONResponse({"ready": False}, status_code=503)
        m = self.estimator.manifest
        return {"ready": True, "bundle": str(self.config.bundle), "precision": self.config.precision,
                "backend": self.config.backend, "decoding": self.config.decoding,
                "max_persons_per_batch": self.max_persons, "keypoints": [k.name for k in m.prompts.keypoints]}

    @api.get("/v1/stats")
    def stats_endpoint(self) -> dict:
        batches = max(self.stats["batches"], 1)
        return {**self.stats, "mean_batch_persons": self.stats["persons"] / batches,
                "mean_in_flight_at_batch_start": self.stats["in_flight_at_batch_start"] / batches,
                "pid": os.getpid(), "node_id": self.node_id,
                "layout": self.layout.to_json() if self.layout else None}

    # -- pose -----------------------------------------------------------------------------------------------------
    @api.post("/v1/pose")
    async def pose(self, request: Request, tokens: bool = False):
        self.in_flight += 1
        try:
            return await self._pose(request, tokens)
        finally:
            self.in_flight -= 1

    async def _pose(self, request: Request, tokens: bool):
        try:
            req = await self._parse(request)
            jobs = await asyncio.to_thread(split_request, req, self.estimator.crop_spec, self.max_persons)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug, but still one JSON message and the replica lives on
            log.exception("cannot prepare a pose request")
            return _error(500, f"cannot prepare the request: {type(exc).__name__}: {exc}")
        self.stats["requests"] += 1
        # read by serve.batch when this job opens the next batch: collect until the running batch should be done
        self._batch.set_batch_wait_timeout_s(self.pacer.wait_s())
        outcomes: list[Outcome] = await asyncio.gather(*(self._batch(job) for job in jobs))
        failed = next((o.error for o in outcomes if o.error is not None), None)
        if isinstance(failed, InputError):
            return _error(400, str(failed))
        if failed is not None:
            log.error("pose request failed: %s: %s", type(failed).__name__, failed)
            return _error(500, f"inference failed: {type(failed).__name__}: {failed}")
        persons = []
        for outcome in outcomes:
            for r in outcome.results:
                entry = r.to_json()  # the same per-person entry as `posellm-edge run --json`
                if tokens:
                    entry["tokens"] = [list(t) for t in r.tokens]
                persons.append(entry)
        return {"precision": self.config.precision, "decoding": self.config.decoding, "persons": persons}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=total_persons)
    async def _batch(self, jobs: list[Job]) -> list[Outcome]:
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
        if kind == "application/json":
            return await asyncio.to_thread(payload.from_json, bytes(body), self.config.max_boxes)
        if kind == "multipart/form-data":
            fields = await _form(request, bytes(body))
            return await asyncio.to_thread(payload.from_fields, *fields, self.config.max_boxes)
        raise RequestError(415, f"content-type {kind or '(none)'!r}: expected application/json or "
                                "multipart/form-data")


def build_app(config: ServeConfig, layout: Layout):
    """The bound application with `layout` (serve.layout.choose_layout: replicas or autoscaling, threads,
    resources); `config` carries the same resolved values to the replicas."""
    options = dict(
        ray_actor_options={"num_cpus": layout.cpus_per_replica, "num_gpus": layout.gpus_per_replica},
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
    )
    if config.autoscale is not None:
        lo, hi = config.autoscale
        # a replica is busy when it holds about one full batch of requests
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": config.max_persons_per_batch or 4}
    else:
        options["num_replicas"] = layout.replicas
    return PoseService.options(**options).bind(config, layout)


def http_options(config: ServeConfig) -> dict:
    return {"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s}
