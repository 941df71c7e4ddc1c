"""End to end on Ray Serve: the app started in-process on a free loopback port, real HTTP requests with synthetic
images — probes, parity with `Estimator.estimate` (JSON and multipart), a concurrent burst that must share batches,
every bad request of the issue (4xx + one message, then a good request still answered), a short loadtest."""
from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="needs the `serve` extra (ray[serve])")
httpx = pytest.importorskip("httpx", reason="needs the `serve` extra (httpx)")

from runtime.estimator import Estimator  # noqa: E402
from serve import payload  # noqa: E402
from serve.config import ServeConfig, free_loopback_port  # noqa: E402
from serve_startup import HTTP_TIMEOUT_S, running_service  # noqa: E402

THUMB = {"name": "left thumb", "description": "The left thumb is the short first digit of the left hand."}
MAX_BODY_MB = 1.0


@pytest.fixture(scope="module")
def service(small_bundle):
    # a long batch wait so that a burst of concurrent requests reliably meets in one batch; one replica, so that
    # /v1/stats (per replica) counts every batch; threads left to the layout (flags win, the rest from the machine)
    cfg = ServeConfig(bundle=small_bundle, port=free_loopback_port(), batch_wait_ms=200.0, max_body_mb=MAX_BODY_MB,
                      replicas=1)
    with running_service(cfg) as url:
        yield url


@pytest.fixture(scope="module")
def estimator(small_bundle) -> Estimator:
    return Estimator(small_bundle)


def _body(image: bytes, boxes, keypoints=None) -> dict:
    doc = {"image": base64.b64encode(image).decode(), "boxes": boxes}
    if keypoints:
        doc["keypoints"] = keypoints
    return doc


def _assert_equal(persons: list[dict], want) -> float:
    """Tokens identical; keypoints within 1e-6 px; returns the max |diff|."""
    assert len(persons) == len(want)
    diff = 0.0
    for got, ref in zip(persons, want):
        assert [tuple(t) for t in got["tokens"]] == list(ref.tokens)
        assert got["answers"] == list(ref.answers) and got["keypoint_names"] == list(ref.names)
        diff = max(diff, float(np.abs(np.array(got["keypoints"]) - ref.keypoints).max()))
        assert set(got) - {"tokens"} == set(ref.to_json())  # run --json's per-person entry
    assert diff <= 1e-6, diff
    return diff


def test_probes(service, estimator):
    assert httpx.get(f"{service}/healthz", timeout=HTTP_TIMEOUT_S).json() == {"status": "alive"}
    ready = httpx.get(f"{service}/readyz", timeout=HTTP_TIMEOUT_S).json()
    assert ready["ready"] is True and len(ready["keypoints"]) == 17
    assert ready["max_persons_per_batch"] == estimator.manifest.max_persons  # the bundle's exported limit


def test_stats_report_the_layout_flags_win(service):
    """--replicas given, so it stays; threads and the CPUs reserved per replica come from the machine (2 CPUs)."""
    layout = httpx.get(f"{service}/v1/stats", timeout=HTTP_TIMEOUT_S).json()["layout"]
    print(layout)
    assert layout["replicas"] == 1 and "replicas" not in layout["chosen"]
    assert layout["threads"] == 2 and layout["cpus_per_replica"] == 2.0 and layout["gpus_per_replica"] == 0.0
    assert set(layout["chosen"]) == {"threads", "cpus_per_replica"} and "2 CPUs" in layout["seen"]


