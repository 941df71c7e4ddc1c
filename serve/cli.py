"""`posellm-edge serve BUNDLE`: run the pose service on Ray Serve (a local Ray, or an existing cluster via --address).

Runs in the foreground; Ctrl-C / SIGTERM deletes the application gracefully (in-flight requests finish, up to
--graceful-shutdown-s) and stops the local Ray it started.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import ray
import ray.exceptions
from ray import serve

from runtime.backends import BACKENDS
from runtime.errors import InputError
from runtime.estimator import DECODINGS

from .config import APP_NAME, ServeConfig, parse_autoscale
from .payload import RequestLimits
from .layout import Layout, choose_layout, cluster_nodes, variant_bytes

log = logging.getLogger("posellm.serve")
# what a refused `ray.init` raises: ConnectionError wrapping the refusal, or Ray's AuthenticationError (no token)
_CONNECT_ERRORS = (ConnectionError, RuntimeError, getattr(ray.exceptions, "AuthenticationError", ConnectionError))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", default="fp32", help="bundle variant: fp32, fp16 or int8")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--decoding", choices=DECODINGS, default="template")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads per replica (0: onnxruntime's default; default: chosen with "
                        "--replicas from the cores Ray sees)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None,
                       help="fixed number of replicas (default: one per CPU core with 1 thread each as memory "
                            "allows; one per GPU on a GPU backend)")
    scale.add_argument("--autoscale", type=parse_autoscale, metavar="MIN,MAX", help="autoscale between MIN and MAX")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 to accept remote clients)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-persons-per-batch", type=int, default=None,
                   help="persons per vision/decoder batch across requests (default: the bundle's exported max)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests after its first")
    p.add_argument("--address", default=None,
                   help="existing Ray cluster (HOST:6379, or 'auto' on one of its nodes); default: start Ray here")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Ray's Prometheus metrics port when Ray starts here (a cluster sets its own at `ray start`)")
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="Ray CPUs reserved per replica (default: its threads; 1 on a GPU backend)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="1 = one replica per GPU (default: 1 on a GPU backend, else 0)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="larger request bodies get 413 unread")
    lim = RequestLimits()
    p.add_argument("--max-boxes", type=int, default=lim.max_boxes, help="person boxes per request")
    p.add_argument("--max-keypoints", type=int, default=lim.max_keypoints, help="custom keypoints per request")
    p.add_argument("--max-keypoint-chars", type=int, default=lim.max_keypoint_chars,
                   help="characters of one custom keypoint's name + description (they become prompt tokens)")
    p.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels,
                   help="width x height of a request's image, checked before it is decoded")
    p.add_argument("--max-json-depth", type=int, default=lim.max_json_depth,
                   help="nesting of arrays/objects in a JSON body or field")
    p.add_argument("--max-json-values", type=int, default=lim.max_json_values,
                   help="arrays, objects and items in a JSON body or field (the image string is one)")
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--graceful-shutdown-s", type=float, default=30.0)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(bundle=args.bundle, precision=args.precision, backend=args.backend, decoding=args.decoding,
                       threads=args.threads, replicas=args.replicas, autoscale=args.autoscale, host=args.host,
                       port=args.port, max_persons_per_batch=args.max_persons_per_batch,
                       batch_wait_ms=args.batch_wait_ms, address=args.address, metrics_port=args.metrics_port,
                       cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                       max_body_mb=args.max_body_mb, limits=limits_from_args(args),
                       request_timeout_s=args.request_timeout_s,
                       graceful_shutdown_timeout_s=args.graceful_shutdown_s)


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_boxes=args.max_boxes, max_keypoints=args.max_keypoints,
                         max_keypoint_chars=args.max_keypoint_chars, max_image_pixels=args.max_image_pixels,
                         max_json_depth=args.max_json_depth, max_json_values=args.max_json_values)


def start(config: ServeConfig, ray_init_kwargs: dict | None = None, say: Callable[[str], None] = log.info,
          startup_timeout_s: float = 300.0) -> str:
    """Connect to (or start) Ray, lay out the replicas (flags, else the nodes Ray sees), start Serve's HTTP proxy
    and deploy the app; returns the base URL once every replica is ready."""
    from .app import build_app, http_options

    bundle = config.bundle.resolve()  # replicas may run in another working directory
    config = dataclasses.replace(config, bundle=bundle)
    if not ray.is_initialized():
        kwargs = dict(ray_init_kwargs or {})
        if config.address is None and config.metrics_port is not None:
            kwargs["_metrics_export_port"] = config.metrics_port
        try:
            # "local": always a fresh Ray here, never one that `ray start` left on this machine
            ray.init(address=config.address or "local", **kwargs)
        except _CONNECT_ERRORS as exc:
            raise InputError(connect_error(config.address, exc)) from exc
    layout = choose_layout(config, cluster_nodes(), variant_bytes(bundle, config.precision, config.backend))
    config = resolved(config, layout)
    say(f"layout: {layout.describe()}")
    serve.start(http_options=http_options(config))
    serve.run(build_app(config, layout), name=APP_NAME, route_prefix="/", blocking=False)
    _wait_running(timeout_s=startup_timeout_s)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


def resolved(config: ServeConfig, layout: Layout) -> ServeConfig:
    """`config` with the layout's values, as the replicas read them (threads for their Estimator)."""
    return dataclasses.replace(config, replicas=layout.replicas, threads=layout.threads,
                               cpus_per_replica=layout.cpus_per_replica, gpus_per_replica=layout.gpus_per_replica)


