"""`posellm-edge loadtest URL --clients N --seconds S --images DIR --coco ANN`: closed-loop HTTP load on the service.

Each client thread sends one request at a time (an image of the COCO file with all its person boxes, cycling through
the images from its own offset) until the time is up or --max-requests are sent. Bounded three ways: time, request
count, and a per-request timeout; loopback only unless --allow-remote. Reports p50/p90/p99 latency, persons/s and
errors as JSON; the exit status is 1 when any request failed.
"""
from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from runtime.errors import InputError
from runtime.results import write_json


@dataclass(frozen=True)
class LoadRequest:
    name: str
    image: bytes  # the encoded file, sent as it is on disk
    boxes: list[list[float]]

    def body(self, keypoints: list[dict] | None = None) -> dict:
        doc = {"image": base64.b64encode(self.image).decode("ascii"), "boxes": self.boxes}
        if keypoints:
            doc["keypoints"] = keypoints
        return doc


@dataclass
class ClientLog:
    latencies_s: list[float] = field(default_factory=list)  # successful requests only
    persons: int = 0
    errors: Counter = field(default_factory=Counter)  # "HTTP 503", "ReadTimeout", ...
    first_error: str | None = None


def read_requests(coco: Path, images: Path, limit: int | None = None) -> list[LoadRequest]:
    """One request per COCO image that has person boxes: the file's bytes and every annotation's bbox."""
    try:
        doc = json.loads(Path(coco).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"--coco {coco}: cannot read COCO annotations: {exc}") from None
    boxes: dict[int, list] = {}
    for ann in doc.get("annotations", []):
        if ann.get("category_id", 1) == 1 and ann.get("bbox") and ann["bbox"][2] > 1 and ann["bbox"][3] > 1:
            boxes.setdefault(ann["image_id"], []).append([float(v) for v in ann["bbox"]])
    out = []
    for img in doc.get("images", []):
        if img["id"] in boxes:
            path = Path(images) / img["file_name"]
            try:
                out.append(LoadRequest(img["file_name"], path.read_bytes(), boxes[img["id"]]))
            except OSError as exc:
                raise InputError(f"image {path}: {exc}") from None
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError(f"--coco {coco}: no image with person boxes")
    return out


def check_loopback(url: str) -> None:
    """Load goes to this machine unless the caller says otherwise (--allow-remote)."""
    host = urlsplit(url).hostname
    if not host:
        raise InputError(f"URL {url!r}: expected http://HOST:PORT")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise InputError(f"URL {url!r}: cannot resolve {host!r}: {exc}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise InputError(f"URL {url!r} resolves to {sorted(addrs)}, not loopback; pass --allow-remote to load "
                         "another machine")


def run_load(url: str, requests: list[LoadRequest], clients: int, seconds: float, max_requests: int | None = None,
             timeout_s: float = 30.0, keypoints: list[dict] | None = None) -> dict:
    """Closed loop: `clients` threads, each one request in flight, until `seconds` pass or `max_requests` are sent."""
    if clients < 1 or seconds <= 0:
        raise InputError(f"clients={clients}, seconds={seconds}: expected >= 1 and > 0")
    endpoint = url.rstrip("/") + "/v1/pose"
    bodies = [json.dumps(r.body(keypoints)).encode() for r in requests]
    persons = [len(r.boxes) for r in requests]
    budget = threading.Semaphore(max_requests) if max_requests else None
    logs = [ClientLog() for _ in range(clients)]
    start = time.perf_counter()
    deadline = start + seconds

    def client(k: int) -> None:
        log = logs[k]
        with httpx.Client(timeout=timeout_s, headers={"content-type": "application/json"}) as http:
            i = k * max(1, len(bodies) // clients)
            while time.perf_counter() < deadline and (budget is None or budget.acquire(blocking=False)):
                j = i % len(bodies)
                i += 1
                t0 = time.perf_counter()
                try:
                    r = http.post(endpoint, content=bodies[j])
                    kind = None if r.status_code == 200 else f"HTTP {r.status_code}"
                    detail = r.text[:200] if kind else None
                except httpx.HTTPError as exc:
                    kind, detail = type(exc).__name__, str(exc)[:200]
                if kind is None:
                    log.latencies_s.append(time.perf_counter() - t0)
                    log.persons += persons[j]
                else:
                    log.errors[kind] += 1
                    log.first_error = log.first_error or f"{kind}: {detail}"

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout_s + 5)  # a client can overrun its deadline by at most one request
    wall = time.perf_counter() - start
    return summarize(url, clients, seconds, wall, logs)


def summarize(url: str, clients: int, seconds: float, wall_s: float, logs: list[ClientLog]) -> dict:
    lat = np.array([v for log in logs for v in log.latencies_s]) * 1000.0
    errors = sum((log.errors for log in logs), Counter())
    persons = sum(log.persons for log in logs)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 2) if lat.size else None

    return {
        "url": url, "clients": clients, "seconds": seconds, "wall_s": round(wall_s, 3),
        "requests": int(lat.size + sum(errors.values())), "ok": int(lat.size), "errors": int(sum(errors.values())),
        "error_kinds": dict(errors), "first_error": next((log.first_error for log in logs if log.first_error), None),
        "persons": persons, "persons_per_s": round(persons / wall_s, 3), "requests_per_s": round(lat.size / wall_s, 3),
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100),
                       "mean": round(float(lat.mean()), 2) if lat.size else None},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    p.add_argument("--seconds", type=float, default=30.0, help="how long to send requests")
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many requests in all")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (seconds)")
    p.add_argument("--images", type=Path, required=True, help="image folder")
    p.add_argument("--coco", type=Path, required=True, help="COCO keypoint annotations: the person boxes")
    p.add_argument("--limit-images", type=int, default=None, help="use only the first N images")
    p.add_argument("--out", type=Path, help="write the JSON report here (else stdout)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")


def run(args: argparse.Namespace) -> int:
    if not args.allow_remote:
        check_loopback(args.url)
    requests = read_requests(args.coco, args.images, args.limit_images)
    report = run_load(args.url, requests, args.clients, args.seconds, args.max_requests, args.timeout)
    if args.out:
        write_json(args.out, report)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0 if report["errors"] == 0 else 1
