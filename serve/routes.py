"""The HTTP API: routes, their OpenAPI description (what the schema-driven fuzzers generate requests from) and
error answers. Ray-free: `build_api(get_service)` is the same app on Ray Serve (app.py) and in-process (tests).

    POST /v1/pose   JSON {"image": base64, "boxes": [[x, y, w, h], ...], "keypoints": [...]} or multipart
                    (file `image`, form `boxes` / `keypoints` as JSON) → {"precision", "decoding", "persons": [...]},
                    each person exactly `run --json`'s entry; `?tokens=true` adds the generated token ids
    GET  /healthz   the replica is alive
    GET  /readyz    the bundle is loaded and warmed up (503 until then)
    GET  /v1/stats  this replica's batching counters (requests, batches, persons per batch) and the service's layout

Every 4xx is `{"error": "<one message>"}`, FastAPI's own (unknown route, wrong method, bad query value) included.
"""
from __future__ import annotations

from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from .service import PoseService, error

ERROR = {"type": "object", "required": ["error"], "additionalProperties": False,
         "properties": {"error": {"type": "string", "minLength": 1}}}
BOXES = {"type": "array", "minItems": 1, "description": "person boxes [x, y, w, h] in image pixels (--max-boxes)",
         "items": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "number"}}}
KEYPOINTS = {"type": "array", "minItems": 1,
             "description": "custom keypoints instead of the 17 COCO ones (--max-keypoints, --max-keypoint-chars)",
             "items": {"type": "object", "required": ["name", "description"], "additionalProperties": False,
                       "properties": {"name": {"type": "string", "minLength": 1},
                                      "description": {"type": "string", "minLength": 1}}}}
PERSON = {"type": "object", "required": ["box", "keypoint_names", "keypoints", "score", "answers", "flags"],
          "properties": {"box": {"type": "array", "items": {"type": "number"}},
                         "keypoint_names": {"type": "array", "items": {"type": "string"}},
                         "keypoints": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                         "score": {"type": "number"}, "answers": {"type": "array", "items": {"type": "string"}},
                         "flags": {}, "tokens": {"type": "array"}}}
POSE_OPENAPI = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["image", "boxes"], "additionalProperties": False,
            "properties": {"image": {"type": "string", "format": "byte",
                                     "description": "base64 of a JPEG/PNG/WebP/BMP/GIF/TIFF file (--max-image-pixels)"},
                           "boxes": BOXES, "keypoints": KEYPOINTS}}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image", "boxes"],
            "properties": {"image": {"type": "string", "format": "binary"},
                           "boxes": {"type": "string", "description": "JSON [[x, y, w, h], ...]"},
                           "keypoints": {"type": "string", "description": 'JSON [{"name": ..., "description": ...}]'}},
        }},
    }},
    "responses": {
        "200": {"description": "keypoints of every person",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["precision", "decoding", "persons"],
                    "properties": {"precision": {"type": "string"}, "decoding": {"type": "string"},
                                   "persons": {"type": "array", "items": PERSON}}}}}},
        **{code: {"description": what, "content": {"application/json": {"schema": ERROR}}}
           for code, what in (("400", "a bad value: image, box, keypoint, JSON"), ("413", "body over --max-body-mb"),
                              ("415", "not JSON or multipart"))},
    },
}
PROBE_ERRORS = {"400": {"description": "bad query", "content": {"application/json": {"schema": ERROR}}}}


def build_api(get_service: Callable[[], PoseService]) -> FastAPI:
    """The FastAPI app; `get_service()` is the PoseService that answers (looked up per request, so a Ray replica
    can build the app before its instance is registered)."""
    api = FastAPI(title="posellm-edge", description="language-guided pose estimation on person boxes")

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):  # 404 unknown route, 405 wrong method, ...
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. 405's Allow
        return response

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):  # e.g. ?tokens=maybe: 400, not 422
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}={e.get('input')!r}: {e.get('msg')}"
                 for e in exc.errors()]
        return error(400, "; ".join(parts)[:500] or "invalid request")

    @api.get("/healthz", responses=PROBE_ERRORS)
    def healthz() -> dict:
        return get_service().healthz()

    @api.get("/readyz", responses=PROBE_ERRORS)
    def readyz():
        return get_service().readyz()

    @api.get("/v1/stats", responses=PROBE_ERRORS)
    def stats() -> dict:
        return get_service().stats_snapshot()

    @api.post("/v1/pose", openapi_extra=POSE_OPENAPI)
    async def pose(request: Request, tokens: bool = False):
        return await get_service().pose(request, tokens)

    return api