def connect_error(address: str | None, exc: BaseException) -> str:
    """One line for a failed `ray.init`; where the cluster refused this client's token, what to set."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:  # Ray wraps the gRPC refusal: ConnectionError <- RuntimeError
        seen.add(id(exc))
        chain.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}")  # one line
        exc = exc.__cause__ or exc.__context__
    text = " ".join(chain)
    where = f"--address {address}" if address else "local Ray"
    if any(k in text for k in ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")):
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        token = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
                 "RAY_AUTH_TOKEN_PATH" if os.environ.get("RAY_AUTH_TOKEN_PATH") else "~/.ray/auth_token")
        if "no authentication token was found" in text:
            return (f"{where}: RAY_AUTH_MODE=token but no token was found: set RAY_AUTH_TOKEN to the cluster's "
                    "token (or RAY_AUTH_TOKEN_PATH=FILE, default ~/.ray/auth_token; `ray get-auth-token` on the head "
                    "prints it)")
        if mode.lower() != "token":
            return (f"{where}: the cluster uses Ray token authentication and this client does not (RAY_AUTH_MODE is "
                    f"{mode}): set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN=..., or "
                    "RAY_AUTH_TOKEN_PATH=FILE, default ~/.ray/auth_token; `ray get-auth-token` on the head prints "
                    "it)")
        return (f"{where}: the cluster refused this client's token (RAY_AUTH_MODE=token, token from {token}): set "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the token the cluster was started with (`ray "
                "get-auth-token` on the head prints it)")
    first = chain[0][:300] if chain else "unknown error"
    return f"{where}: cannot connect to the Ray cluster: {first}"


def stop(shutdown_ray: bool) -> None:
    """Delete the app (replicas drain their in-flight requests), then Serve and the local Ray."""
    serve.delete(APP_NAME, _blocking=True)
    if shutdown_ray:
        serve.shutdown()
        ray.shutdown()


def _wait_running(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        state = str(app.status) if app else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            raise RuntimeError(f"application {APP_NAME} {state}: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"application {APP_NAME} not running after {timeout_s:.0f}s")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    url = start(config, say=lambda line: print(line, flush=True))
    print(f"serving {config.bundle} ({config.precision}, {config.decoding}) at {url}/v1/pose  "
          f"(probes {url}/healthz {url}/readyz; Ctrl-C stops)", flush=True)
    stop_event = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_event.set())
    while not stop_event.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    print("stopping: in-flight requests finish first", flush=True)
    stop(shutdown_ray=config.address is None)
    return 0
