"""`ServeConfig`: everything `posellm-edge serve` needs to load the bundle and lay out the Ray Serve deployment."""
from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InputError
from runtime.estimator import DECODINGS

from .payload import RequestLimits

APP_NAME = "posellm"
# Ray binds its workers to 10002-19999 and its other processes to ephemeral ports (from 32768 by default) while it
# starts, after a port for Serve was picked: a pick from either range can be taken before Serve's proxy binds it
# (seen: "Failed to bind to address '127.0.0.1:33347'"). Between the two, nothing of Ray's lands.
_QUIET_PORTS = (20000, 32767)


def free_loopback_port(attempts: int = 200) -> int:
    """A loopback TCP port free now and outside the ranges Ray's own processes take while it starts."""
    lo, hi = _QUIET_PORTS
    try:  # the kernel's ephemeral range, where it differs from Linux's default
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            hi = min(hi, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    for port in random.sample(range(lo, hi + 1), min(attempts, hi + 1 - lo)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port in {lo}-{hi} after {attempts} tries")


@dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    precision: str = "fp32"
    backend: str = "onnxruntime"
    decoding: str = "template"
    # None: chosen from the nodes Ray sees (serve/layout.py); threads 0: onnxruntime's default
    threads: int | None = None  # onnxruntime intra-op threads per replica
    replicas: int | None = None
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    host: str = "127.0.0.1"
    port: int = 8000
    max_persons_per_batch: int | None = None  # default: the bundle's exported max persons
    batch_wait_ms: float = 10.0  # how long a batch waits for more persons after its first request
    address: str | None = None  # existing Ray cluster ("HOST:6379" or "auto"); None: a fresh Ray in this process
    metrics_port: int | None = None  # Ray's Prometheus endpoint on a Ray started here (else Ray picks a port)
    cpus_per_replica: float | None = None  # None: the replica's threads (CPU), 1 (GPU)
    gpus_per_replica: float | None = None  # None: 1 on a GPU backend, else 0
    max_body_mb: float = 20.0  # larger bodies get 413 before they are read
    limits: RequestLimits = RequestLimits()  # what one request may hold: boxes, keypoints, JSON shape, pixels
    max_ongoing_requests: int = 64  # per replica; must exceed the batch so concurrent requests can meet
    max_queued_requests: int = 256  # per caller; beyond that Serve answers 503 at once instead of queueing
    request_timeout_s: float = 60.0  # the HTTP proxy gives up (408 / 504) after this
    graceful_shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish on shutdown

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise InputError(f"decoding={self.decoding!r}: expected one of {list(DECODINGS)}")
        if self.replicas is not None and self.replicas < 1:
            raise InputError(f"replicas={self.replicas}: expected >= 1 (or None: one per CPU core / GPU)")
        if self.threads is not None and self.threads < 0:
            raise InputError(f"threads={self.threads}: expected >= 1, 0 for onnxruntime's default, or None: chosen "
                             "from the cores")
        for name in ("cpus_per_replica", "gpus_per_replica"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InputError(f"{name}={getattr(self, name)}: expected >= 0")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise InputError(f"autoscale={self.autoscale}: expected MIN,MAX with 0 <= MIN <= MAX and MAX >= 1")
        if self.max_persons_per_batch is not None and self.max_persons_per_batch < 1:
            raise InputError(f"max_persons_per_batch={self.max_persons_per_batch}: expected >= 1")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise InputError(f"batch_wait_ms={self.batch_wait_ms}: expected 0..10000")
        if not 1 <= self.port <= 65535:
            raise InputError(f"port={self.port}: expected 1..65535")
        if not self.max_body_mb > 0:
            raise InputError(f"max_body_mb={self.max_body_mb}: expected > 0")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--autoscale {text!r}: expected MIN,MAX (two integers)") from None
    return lo, hi
