"""Starting the Ray Serve app for a test on a machine that may be slow (other jobs on the same cores).

Under load, Ray's start-up can lose a process — a worker that registers late, a Serve controller or proxy that
misses a health check — and every test of a module then errors in its fixture (`ActorDiedError: The actor died
unexpectedly before finishing this task`). So a service start here has generous Ray/Serve timeouts, waits until
`/readyz` answers, and retries a start that failed for such an infrastructure reason a bounded number of times
(fresh Ray, fresh port); a deterministic failure (the app's own error) is not retried. If every attempt fails, the
test fails with each attempt's cause and the machine's load, never a bare Ray traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from serve.config import ServeConfig, free_loopback_port

ATTEMPTS = 3
STARTUP_TIMEOUT_S = 600.0  # per attempt: Ray, Serve, the replicas' bundle load and warm-up
READY_TIMEOUT_S = 120.0  # after Serve reports RUNNING, until the HTTP proxy answers /readyz
HTTP_TIMEOUT_S = 120.0  # any single request of a test (a 2-core machine shared with training runs)

# Ray's own start-up timeouts, raised: a worker process may take a minute to import on a loaded machine
RAY_SYSTEM_CONFIG = {"worker_register_timeout_seconds": 300, "health_check_timeout_ms": 60_000,
                     "health_check_failure_threshold": 20}
# Serve's proxy checks (read from the environment by the controller, which inherits it from the Ray started here)
SERVE_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def _retryable(exc: BaseException) -> bool:
    """Infrastructure failures (a Ray process lost, a timeout, a port) rather than the app's own error."""
    import ray.exceptions
    if isinstance(exc, (ray.exceptions.RayError, TimeoutError, ConnectionError, OSError, httpx.HTTPError)):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("died", "unexpectedly", "timed out", "timeout", "unavailable"))


def _cause(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _shutdown() -> None:
    """Whatever a failed attempt left: Serve, then the Ray this process started."""
    import ray
    from ray import serve
    with contextlib.suppress(Exception):  # noqa: BLE001 - best effort on a half-started Ray
        serve.shutdown()
    with contextlib.suppress(Exception):
        ray.shutdown()


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until `/readyz` answers 200 (Serve may report RUNNING before its proxy routes)."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=min(30.0, timeout_s))
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = _cause(exc)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f}s (last: {last})")


@contextlib.contextmanager
def running_service(config: ServeConfig, num_cpus: int = 2, attempts: int = ATTEMPTS) -> Iterator[str]:
    """Start the app on a fresh local Ray (bounded retries, see the module docstring), yield its URL, stop it."""
    from serve.cli import start, stop
    causes: list[str] = []
    url = None
    for attempt in range(1, attempts + 1):
        t0 = time.monotonic()
        try:
            with pytest.MonkeyPatch.context() as env:
                for k, v in SERVE_ENV.items():
                    env.setenv(k, v)
                url = start(config, {"num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False,
                                     "_system_config": RAY_SYSTEM_CONFIG},
                            say=print, startup_timeout_s=STARTUP_TIMEOUT_S)
            wait_ready(url)
            break
        except Exception as exc:  # noqa: BLE001 - classified below; the cause goes into the failure message
            causes.append(f"attempt {attempt} ({time.monotonic() - t0:.0f}s): {_cause(exc)}")
            print(f"service start failed: {causes[-1]}")
            _shutdown()
            if not _retryable(exc):
                pytest.fail(f"the serve app failed to start (not retried: the app's own error): {causes[-1]}")
            config = dataclasses.replace(config, port=free_loopback_port())  # the old port may be held
    else:
        pytest.fail(f"Ray Serve did not come up in {attempts} attempts on this machine (load average "
                    f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): " + "; ".join(causes))
    try:
        yield url
    finally:
        try:
            stop(shutdown_ray=True)
        except Exception as exc:  # noqa: BLE001 - a teardown error must not hide the tests' own results
            print(f"service stop failed ({_cause(exc)}); shutting Ray down")
            _shutdown()
