"""A `POST /v1/pose` request body → a validated `PoseRequest` (image pixels, boxes, keypoint set).

Two encodings carry the same fields: JSON `{"image": base64, "boxes": [[x, y, w, h], ...], "keypoints": [...]}` and
multipart (file field `image`, form fields `boxes` and optional `keypoints` as JSON text); `keypoints` may also be a
set name (`mpii`). Every problem raises `InputError` naming the offending value and what was expected; the app turns
it into one 4xx message.
Ray-free and FastAPI-free, so it is tested without a server.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from runtime.errors import InputError
from runtime.keypoint_sets import SET_NAMES, keypoint_set
from runtime.preprocess import IMAGE_DECODE_ERRORS, decode_pil, ensure_rgb, validate_box

KeypointSet = tuple[tuple[str, str], ...]  # () = the bundle's 17 COCO keypoints
MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard for a server (PIL's default warns at 89 M)


@dataclass(frozen=True, eq=False)
class PoseRequest:
    image: np.ndarray  # uint8 HxWx3 RGB
    boxes: list[list[float]]  # as given (validated: finite, overlapping the image)
    keypoints: KeypointSet


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image file bytes (JPEG, PNG, ...) → uint8 RGB."""
    if not data:
        raise InputError("image is empty; expected the bytes of an encoded image file (JPEG, PNG, ...)")
    try:
        return ensure_rgb(decode_pil(io.BytesIO(data), MAX_IMAGE_PIXELS))
    except InputError:
        raise
    except IMAGE_DECODE_ERRORS as exc:
        raise InputError(f"image bytes ({len(data)} B) are not a readable image file: "
                         f"{type(exc).__name__}: {exc}") from None


def parse_boxes(value: Any, width: int, height: int, max_boxes: int) -> list[list[float]]:
    if isinstance(value, str):
        value = _json(value, "boxes")
    if not isinstance(value, list) or not value:
        raise InputError(f"boxes={_short(value)}: expected a non-empty list of [x, y, w, h] person boxes")
    if len(value) > max_boxes:
        raise InputError(f"{len(value)} boxes in one request; at most {max_boxes} are accepted")
    boxes = []
    for box in value:
        if not isinstance(box, (list, tuple)) or any(isinstance(v, (bool, str)) or v is None for v in box):
            raise InputError(f"person box {_short(box)}: expected [x, y, w, h] (four numbers)")
        validate_box(box, width, height)  # raises with the box and the image size
        boxes.append([float(v) for v in box])
    return boxes


def parse_keypoints(value: Any) -> KeypointSet:
    """Absent/null → the 17 COCO keypoints; a set name (`coco`, `mpii`, `h36m`, as a string or its JSON string);
    else a list of {"name": ..., "description": ...}."""
    if value is None or value == "":
        return ()
    if isinstance(value, str) and value.strip() not in SET_NAMES:
        value = _json(value, "keypoints")  # multipart carries the list as JSON text
    if isinstance(value, str):
        if value.strip() not in SET_NAMES:
            raise InputError(f"keypoints={_short(value)}: unknown keypoint set; expected one of {list(SET_NAMES)}")
        return tuple(keypoint_set(value.strip()))
    if not isinstance(value, list) or not value:
        raise InputError(f"keypoints={_short(value)}: expected a non-empty list of "
                         '{"name": ..., "description": ...} objects (a set name, or omit it for the 17 COCO keypoints)')
    out = []
    for kp in value:
        if not (isinstance(kp, dict) and isinstance(kp.get("name"), str) and isinstance(kp.get("description"), str)
                and kp["name"].strip() and kp["description"].strip()):
            raise InputError(f"keypoint {_short(kp)}: expected {{\"name\": str, \"description\": str}}, both non-empty")
        out.append((kp["name"].strip(), kp["description"].strip()))
    return tuple(out)


def from_fields(image: bytes, boxes: Any, keypoints: Any, max_boxes: int) -> PoseRequest:
    rgb = decode_image(image)
    return PoseRequest(rgb, parse_boxes(boxes, rgb.shape[1], rgb.shape[0], max_boxes), parse_keypoints(keypoints))


def from_json(body: bytes, max_boxes: int) -> PoseRequest:
    doc = _json(body, "request body")
    if not isinstance(doc, Mapping):
        raise InputError(f"request body is a JSON {type(doc).__name__}; expected an object with image and boxes")
    unknown = sorted(set(doc) - {"image", "boxes", "keypoints"})
    if unknown:
        raise InputError(f"unknown fields {unknown}; expected image, boxes and optional keypoints")
    if not isinstance(doc.get("image"), str):
        raise InputError("field image: expected a base64 string of the encoded image file")
    try:
        data = base64.b64decode(doc["image"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"field image is not valid base64: {exc}") from None
    if "boxes" not in doc:
        raise InputError("field boxes is missing; expected [[x, y, w, h], ...]")
    return from_fields(data, doc["boxes"], doc.get("keypoints"), max_boxes)


def _json(text: str | bytes, what: str) -> Any:
    try:
        # NaN/Infinity are not JSON; reject them here with the field's name rather than later
        return json.loads(text, parse_constant=lambda c: _reject_constant(c, what))
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} is not UTF-8 JSON") from None


def _reject_constant(name: str, what: str):
    raise InputError(f"{what} contains {name}; expected finite numbers")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
