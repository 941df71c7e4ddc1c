"""Starting the Ray Serve app for a test on a machine that may be slow (other jobs on the same cores).

Seen on a loaded 2-core machine (issue 25): Ray 2.60's raylet waits a fixed ~15 s for its node's dashboard agent (a
Python process) to write its port files, and aborts when the agent imports slower (38 s seen under load); every
actor of the node dies and every test of a module errors in its fixture (`ActorDiedError: The actor died
unexpectedly before finishing this task`). Given ports are not waited for, so the test Ray is a one-node
`ray.cluster_utils.Cluster` with every agent port it accepts given (picked free) and the service connects to it by
address — but the agent's listen-port file is always awaited, so on a machine loaded enough Ray cannot start at all.
Ray's Python side also gives a new raylet a fixed 30 s to register with the GCS (node.py): here that check is
retried for up to NODE_REGISTER_S, and given up at once when the raylet's log shows it aborted. Besides: Ray's own
worker/health timeouts raised, Serve's proxy checks relaxed, `/readyz` awaited, and a start that failed for an
infrastructure reason retried a bounded number of times with back-off (fresh Ray, fresh port; the processes a failed
attempt started are ended); a deterministic failure (the app's own error) is not retried. If every attempt fails
the test fails with each attempt's cause and the machine's load — or skips with that message when every attempt
died of the raylet's agent timer (Ray cannot start on this machine now: not the code under test).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve.config import ServeConfig, free_loopback_port

ATTEMPTS = 3
STARTUP_TIMEOUT_S = 600.0  # per attempt: Ray, Serve, the replicas' bundle load and warm-up
READY_TIMEOUT_S = 120.0  # after Serve reports RUNNING, until the HTTP proxy answers /readyz
HTTP_TIMEOUT_S = 120.0  # any single request of a test (a 2-core machine shared with training runs)
NODE_REGISTER_S = 300.0  # how long a new raylet may take to register with the GCS
BACKOFF_S = 20.0  # before attempt n+1: n x this (the load that broke attempt n may pass)

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


def _raylet_abort() -> str | None:
    """Why this process's newest Ray node died, where its raylet said so: Ray 2.60's raylet waits a fixed ~15 s for
    its dashboard agent's listen-port file (not one of the ports it can be given) and aborts when the agent, a
    Python process, imports slower than that — the machine is too loaded to start Ray at all."""
    sessions = sorted(Path(tempfile.gettempdir(), "ray").glob(f"session_*_{os.getpid()}"),
                      key=lambda p: p.stat().st_mtime)
    for log in (sessions[-1] / "logs").glob("raylet*.out") if sessions else ():
        text = log.read_text(errors="replace")
        if "Timed out waiting for file" in text and "WaitForDashboardAgent" in text:
            return (f"Ray's raylet aborted: its dashboard agent did not report its ports within Ray's fixed ~15 s "
                    f"({log})")
    return None


def _cause(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _child_pids() -> set[int]:
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _end_new_children(before: set[int]) -> None:
    """Processes this test process started since `before` (a node whose start failed is never handed back, so
    its GCS, monitor, dashboard would run on, loading the machine, until pytest exits): terminate, then kill."""
    import psutil
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in new:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(new, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _shutdown(cluster) -> None:
    """Whatever an attempt left: Serve, this driver's connection, then the cluster's processes."""
    import ray
    from ray import serve
    with contextlib.suppress(Exception):  # noqa: BLE001 - best effort on a half-started Ray
        serve.shutdown()
    with contextlib.suppress(Exception):
        ray.shutdown()
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.shutdown()


def patient_node_registration(env: pytest.MonkeyPatch) -> None:
    """Ray's `Node` polls `services.get_node` for 30 s, then aborts the node; make each poll wait longer instead."""
    import ray._private.services as services
    get_node = getattr(services, "get_node", None)
    if get_node is None:  # another Ray: its own start-up rules apply
        return

    def patient(*args, **kwargs):
        deadline = time.monotonic() + NODE_REGISTER_S
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:  # "GCS cannot find the node ...": not registered yet
                aborted = _raylet_abort()  # a raylet that aborted never registers: stop waiting for it
                if aborted or time.monotonic() > deadline:
                    raise RuntimeError(aborted or f"the raylet did not register in {NODE_REGISTER_S:.0f}s") from None
                time.sleep(2.0)

    env.setattr(services, "get_node", patient)


def local_cluster(num_cpus: int):
    """A one-node Ray on this machine whose raylet is given every agent port, so it never waits for them."""
    from ray.cluster_utils import Cluster
    ports = {name: free_loopback_port() for name in ("metrics_agent_port", "metrics_export_port",
                                                      "dashboard_agent_listen_port", "runtime_env_agent_port")}
    return Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 * 2**20,
        _system_config=RAY_SYSTEM_CONFIG, **ports))


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
    url = cluster = None
    for attempt in range(1, attempts + 1):
        t0 = time.monotonic()
        before = _child_pids()
        try:
            with pytest.MonkeyPatch.context() as env:  # Ray's processes inherit it when they start
                for k, v in SERVE_ENV.items():
                    env.setenv(k, v)
                patient_node_registration(env)
                cluster = local_cluster(num_cpus)
                url = start(dataclasses.replace(config, address=cluster.address), {"log_to_driver": False},
                            say=print, startup_timeout_s=STARTUP_TIMEOUT_S)
            wait_ready(url)
            break
        except Exception as exc:  # noqa: BLE001 - classified below; the cause goes into the failure message
            aborted = _raylet_abort()
            causes.append(f"attempt {attempt} ({time.monotonic() - t0:.0f}s): {_cause(exc)}"
                          + (f" <- {aborted}" if aborted else ""))
            print(f"service start failed: {causes[-1]}")
            _shutdown(cluster)
            _end_new_children(before)
            cluster = None
            if not _retryable(exc):
                pytest.fail(f"the serve app failed to start (not retried: the app's own error): {causes[-1]}")
            config = dataclasses.replace(config, port=free_loopback_port())  # the old port may be held
            if attempt < attempts:
                time.sleep(BACKOFF_S * attempt)
    else:
        message = (f"Ray Serve did not come up in {attempts} attempts on this machine (load average "
                   f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): " + "; ".join(causes))
        if all("raylet aborted" in c for c in causes):  # Ray itself cannot start here: not this code's failure
            pytest.skip(message)
        pytest.fail(message)
    try:
        yield url
    finally:
        try:
            stop(shutdown_ray=False)  # the app only: the cluster is this helper's to end
        except Exception as exc:  # noqa: BLE001 - a teardown error must not hide the tests' own results
            print(f"service stop failed ({_cause(exc)})")
        _shutdown(cluster)
