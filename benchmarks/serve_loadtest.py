"""The `posellm-edge serve` measurements, all in one run on loopback (benchmarks/results/serve-loadtest.json):

1. parity: every image's response (sent 8 at a time, so persons of different requests share batches) against
   `Estimator.estimate` on the same image and boxes in this process — tokens identical, keypoint max |diff|;
2. throughput: 1 sequential client vs 8 concurrent clients, alternated `--rounds` times side by side (the CPU is
   shared, so only the ratio measured in one run counts) — persons/s, p50/p90/p99, errors, persons per batch;
3. replica kill: SIGKILL the replica under 8-client load; time until a probe request is answered again, and the
   longest any client waited (each has a timeout);
4. graceful shutdown: 8 requests in flight when the app is deleted — how many are answered.

    python -m benchmarks.serve_loadtest --bundle out/bundle --coco out/val/person_keypoints.json \
        --images out/val/images --out benchmarks/results/serve-loadtest.json

Without --replicas/--threads the service lays itself out as `posellm-edge serve` does with no flags (serve/layout.py);
the layout it chose is in the report (`layout`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from runtime.estimator import Estimator, EstimatorConfig
from runtime.image_io import load_image
from runtime.results import write_json
from serve.cli import start, stop
from serve.config import ServeConfig, free_loopback_port
from serve.loadtest import LoadRequest, read_requests, run_load


def post(url: str, req: LoadRequest, timeout: float = 60.0, tokens: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/v1/pose" + ("?tokens=true" if tokens else ""), json=req.body(), timeout=timeout)


def parity(url: str, bundle: Path, requests: list[LoadRequest], images: Path) -> dict:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda r: post(url, r, tokens=True), requests))
    est = Estimator(bundle, EstimatorConfig(precision="fp32"))
    persons = token_mismatch = 0
    max_diff = 0.0
    for req, resp in zip(requests, responses):
        resp.raise_for_status()
        local = est.estimate(load_image(images / req.name), req.boxes)
        for got, want in zip(resp.json()["persons"], local):
            persons += 1
            token_mismatch += [tuple(t) for t in got["tokens"]] != list(want.tokens)
            max_diff = max(max_diff, float(np.abs(np.array(got["keypoints"]) - want.keypoints).max()))
    return {"images": len(requests), "persons": persons, "persons_with_different_tokens": token_mismatch,
            "keypoints_max_abs_diff_px": max_diff}


def estimator_scaling(bundle: Path, requests: list[LoadRequest], images: Path, seconds: float, rounds: int,
                      threads) -> dict:
    """In-process persons/s at 1 person per call vs the bundle's max per call, alternated `rounds` times: the most
    that batching can give on this machine."""
    est = Estimator(bundle, EstimatorConfig(precision="fp32", threads=threads))
    req = max(requests, key=lambda r: len(r.boxes))
    image, box = load_image(images / req.name), req.boxes[0]
    sizes = (1, est.manifest.max_persons)
    done, spent = dict.fromkeys(sizes, 0), dict.fromkeys(sizes, 0.0)
    for _ in range(rounds):
        for n in sizes:
            est.estimate(image, [box] * n)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                est.estimate(image, [box] * n)
                done[n] += n
            spent[n] += time.perf_counter() - t0
    rate = {n: done[n] / spent[n] for n in sizes}
    return {**{f"batch_{n}_persons_per_s": round(rate[n], 3) for n in sizes},
            "ratio": round(rate[sizes[1]] / rate[sizes[0]], 3), "rounds": rounds, "seconds_each": seconds}


def stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", timeout=10).json()


def throughput(url: str, requests: list[LoadRequest], seconds: float, rounds: int, clients: int,
               replicas: int) -> dict:
    runs: dict[str, list] = {"sequential": [], "concurrent": []}
    for _ in range(rounds):
        for name, n in (("sequential", 1), ("concurrent", clients)):
            before = stats(url)
            report = run_load(url, requests, n, seconds, timeout_s=30.0)
            after = stats(url)
            batches = after["batches"] - before["batches"]
            # /v1/stats is per replica: with several, two calls may reach different ones
            report["mean_persons_per_batch"] = (round((after["persons"] - before["persons"]) / max(batches, 1), 2)
                                                if replicas == 1 else None)
            runs[name].append(report)
    total = {k: sum(r["persons"] for r in v) / sum(r["wall_s"] for r in v) for k, v in runs.items()}
    return {"runs": runs, "persons_per_s": {k: round(v, 3) for k, v in total.items()},
            "ratio_concurrent_vs_sequential": round(total["concurrent"] / total["sequential"], 3),
            "errors": sum(r["errors"] for v in runs.values() for r in v)}


def replica_kill(url: str, requests: list[LoadRequest], clients: int, seconds: float, timeout_s: float) -> dict:
    """SIGKILL a replica 5 s into an 8-client run; a prober measures when requests are answered again."""
    pid = stats(url)["pid"]
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(run_load(url, requests, clients, seconds,
                                                                  timeout_s=timeout_s)))
    load.start()
    time.sleep(5.0)
    killed_at = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    recovered_at, probes, probe_errors = None, 0, {}
    while time.perf_counter() - killed_at < 120:
        probes += 1
        try:
            if post(url, requests[0], timeout=5.0).status_code == 200:
                recovered_at = time.perf_counter()
                break
            kind = "HTTP"
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
        probe_errors[kind] = probe_errors.get(kind, 0) + 1
        time.sleep(0.25)
    load.join()
    new_pid = stats(url)["pid"]
    return {"killed_pid": pid, "pid_after": new_pid, "recovered_s": None if recovered_at is None else
            round(recovered_at - killed_at, 2), "probe_errors": probe_errors, "client_timeout_s": timeout_s,
            "load": result, "longest_client_wait_ms": result.get("latency_ms", {}).get("max"),
            "no_client_past_timeout": result["wall_s"] <= seconds + timeout_s + 1}


def graceful_shutdown(url: str, requests: list[LoadRequest], n: int = 8) -> dict:
    from ray import serve

    from serve.config import APP_NAME
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(post, url, requests[i % len(requests)], 60.0) for i in range(n)]
        time.sleep(0.3)  # the requests are in the replica's batch queue
        t0 = time.perf_counter()
        serve.delete(APP_NAME, _blocking=True)
        deleted_s = time.perf_counter() - t0
        codes = []
        for f in futures:
            try:
                codes.append(f.result().status_code)
            except httpx.HTTPError as exc:
                codes.append(type(exc).__name__)
    return {"in_flight": n, "answered_200": sum(c == 200 for c in codes), "codes": codes,
            "delete_took_s": round(deleted_s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--coco", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=20.0, help="per throughput run")
    p.add_argument("--rounds", type=int, default=3, help="sequential/concurrent pairs, alternated")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--replicas", type=int, default=None, help="default: chosen from the machine, as `serve` does")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads per replica (default: chosen from the machine; 0: onnxruntime's)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    requests = read_requests(args.coco, args.images)
    config = ServeConfig(bundle=args.bundle, port=free_loopback_port(), batch_wait_ms=args.batch_wait_ms,
                         replicas=args.replicas, threads=args.threads)
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "loadavg_start": os.getloadavg(),
                                "note": "other jobs may share the machine (loadavg_start / loadavg_end): absolute "
                                        "figures vary run to run; the ratio is measured side by side"},
                    "config": {**config.__dict__, "bundle": str(config.bundle),
                               "limits": dataclasses.asdict(config.limits)},
                    "dataset": {"coco": str(args.coco), "images": len(requests),
                                "persons": sum(len(r.boxes) for r in requests)}}
    t0 = time.perf_counter()
    url = start(config, {"num_cpus": os.cpu_count(), "include_dashboard": False}, say=print)
    report["startup_s"] = round(time.perf_counter() - t0, 1)
    try:
        layout = stats(url)["layout"]
        report["layout"] = layout
        replicas = layout["replicas"]
        report["parity"] = parity(url, args.bundle, requests, args.images)
        print("parity", report["parity"], flush=True)
        report["estimator_batch_scaling"] = estimator_scaling(args.bundle, requests, args.images, 4.0, 3,
                                                              layout["threads"])
        print("estimator", report["estimator_batch_scaling"], flush=True)
        run_load(url, requests, args.clients, 3.0)  # warm the HTTP path
        report["throughput"] = throughput(url, requests, args.seconds, args.rounds, args.clients, replicas)
        tp = report["throughput"]
        print("throughput", tp["persons_per_s"], tp["ratio_concurrent_vs_sequential"], flush=True)
        report["replica_kill"] = replica_kill(url, requests, args.clients, 30.0, 20.0)
        print("kill", {k: v for k, v in report["replica_kill"].items() if k != "load"}, flush=True)
        report["graceful_shutdown"] = graceful_shutdown(url, requests)
        print("shutdown", report["graceful_shutdown"], flush=True)
    finally:
        report["machine"]["loadavg_end"] = os.getloadavg()
        write_json(args.out, report)
        stop(shutdown_ray=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
