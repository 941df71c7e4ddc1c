"""A `POST /v1/pose` request body → a validated `PoseRequest` (image pixels, boxes, keypoint set).

Two encodings carry the same fields: JSON `{"image": base64, "boxes": [[x, y, w, h], ...], "keypoints": [...]}` and
multipart (file field `image`, form fields `boxes` and optional `keypoints` as JSON text); `keypoints` may also be a
set name (`mpii`). Every problem raises `InputError` naming the offending value and what was expected; the app turns
it into one 4xx message. Every size a stranger controls is bounded by `RequestLimits` before it costs memory or time.
Ray-free and FastAPI-free, so it is tested without a server.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from runtime.errors import InputError
from runtime.keypoint_sets import SET_NAMES, keypoint_set
from runtime.image_io import IMAGE_DECODE_ERRORS, decode_pil, ensure_rgb
from runtime.preprocess import validate_box

KeypointSet = tuple[tuple[str, str], ...]  # () = the bundle's 17 COCO keypoints
# Formats a client may send. Pillow's others are rare for photos and some hand the bytes to other programs
# (EPS runs Ghostscript) or to little-used decoders: a server decodes only these.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold (the README's service section lists each with its `serve` flag)."""

    max_boxes: int = 64  # persons per request (--max-boxes)
    max_keypoints: int = 64  # custom keypoints per request (--max-keypoints); the bundle may allow fewer
    max_keypoint_chars: int = 1000  # name + description of one custom keypoint (--max-keypoint-chars)
    max_image_pixels: int = 50_000_000  # width × height, checked before decoding (--max-image-pixels)
    max_json_depth: int = 16  # nesting of arrays/objects in a JSON body or field (--max-json-depth); 3 is enough
    max_json_values: int = 10_000  # arrays, objects and comma-separated items in one (--max-json-values)

    def __post_init__(self) -> None:
        bad = {f.name: getattr(self, f.name) for f in fields(self)
               if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1}
        if bad:
            raise InputError(f"request limits {bad}: expected integers >= 1")


@dataclass(frozen=True, eq=False)
class PoseRequest:
    image: np.ndarray  # uint8 HxWx3 RGB
    boxes: list[list[float]]  # as given (validated: finite, overlapping the image)
    keypoints: KeypointSet


def decode_image(data: bytes, limits: RequestLimits = RequestLimits()) -> np.ndarray:
    """Encoded image file bytes (JPEG, PNG, ...) → uint8 RGB."""
    if not data:
        raise InputError("image is empty; expected the bytes of an encoded image file (JPEG, PNG, ...)")
    try:
        return ensure_rgb(decode_pil(io.BytesIO(data), limits.max_image_pixels, IMAGE_FORMATS, "--max-image-pixels"))
    except InputError:
        raise
    except IMAGE_DECODE_ERRORS as exc:
        raise InputError(f"image bytes ({len(data)} B) are not a readable image file "
                         f"({'/'.join(IMAGE_FORMATS)}): {type(exc).__name__}: {_one_line(exc)}") from None


def parse_boxes(value: Any, width: int, height: int, limits: RequestLimits) -> list[list[float]]:
    if isinstance(value, str):
        value = parse_json(value, "boxes", limits)
    if not isinstance(value, list) or not value:
        raise InputError(f"boxes={_short(value)}: expected a non-empty list of [x, y, w, h] person boxes")
    if len(value) > limits.max_boxes:
        raise InputError(f"{len(value)} boxes in one request; at most {limits.max_boxes} are accepted (--max-boxes)")
    boxes = []
    for box in value:
        if not isinstance(box, (list, tuple)) or any(isinstance(v, (bool, str)) or v is None for v in box):
            raise InputError(f"person box {_short(box)}: expected [x, y, w, h] (four numbers)")
        validate_box(box, width, height)  # raises with the box and the image size
        boxes.append([float(v) for v in box])
    return boxes


