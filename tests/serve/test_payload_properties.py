"""Property tests of the request parsers a stranger's bytes reach (serve/payload.py): whole JSON bodies, multipart
fields, boxes, keypoint lists, image bytes. Each either parses or raises InputError with one line — never another
exception type — and the JSON shape guard never refuses a document within its limits."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from benchmarks.fuzz_inputs import hostile_image_bytes, png_bomb
from fuzzing import assert_one_line, bounded, deep, json_values, mutated
from runtime.errors import InputError
from serve import payload

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # Pillow on corrupt EXIF/TIFF tags: expected here
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
LIMITS = payload.RequestLimits(max_boxes=8, max_keypoints=5, max_keypoint_chars=200)


def _png(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = {"image": base64.b64encode(_png()).decode(), "boxes": [[1, 2, 30, 40], [10, 10, 5, 5]],
        "keypoints": [{"name": "left thumb", "description": "The short first digit of the left hand."}]}


def _parses_or_one_line(parse, *args):
    try:
        return parse(*args)
    except InputError as exc:
        assert_one_line(exc)
        return None


def test_the_seed_body_parses():
    req = payload.from_json(json.dumps(GOOD).encode(), LIMITS)
    assert req.image.shape == (48, 64, 3) and len(req.boxes) == 2 and req.keypoints[0][0] == "left thumb"


@bounded(200)
@given(mutated(GOOD))
def test_json_body_parses_or_raises_one_input_error(doc):
    req = _parses_or_one_line(payload.from_json, json.dumps(doc).encode(), LIMITS)
    if req is not None:
        assert req.image.dtype == np.uint8 and 1 <= len(req.boxes) <= LIMITS.max_boxes


@bounded(100)
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
@example(deep(100_000).encode())  # issue #23: was a RecursionError → HTTP 500
@example(b'{"image": "", "boxes": ' + deep(100_000).encode() + b"}")
@example(b"[" + b"[]," * 20_000 + b"[]]")
@example('{"image": "\u00e9"}'.encode("utf-16"))
@example(b'{"image": "x", "boxes": [[1e999, 0, 1, 1]]}')
def test_arbitrary_bytes_as_a_json_body(data):
    _parses_or_one_line(payload.from_json, data, LIMITS)


@bounded(150)
@given(image=hostile_image_bytes(), boxes=st.one_of(st.text(max_size=40), json_values.map(json.dumps)),
       keypoints=st.one_of(st.none(), st.text(max_size=40), json_values.map(json.dumps)))
@example(image=_png(), boxes="[[1, 2, 3, 4]]", keypoints=deep(100_000))
@example(image=_png(), boxes="[[1, 2, 3, 4]]", keypoints=json.dumps([{"name": "a", "description": "b" * 300}]))
@example(image=_png(), boxes="[[1, 2, 3, 4]]", keypoints=json.dumps([{"name": "a", "description": "b"}] * 6))
def test_multipart_fields_parse_or_raise_one_input_error(image, boxes, keypoints):
    _parses_or_one_line(payload.from_fields, image, boxes, keypoints, LIMITS)


@bounded(200)
@given(hostile_image_bytes())
@example(png_bomb(8_000, 8_000))
def test_image_bytes_decode_to_rgb_or_raise_one_input_error(data):
    rgb = _parses_or_one_line(payload.decode_image, data, LIMITS)
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_a_decompression_bomb_is_refused_before_decoding_and_names_the_flag():
    with pytest.raises(InputError, match=r"8000x8000 pixels; at most 50000000 .*--max-image-pixels"):
        payload.decode_image(png_bomb(8_000, 8_000))


def _depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    return 0


@bounded(300)
@given(json_values, st.sampled_from([" ", "", "\n"]))
@example({"a]": ['"[[[', "\\\"{", {"}": []}]}, " ")
def test_json_shape_guard_never_refuses_a_document_within_the_limits(value, sep):
    """Brackets, quotes and escapes inside strings are skipped: only real nesting counts."""
    text = json.dumps(value, separators=("," + sep, ":" + sep))
    depth = _depth(value)
    payload.check_json_shape(text, "body", payload.RequestLimits(max_json_depth=max(1, depth)))  # must not raise
    if depth >= 2:
        with pytest.raises(InputError, match="--max-json-depth"):
            payload.check_json_shape(text, "body", payload.RequestLimits(max_json_depth=depth - 1))


@pytest.mark.parametrize("value, message", [
    ([[1, 2, 3, 4]] * 9, "9 boxes in one request; at most 8 are accepted (--max-boxes)"),
    ('[[1, 2, 3, 4]]' + " " * 10, None),
    ({"x": 1}, "expected a non-empty list"),
])
def test_box_lists(value, message):
    if message is None:
        assert payload.parse_boxes(value, 64, 48, LIMITS) == [[1.0, 2.0, 3.0, 4.0]]
        return
    with pytest.raises(InputError) as err:
        payload.parse_boxes(value, 64, 48, LIMITS)
    assert message in str(err.value)


@pytest.mark.parametrize("value, message", [
    ([{"name": "a", "description": "b"}] * 6, "6 keypoints in one request; at most 5 are accepted (--max-keypoints)"),
    ([{"name": "a", "description": "b" * 200}], "201 characters; at most 200 are accepted (--max-keypoint-chars"),
    ([{"name": "a", "description": "b", "x": 1}], "unknown fields ['x']"),
    ([{"name": "a\0", "description": "b"}], "NUL character"),
])
def test_keypoint_lists(value, message):
    with pytest.raises(InputError) as err:
        payload.parse_keypoints(value, LIMITS)
    assert message in str(err.value)