def test_json_and_multipart_equal_estimator(service, estimator, scenes):
    image, boxes = scenes[0]
    want = estimator.estimate(payload.decode_image(image), boxes)
    r = httpx.post(f"{service}/v1/pose?tokens=true", json=_body(image, boxes), timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    d1 = _assert_equal(r.json()["persons"], want)
    r = httpx.post(f"{service}/v1/pose?tokens=true", files={"image": ("scene.jpg", image, "image/jpeg")},
                   data={"boxes": json.dumps(boxes)}, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    d2 = _assert_equal(r.json()["persons"], want)
    plain = httpx.post(f"{service}/v1/pose", json=_body(image, boxes), timeout=HTTP_TIMEOUT_S).json()
    assert [set(p) for p in plain["persons"]] == [set(w.to_json()) for w in want]  # no tokens unless asked
    print(f"keypoints max |diff| vs Estimator.estimate: json {d1:.3g}, multipart {d2:.3g} px (tolerance 1e-6)")


def test_concurrent_burst_shares_batches_and_equals_estimator(service, estimator, scenes):
    """Eight requests at once (one with more persons than a batch holds, two with a custom keypoint set)."""
    max_persons = estimator.manifest.max_persons
    reqs = [(img, boxes[:1], None) for img, boxes in scenes[:5]]
    big = next((img, boxes) for img, boxes in scenes if len(boxes) >= 2)
    reqs.append((big[0], big[1] * 2, None))  # more boxes than a batch holds: split over two jobs
    reqs += [(img, boxes[:1], [THUMB]) for img, boxes in scenes[:2]]
    before = httpx.get(f"{service}/v1/stats", timeout=HTTP_TIMEOUT_S).json()
    with ThreadPoolExecutor(len(reqs)) as pool:
        responses = list(pool.map(lambda r: httpx.post(f"{service}/v1/pose?tokens=true", json=_body(*r),
                                                        timeout=HTTP_TIMEOUT_S), reqs))
    after = httpx.get(f"{service}/v1/stats", timeout=HTTP_TIMEOUT_S).json()
    for (img, boxes, kps), resp in zip(reqs, responses):
        assert resp.status_code == 200, resp.text
        kp = [(k["name"], k["description"]) for k in kps] if kps else None
        _assert_equal(resp.json()["persons"], estimator.estimate(payload.decode_image(img), boxes, kp))
    persons = sum(len(b) for _, b, _ in reqs)
    jobs = sum(-(-len(b) // max_persons) for _, b, _ in reqs)
    batches = after["batches"] - before["batches"]
    print(f"{len(reqs)} requests, {jobs} jobs, {persons} persons in {batches} batches")
    assert after["persons"] - before["persons"] == persons
    assert batches < jobs  # persons of different requests shared a batch
    assert after["max_batch_persons"] <= max_persons


def _bad_requests(image: bytes, boxes) -> list[tuple[str, dict]]:
    good = _body(image, boxes)
    return [
        ("corrupt image", dict(json=_body(image[: len(image) // 3], boxes))),
        ("box outside", dict(json=_body(image, [[5000.0, 10.0, 50.0, 80.0]]))),
        ("NaN box", dict(content=json.dumps(good).replace(json.dumps(boxes[0]), "[NaN, 1, 2, 3]"),
                         headers={"content-type": "application/json"})),
        ("empty boxes", dict(json=_body(image, []))),
        ("50 MB body", dict(content=b"x" * (50 * 1024 * 1024), headers={"content-type": "application/json"})),
        ("malformed keypoints", dict(files={"image": ("a.jpg", image)},
                                     data={"boxes": json.dumps(boxes), "keypoints": "[{\"name\": \"x\""})),
        ("not JSON", dict(content=b"{image:", headers={"content-type": "application/json"})),
        ("wrong content type", dict(content=b"hello", headers={"content-type": "text/plain"})),
    ]


@pytest.mark.parametrize("case", [c for c, _ in _bad_requests(b"x", [[0, 0, 1, 1]])])
def test_bad_request_gets_one_4xx_message_and_the_next_good_one_is_answered(service, scenes, case):
    image, boxes = scenes[1]
    kwargs = dict(_bad_requests(image, boxes))[case]
    r = httpx.post(f"{service}/v1/pose", timeout=HTTP_TIMEOUT_S, **kwargs)
    print(case, r.status_code, r.text[:200])
    assert 400 <= r.status_code < 500
    assert list(r.json()) == ["error"] and r.json()["error"]
    expected = {"50 MB body": 413, "wrong content type": 415}.get(case, 400)
    assert r.status_code == expected
    ok = httpx.post(f"{service}/v1/pose", json=_body(image, boxes), timeout=HTTP_TIMEOUT_S)
    assert ok.status_code == 200 and len(ok.json()["persons"]) == len(boxes)


def test_loadtest_against_the_service(service, scenes, tmp_path):
    from serve.loadtest import LoadRequest, run_load
    reqs = [LoadRequest(f"{i}.jpg", img, boxes) for i, (img, boxes) in enumerate(scenes)]
    report = run_load(service, reqs, clients=2, seconds=3.0, max_requests=6, timeout_s=HTTP_TIMEOUT_S)
    print(report)
    assert report["errors"] == 0 and report["ok"] == report["requests"] <= 6
    assert report["persons"] > 0 and report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0
