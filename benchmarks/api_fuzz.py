"""Schema-driven fuzzing of the HTTP API, in-process: Schemathesis generates requests from the OpenAPI description
that FastAPI serves (serve/routes.py) — schema-valid ones and deliberately invalid ones, JSON and multipart — and
sends them to the app built without Ray (`PoseService` + `build_api`). Image fields carry real images in odd modes
and formats, corrupted copies, decompression bombs and random bytes (fuzz_inputs.py), so requests get past image
decoding to the boxes, keypoints and inference behind it.

Every answer is checked: no 5xx; status codes, content types and bodies as the schema declares; every 4xx exactly
one `{"error": "<one line>"}`; schema-invalid requests refused; no request slower than --timeout-s (a hang); and a
good request is answered correctly after the run.

    python -m benchmarks.api_fuzz --requests 10000 --out benchmarks/results/api-fuzz.json   # ~10k generated requests

Without --bundle it exports the shipped small model (fp32, no validation) to a temporary folder first.
"""
from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import io
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from PIL import Image

from .fuzz_inputs import hostile_image_bytes, image_files, near_valid_requests

SMALL_MODEL = Path(__file__).resolve().parents[1] / "models" / "posellm-small"


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    by_strategy: collections.Counter = field(default_factory=collections.Counter)
    failures: list = field(default_factory=list)  # one dict per failed check, first 50 kept
    failure_count: int = 0
    max_request_s: float = 0.0
    seconds: float = 0.0
    good_request_after: bool | None = None

    def fail(self, where: str, check: str, detail: str, case=None, status: int | None = None) -> None:
        self.failure_count += 1
        if len(self.failures) < 50:
            body = getattr(case, "body", None) if case is not None else None
            self.failures.append({"where": where, "check": check, "status": status, "detail": detail[:500],
                                  "body": repr(body)[:300], "query": repr(getattr(case, "query", None))[:200]})

    def to_json(self) -> dict:
        return {"requests": self.requests, "by_status": dict(sorted(self.by_status.items())),
                "by_strategy": dict(self.by_strategy), "failure_count": self.failure_count,
                "failures": self.failures, "max_request_s": round(self.max_request_s, 3),
                "seconds": round(self.seconds, 1), "good_request_after": self.good_request_after,
                "server_errors": sum(n for s, n in self.by_status.items() if int(s) >= 500)}


def register_image_formats() -> None:
    """Where the schema says `format: byte` (JSON image) or `binary` (multipart file), send images: valid ones
    half the time, hostile ones otherwise (Schemathesis' own generators would never produce a decodable image)."""
    import schemathesis
    files = st.one_of(image_files(), hostile_image_bytes())
    schemathesis.openapi.format("byte", files.map(lambda b: base64.b64encode(b).decode()))
    schemathesis.openapi.format("binary", files)


def in_process_app(bundle: Path, **config):
    """The service's FastAPI app and its PoseService, built without Ray (every job runs as its own batch)."""
    from serve.config import ServeConfig
    from serve.routes import build_api
    from serve.service import PoseService
    service = PoseService(ServeConfig(bundle=bundle, **config))
    return build_api(lambda: service), service


def good_body(width: int = 64, height: int = 48) -> dict:
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "boxes": [[4, 4, width / 2, height - 8]]}


def check_error_body(response) -> str | None:
    """None when a 4xx/5xx body is exactly {"error": "<one non-empty line>"}; else what is wrong."""
    try:
        doc = response.json()
    except ValueError:
        return f"body is not JSON: {response.text[:200]!r}"
    if not (isinstance(doc, dict) and list(doc) == ["error"] and isinstance(doc["error"], str)):
        return f"body is not one {{'error': str}}: {str(doc)[:200]}"
    if not doc["error"].strip() or "\n" in doc["error"]:
        return f"error message empty or not one line: {doc['error'][:200]!r}"
    return None


def strategies(schema):
    """(label, strategy) for every operation × generation mode × request media type."""
    from schemathesis import GenerationMode
    out = []
    for result in schema.get_all_operations():
        op = result.ok()
        media_types = [b.media_type for b in op.body] or [None]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for media_type in media_types:
                label = f"{op.method.upper()} {op.path} {mode.value}" + (f" {media_type}" if media_type else "")
                try:
                    out.append((label, op.as_strategy(generation_mode=mode, media_type=media_type)))
                except Exception as exc:  # noqa: BLE001 - e.g. nothing can be negated in a parameterless GET
                    print(f"  {label}: no strategy ({type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def fuzz(app, examples: int, report: FuzzReport, run_seed: int | None = 0, timeout_s: float = 60.0,
         only: str | None = None) -> FuzzReport:
    """Send up to `examples` generated requests per strategy; failures are recorded, not raised, so one run
    counts them all. `run_seed=None`: Hypothesis' derandomized mode (the same requests on every run)."""
    import schemathesis
    from schemathesis import checks
    register_image_formats()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema_checks = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                     checks.response_schema_conformance, checks.negative_data_rejection]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    t0 = time.perf_counter()
    for label, strategy in strategies(schema):
        if only and only not in label:
            continue

        @settings(max_examples=examples, deadline=None, derandomize=run_seed is None, database=None,
                  suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate), print_blob=False)
        @given(case=strategy)
        def run(case):
            start = time.perf_counter()
            future = pool.submit(case.call)
            try:
                response = future.result(timeout=timeout_s)
            except concurrent.futures.TimeoutError:
                report.fail(label, "hang", f"no answer within {timeout_s}s", case)
                raise RuntimeError(f"{label}: a request hung (> {timeout_s}s); stopping") from None
            elapsed = time.perf_counter() - start
            report.requests += 1
            report.by_strategy[label] += 1
            report.by_status[str(response.status_code)] += 1
            report.max_request_s = max(report.max_request_s, elapsed)
            if response.status_code >= 400 and (problem := check_error_body(response)):
                report.fail(label, "one error message", problem, case, response.status_code)
            try:
                case.validate_response(response, checks=schema_checks)
            except Exception as exc:  # noqa: BLE001 - Schemathesis' FailureGroup / CheckFailed: record, go on
                report.fail(label, type(exc).__name__, " ".join(str(exc).split()), case, response.status_code)

        if run_seed is not None:
            run = seed(run_seed)(run)
        try:
            run()
        except Unsatisfiable:  # e.g. a parameterless GET has no schema-invalid request to generate
            report.by_strategy[label] += 0
    pool.shutdown(wait=False)
    report.seconds += time.perf_counter() - t0
    return report


