"""The HTTP API under generated and hostile requests, in-process (the FastAPI app of serve/routes.py over a real
PoseService on the tiny bundle, no Ray): Schemathesis requests from the OpenAPI schema, valid and invalid, JSON and
multipart (benchmarks/api_fuzz.py; bounded and derandomized here, ≥ 10 000 in the benchmark run), near-valid
requests that reach inference, and the hand-found hostile requests of issue #23. No 5xx, every 4xx one
`{"error": ...}` line, and a good request is answered afterwards."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="needs the `serve` extra (fastapi)")
pytest.importorskip("schemathesis", reason="needs the `dev` extra (schemathesis)")

from starlette.testclient import TestClient  # noqa: E402

from benchmarks import api_fuzz  # noqa: E402
from benchmarks.fuzz_inputs import png_bomb  # noqa: E402
from fuzzing import SCALE, deep  # noqa: E402
from serve.payload import RequestLimits  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # Pillow on corrupt EXIF/TIFF tags: expected here
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
# generous text/keypoint limits so that the bundle's own limits (context, decoder batch) are reached and answered
LIMITS = RequestLimits(max_keypoints=100, max_keypoint_chars=5000)


@pytest.fixture(scope="module")
def app(tiny_bundle):
    app, _ = api_fuzz.in_process_app(tiny_bundle, max_body_mb=1.0, limits=LIMITS)
    return app


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app, raise_server_exceptions=False)


def test_schema_generated_requests_get_no_5xx_and_one_error_line(app):
    report = api_fuzz.fuzz(app, examples=int(12 * SCALE) or 1, report=api_fuzz.FuzzReport(), run_seed=None)
    print(json.dumps(report.to_json(), indent=1))
    assert report.failure_count == 0, report.failures
    assert report.requests >= 4 * 12 * min(SCALE, 1) and not any(int(s) >= 500 for s in report.by_status)
    assert api_fuzz.check_good_request(app)


def test_near_valid_requests_are_answered_or_refused_in_one_line(app):
    report = api_fuzz.fuzz_near_valid(app, examples=int(15 * SCALE) or 1, report=api_fuzz.FuzzReport(),
                                      run_seed=None)
    print(json.dumps(report.to_json(), indent=1))
    assert report.failure_count == 0, report.failures
    assert report.by_status.get("200", 0) > 0  # the generator does reach inference


def _good() -> dict:
    return api_fuzz.good_body()


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


HOSTILE = {  # name: (request kwargs, expected status, a phrase of the message)
    "100 000-deep JSON body": (dict(content=deep(100_000), headers={"content-type": "application/json"}), 400,
                               "deeper than 16 levels (--max-json-depth)"),
    "deep boxes in a good body": (dict(content=json.dumps(_good())[:-1] + ', "x": ' + deep(10_000) + "}",
                                       headers={"content-type": "application/json"}), 400, "--max-json-depth"),
    "deep multipart keypoints": (dict(files={"image": ("a.png", b"x")}, data={"boxes": "[[1,1,2,2]]",
                                                                               "keypoints": deep(100_000)}),
                                 400, "keypoints nests"),
    "30 000 empty arrays": (dict(content="[" + "[]," * 30_000 + "[]]", headers={"content-type": "application/json"}),
                            400, "--max-json-values"),
    "65 boxes": (dict(json={**_good(), "boxes": [[1, 1, 5, 5]] * 65}), 400, "--max-boxes"),
    "101 keypoints": (dict(json={**_good(), "keypoints": [{"name": "a", "description": "b"}] * 101}), 400,
                      "--max-keypoints"),
    "more keypoints than the decoder batch": (
        dict(json={**_good(), "keypoints": [{"name": f"k{i}", "description": "d"} for i in range(60)]}), 400,
        "sequences per batch"),
    "a description longer than the context": (
        dict(json={**_good(), "keypoints": [{"name": "a", "description": "word " * 900}]}), 400, "tokens"),
    "5001-character keypoint": (dict(json={**_good(), "keypoints": [{"name": "a", "description": "b" * 5000}]}),
                                400, "--max-keypoint-chars"),
    "PNG declaring 10^10 pixels": (dict(files={"image": ("a.png", png_bomb(100_000, 100_000))},
                                        data={"boxes": "[[1,1,2,2]]"}), 400, "pixels"),
    "EPS image (Ghostscript)": (dict(files={"image": ("a.eps", _eps())}, data={"boxes": "[[1,1,2,2]]"}), 400,
                                "not a readable image"),
    "?tokens=maybe": (dict(params={"tokens": "maybe"}, json=_good()), 400, "tokens"),
    "UTF-16 JSON": (dict(content=json.dumps(_good()).encode("utf-16"), headers={"content-type": "application/json"}),
                    400, "not UTF-8"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_gets_one_4xx_line_and_the_next_good_one_is_answered(client, name):
    kwargs, status, phrase = HOSTILE[name]
    r = client.post("/v1/pose", **kwargs)
    print(name, r.status_code, r.text[:300])
    assert r.status_code == status and api_fuzz.check_error_body(r) is None, r.text[:300]
    assert phrase in r.json()["error"]
    ok = client.post("/v1/pose", json=_good())
    assert ok.status_code == 200 and len(ok.json()["persons"]) == 1


def test_unknown_routes_and_methods_answer_one_error_line(client):
    for r, status in ((client.get("/nowhere"), 404), (client.delete("/v1/pose"), 405), (client.get("/v1/pose"), 405)):
        assert r.status_code == status and api_fuzz.check_error_body(r) is None, r.text
