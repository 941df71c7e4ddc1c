"""The service's parts without a server: request parsing, cross-request batching (real estimator), the load
generator's guards. Fast; the Ray Serve end-to-end tests are in test_serve_app.py."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.estimator import Estimator
from runtime.preprocess import CropSpec
from serve import payload
from serve.batching import Job, run_jobs, split_request, total_persons

THUMB = ("left thumb", "The left thumb is the short first digit of the left hand.")
LIMITS = payload.RequestLimits(max_boxes=8)


def _png(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _json_body(image: bytes, boxes, **extra) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), "boxes": boxes, **extra}).encode()


def test_json_and_multipart_fields_parse_to_the_same_request():
    a = payload.from_json(_json_body(_png(), [[1, 2, 30, 40]], keypoints=[{"name": THUMB[0],
                                                                            "description": THUMB[1]}]), LIMITS)
    b = payload.from_fields(_png(), "[[1, 2, 30, 40]]", json.dumps([{"name": THUMB[0], "description": THUMB[1]}]), LIMITS)
    assert a.boxes == b.boxes == [[1.0, 2.0, 30.0, 40.0]]
    assert a.keypoints == b.keypoints == (THUMB,)
    assert a.image.shape == b.image.shape == (48, 64, 3)
    assert payload.from_json(_json_body(_png(), [[1, 2, 30, 40]]), LIMITS).keypoints == ()  # default: the 17


@pytest.mark.parametrize("body, message", [
    (_json_body(b"\x89PNG\r\n\x1a\n not really", [[1, 2, 3, 4]]), "not a readable image"),
    (_json_body(b"", [[1, 2, 3, 4]]), "image is empty"),
    (b'{"image": "@@@", "boxes": [[1, 2, 3, 4]]}', "not valid base64"),
    (_json_body(_png(), [[500, 2, 30, 40]]), "lies entirely outside the 64x48 image"),
    (_json_body(_png(), [[1, 2, -3, 4]]), "width > 0 and height > 0"),
    (_json_body(_png(), []), "non-empty list"),
    (_json_body(_png(), [[1, 2, 3]]), "must have 4 values"),
    (_json_body(_png(), [[1, "2", 3, 4]]), "four numbers"),
    (_json_body(_png(), [[1, 2, 3, 4]]).replace(b"[[1, 2, 3, 4]]", b"[[NaN, 2, 3, 4]]"), "contains NaN"),
    (_json_body(_png(), [[1, 2, 3, 4]]).replace(b"[[1, 2, 3, 4]]", b"[[1e999, 2, 3, 4]]"), "NaN or infinite"),
    (_json_body(_png(), [[1, 2, 3, 4]], keypoints="[{name: x}"), "keypoints is not valid JSON"),
    (_json_body(_png(), [[1, 2, 3, 4]], keypoints=[{"name": "x"}]), "expected {\"name\": str"),
    (_json_body(_png(), [[1, 2, 3, 4]], keypoints=[]), "non-empty list"),
    (_json_body(_png(), [[1, 2, 3, 4]], extra=1), "unknown fields ['extra']"),
    (b'{"image": "', "request body is not valid JSON"),
    (b"[1, 2]", "expected an object"),
    (json.dumps({"image": base64.b64encode(_png()).decode()}).encode(), "boxes is missing"),
    (_json_body(_png(), [[1, 2, 3, 4]] * 9), "at most 8"),
])
def test_bad_requests_raise_one_clear_input_error(body, message):
    with pytest.raises(InputError) as err:
        payload.from_json(body, LIMITS)
    print(err.value)
    assert message in str(err.value)


def _request(image_bytes: bytes, boxes, keypoints=()) -> payload.PoseRequest:
    return payload.PoseRequest(payload.decode_image(image_bytes), boxes, tuple(keypoints))


def test_persons_of_several_requests_share_one_call_and_match_estimate(small_bundle, scenes):
    """Jobs of different images (one split over two jobs) and two keypoint sets, in one batch: every person's
    tokens equal Estimator.estimate on its own image; one estimator call per keypoint set."""
    est = Estimator(small_bundle)
    calls = []
    real = est.estimate_crops
    est.estimate_crops = lambda pv, *a, **k: calls.append(len(pv)) or real(pv, *a, **k)
    spec: CropSpec = est.crop_spec
    reqs = [_request(img, boxes) for img, boxes in scenes[:3]]
    reqs.append(_request(scenes[3][0], scenes[3][1][:1], [THUMB]))
    jobs = [j for r in reqs for j in split_request(r, spec, max_persons=2)]
    assert any(len(r.boxes) > 2 for r in reqs[:3]), "want a request split over two jobs"
    outcomes = run_jobs(est, jobs)
    assert len(calls) == 2 and sum(calls) == total_persons(jobs), calls  # one call per keypoint set
    got = iter(outcomes)
    max_diff = 0.0
    for r in reqs:
        persons = [p for j in split_request(r, spec, 2) for p in next(got).results]
        want = est.estimate(r.image, r.boxes, list(r.keypoints) or None)
        assert [p.tokens for p in persons] == [w.tokens for w in want]
        max_diff = max(max_diff, max(float(np.abs(p.keypoints - w.keypoints).max()) for p, w in zip(persons, want)))
    print(f"keypoints max |diff| {max_diff:.3g} px (tolerance 1e-6)")
    assert max_diff <= 1e-6


class _FailsOnBox:
    """Estimator stand-in: echoes its boxes, raises when a poisoned one is in the call."""

    def __init__(self, poison: float) -> None:
        self.poison, self.calls = poison, 0

    def estimate_crops(self, pixel_values, affines, boxes, keypoints=None):
        self.calls += 1
        if any(b[0] == self.poison for b in boxes):
            raise RuntimeError(f"cannot decode box {self.poison}")
        return [tuple(b) for b in boxes]


def _job(x: float, n: int = 1, keypoints=()) -> Job:
    return Job(np.zeros((n, 3, 4, 4), np.float32), [(None, None)] * n, [[x, 0, 1, 1]] * n, keypoints)


def test_a_failing_job_gets_its_error_and_the_rest_of_its_batch_their_results():
    est = _FailsOnBox(poison=2.0)
    jobs = [_job(1.0, 2), _job(2.0), _job(3.0), _job(4.0, 1, (THUMB,))]
    outcomes = run_jobs(est, jobs)
    assert [o.error is None for o in outcomes] == [True, False, True, True]
    assert "cannot decode box 2.0" in str(outcomes[1].error)
    assert outcomes[0].results == [(1.0, 0, 1, 1)] * 2 and outcomes[2].results == [(3.0, 0, 1, 1)]
    assert est.calls == 1 + 1 + 3  # the custom set alone; the COCO group once, then job by job


def test_loadtest_refuses_non_loopback_urls_and_reads_coco_boxes(tmp_path):
    pytest.importorskip("httpx", reason="the load test's HTTP client comes with the [serve] extra")
    from serve.loadtest import check_loopback, read_requests
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    with pytest.raises(InputError, match="not loopback"):
        check_loopback("http://192.0.2.1:8000")  # TEST-NET-1: resolved, never contacted
    (tmp_path / "a.png").write_bytes(_png())
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "none.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40]}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    [req] = read_requests(tmp_path / "ann.json", tmp_path)
    assert req.boxes == [[1.0, 2.0, 30.0, 40.0]] and req.image == _png()


def test_pacer_collects_while_a_batch_runs_and_waits_the_minimum_when_idle(monkeypatch):
    from serve import batching
    now = [100.0]
    monkeypatch.setattr(batching.time, "monotonic", lambda: now[0])
    pacer = batching.BatchPacer(min_wait_s=0.01)
    assert pacer.wait_s() == 0.01  # idle, nothing measured yet
    pacer.started(4)
    now[0] += 0.4
    pacer.finished(4)  # 0.1 s per person measured
    assert pacer.wait_s() == 0.01  # idle again
    pacer.started(6)  # expected to run 0.6 s
    now[0] += 0.2
    assert pacer.wait_s() == pytest.approx(0.4)  # a batch opened now collects until then
    now[0] += 1.0
    assert pacer.wait_s() == 0.01  # overran its estimate: no extra wait


def test_serve_cli_arguments_make_a_config():
    pytest.importorskip("ray.serve", reason="needs the `serve` extra (ray[serve])")
    import argparse

    from serve.cli import add_arguments, config_from_args
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["b", "--autoscale", "1,4", "--max-persons-per-batch", "3",
                                         "--batch-wait-ms", "5", "--address", "auto", "--gpus-per-replica", "1"]))
    assert cfg.autoscale == (1, 4) and cfg.max_persons_per_batch == 3 and cfg.address == "auto"
    assert cfg.gpus_per_replica == 1.0 and cfg.batch_wait_ms == 5.0
    with pytest.raises(SystemExit):
        p.parse_args(["b", "--replicas", "2", "--autoscale", "1,4"])  # one or the other
    with pytest.raises(InputError, match="MIN,MAX"):
        config_from_args(p.parse_args(["b", "--autoscale", "3,1"]))
    with pytest.raises(InputError, match="expected MIN,MAX"):
        from serve.config import parse_autoscale
        parse_autoscale("4")


def test_free_loopback_port_is_bindable_and_outside_rays_ranges():
    import socket

    from serve.config import free_loopback_port
    port = free_loopback_port()
    assert 20000 <= port <= 32767  # not Ray's worker ports (10002-19999) nor the kernel's ephemeral ones
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