def send(client, doc: dict, tokens: bool, multipart: bool):
    """A request body `doc` (image as bytes) sent as JSON or as multipart, the way clients send it."""
    url = "/v1/pose" + ("?tokens=true" if tokens else "")
    if multipart:
        data = {"boxes": json.dumps(doc["boxes"])}
        if "keypoints" in doc:
            data["keypoints"] = json.dumps(doc["keypoints"])
        return client.post(url, files={"image": ("image", doc["image"])}, data=data)
    return client.post(url, json={**doc, "image": base64.b64encode(doc["image"]).decode()})


def fuzz_near_valid(app, examples: int, report: FuzzReport, run_seed: int | None = 0) -> FuzzReport:
    """Generated requests that are valid or nearly (fuzz_inputs.near_valid_requests): each is answered 200 with
    one person per box and one keypoint per query, or 400 with one message (a box off the image, a keypoint text
    too long for the bundle, an image mode without an 8-bit meaning); never anything else."""
    from starlette.testclient import TestClient
    client = TestClient(app, raise_server_exceptions=False)
    label = "POST /v1/pose near-valid"
    t0 = time.perf_counter()

    @settings(max_examples=examples, deadline=None, derandomize=run_seed is None, database=None,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate), print_blob=False)
    @given(req=near_valid_requests())
    def run(req):
        start = time.perf_counter()
        r = send(client, req["doc"], req["tokens"], req["multipart"])
        report.max_request_s = max(report.max_request_s, time.perf_counter() - start)
        report.requests += 1
        report.by_strategy[label] += 1
        report.by_status[str(r.status_code)] += 1
        if r.status_code == 200:
            persons = r.json()["persons"]
            want = len(req["doc"].get("keypoints") or ()) or 17
            if len(persons) != len(req["doc"]["boxes"]) or any(len(p["keypoints"]) != want for p in persons):
                report.fail(label, "answer shape", f"{len(persons)} persons for {len(req['doc']['boxes'])} boxes",
                            status=200)
        elif r.status_code != 400 or (problem := check_error_body(r)):
            why = problem if r.status_code == 400 else "not a 400"
            report.fail(label, "400 with one message", f"{r.status_code} ({why}): {r.text[:300]}",
                        status=r.status_code)

    if run_seed is not None:
        run = seed(run_seed)(run)
    run()
    report.seconds += time.perf_counter() - t0
    return report


def check_good_request(app) -> bool:
    """The service still answers a valid request (one person, its 17 keypoints) after the fuzzing."""
    from starlette.testclient import TestClient
    with TestClient(app) as client:
        r = client.post("/v1/pose", json=good_body())
    return r.status_code == 200 and len(r.json()["persons"]) == 1 and len(r.json()["persons"][0]["keypoints"]) == 17


def _export_small(out: Path) -> Path:
    from exporter.bundle import ExportConfig, export_bundle
    export_bundle(ExportConfig(SMALL_MODEL, out, precisions=("fp32",), max_persons=3, validate=False),
                  log=lambda *a, **k: None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="default: export the shipped small model to a temp dir")
    p.add_argument("--requests", type=int, default=10_000, help="at least this many generated requests")
    p.add_argument("--seed", type=int, default=0, help="first Hypothesis seed; each further round adds 1")
    p.add_argument("--timeout-s", type=float, default=60.0, help="a request slower than this counts as a hang")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/api-fuzz.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or _export_small(Path(tmp) / "small")
        app, _ = in_process_app(bundle, max_body_mb=2.0)
        report = FuzzReport()
        # the pose strategies (4) and the near-valid one share the requests; the parameterless GETs take ~1 each
        n_strategies = 5
        round_seed, hung = args.seed, False
        while report.requests < args.requests:
            before = report.requests
            per = max(50, (args.requests - report.requests) // n_strategies + 1)
            try:
                fuzz(app, per, report, run_seed=round_seed, timeout_s=args.timeout_s)
            except RuntimeError as exc:  # a hang: recorded in the report; the app cannot be trusted after it
                print(exc, file=sys.stderr)
                hung = True
                break
            fuzz_near_valid(app, per, report, run_seed=round_seed)
            print(f"seed {round_seed}: {report.requests} requests, {report.failure_count} failures, "
                  f"statuses {dict(report.by_status)}", flush=True)
            round_seed += 1
            if report.requests == before:
                break  # nothing new can be generated
        report.good_request_after = False if hung else check_good_request(app)
    doc = {"tool": "schemathesis " + __import__("schemathesis").__version__,
           "hypothesis": __import__("hypothesis").__version__, "python": platform.python_version(),
           "machine": platform.machine(), "bundle": str(args.bundle or "models/posellm-small (exported, fp32)"),
           "requested": args.requests, "first_seed": args.seed, **report.to_json()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("requests", "by_status", "server_errors", "failure_count",
                                           "good_request_after", "seconds")}))
    ok = doc["server_errors"] == 0 and doc["failure_count"] == 0 and doc["good_request_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