def parse_keypoints(value: Any, limits: RequestLimits) -> KeypointSet:
    """Absent/null → the 17 COCO keypoints; a set name (`coco`, `mpii`, `h36m`, as a string or its JSON string);
    else a list of {"name": ..., "description": ...}."""
    if value is None or value == "":
        return ()
    if isinstance(value, str) and value.strip() not in SET_NAMES:
        value = parse_json(value, "keypoints", limits)  # multipart carries the list as JSON text
    if isinstance(value, str):
        if value.strip() not in SET_NAMES:
            raise InputError(f"keypoints={_short(value)}: unknown keypoint set; expected one of {list(SET_NAMES)}")
        return tuple(keypoint_set(value.strip()))
    if not isinstance(value, list) or not value:
        raise InputError(f"keypoints={_short(value)}: expected a non-empty list of "
                         '{"name": ..., "description": ...} objects (a set name, or omit it for the 17 COCO keypoints)')
    if len(value) > limits.max_keypoints:
        raise InputError(f"{len(value)} keypoints in one request; at most {limits.max_keypoints} are accepted "
                         "(--max-keypoints)")
    out = []
    for kp in value:
        if not (isinstance(kp, dict) and isinstance(kp.get("name"), str) and isinstance(kp.get("description"), str)
                and kp["name"].strip() and kp["description"].strip()):
            raise InputError(f"keypoint {_short(kp)}: expected {{\"name\": str, \"description\": str}}, both non-empty")
        extra = sorted(set(kp) - {"name", "description"})
        if extra:
            raise InputError(f"keypoint {_short(kp)}: unknown fields {_short(extra)}; expected name and description")
        name, description = kp["name"].strip(), kp["description"].strip()
        if len(name) + len(description) > limits.max_keypoint_chars:
            raise InputError(f"keypoint {_short(name)}: name + description are {len(name) + len(description)} "
                             f"characters; at most {limits.max_keypoint_chars} are accepted (--max-keypoint-chars; "
                             "the text becomes prompt tokens)")
        if "\0" in name + description:
            raise InputError(f"keypoint {_short(name)}: name or description contains a NUL character")
        out.append((name, description))
    return tuple(out)


def from_fields(image: bytes, boxes: Any, keypoints: Any, limits: RequestLimits) -> PoseRequest:
    # the cheap fields first: a bad box list is reported without decoding a large image
    kps = parse_keypoints(keypoints, limits)
    if isinstance(boxes, str):
        boxes = parse_json(boxes, "boxes", limits)
    rgb = decode_image(image, limits)
    return PoseRequest(rgb, parse_boxes(boxes, rgb.shape[1], rgb.shape[0], limits), kps)


def from_json(body: bytes, limits: RequestLimits) -> PoseRequest:
    doc = parse_json(body, "request body", limits)
    if not isinstance(doc, Mapping):
        raise InputError(f"request body is a JSON {type(doc).__name__}; expected an object with image and boxes")
    unknown = sorted(set(doc) - {"image", "boxes", "keypoints"})
    if unknown:
        raise InputError(f"unknown fields {_short(unknown)}; expected image, boxes and optional keypoints")
    if not isinstance(doc.get("image"), str):
        raise InputError("field image: expected a base64 string of the encoded image file")
    try:
        data = base64.b64decode(doc["image"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"field image is not valid base64: {exc}") from None
    if "boxes" not in doc:
        raise InputError("field boxes is missing; expected [[x, y, w, h], ...]")
    return from_fields(data, doc["boxes"], doc.get("keypoints"), limits)


# A JSON string (escapes included) or one structural character. Strings are matched whole, so brackets and commas
# inside them (and the megabytes of a base64 image) are skipped at the regex engine's speed.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


def check_json_shape(text: str, what: str, limits: RequestLimits) -> None:
    """Refuse JSON nested deeper than `max_json_depth` or holding more than `max_json_values` arrays, objects and
    comma-separated items, before `json.loads` builds it: the stdlib parser recurses once per level (100 000 levels
    → RecursionError) and a 20 MB body of `[[],[],...]` would be millions of Python objects. Stops at the first
    excess, so its cost is bounded by the limits, not the body."""
    depth = values = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            values += 1
            if depth > limits.max_json_depth:
                raise InputError(f"{what} nests arrays/objects deeper than {limits.max_json_depth} levels "
                                 "(--max-json-depth); a pose request needs 3")
        elif token in "]}":
            depth -= 1
        elif token == ",":
            values += 1
        else:
            continue
        if values > limits.max_json_values:
            raise InputError(f"{what} holds more than {limits.max_json_values} JSON arrays, objects and items "
                             "(--max-json-values)")


def parse_json(text: str | bytes, what: str, limits: RequestLimits) -> Any:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")  # RFC 8259: JSON between systems is UTF-8
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not UTF-8 JSON: {exc.reason} at byte {exc.start}") from None
    check_json_shape(text, what, limits)
    try:
        # NaN/Infinity are not JSON; reject them here with the field's name rather than later
        return json.loads(text, parse_constant=lambda c: _reject_constant(c, what))
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable below --max-json-depth; kept so a deep document can never be a 500
        raise InputError(f"{what} is nested too deeply to parse") from None


def _reject_constant(name: str, what: str):
    raise InputError(f"{what} contains {name}; expected finite numbers")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value[:limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."
