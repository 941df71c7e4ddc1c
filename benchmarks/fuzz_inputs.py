"""Hypothesis strategies for what a stranger sends: real images in odd modes and formats, their truncated and
corrupted copies, decompression bombs (a tiny file declaring a huge image), and arbitrary bytes. Shared by the
property tests (tests/) and the long API fuzz run (benchmarks/api_fuzz.py)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st
from PIL import Image

# (mode, formats that can store it): every mode the service's decoder must turn into RGB or refuse in one line
MODES = {
    "RGB": ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"), "L": ("PNG", "JPEG", "BMP", "GIF", "TIFF"),
    "RGBA": ("PNG", "WEBP", "TIFF"), "P": ("PNG", "GIF", "BMP", "TIFF"), "1": ("PNG", "BMP", "TIFF"),
    "LA": ("PNG", "TIFF"), "I;16": ("PNG", "TIFF"), "I": ("TIFF",), "F": ("TIFF",), "CMYK": ("JPEG", "TIFF"),
    "YCbCr": ("JPEG", "TIFF"),
}


@st.composite
def image_files(draw, max_side: int = 40, min_side: int = 1) -> bytes:
    """A valid small image file: random pixels in one of MODES, saved in a format that holds that mode."""
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    w, h = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    seed = draw(st.integers(0, 2**16))
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(rgb).convert(mode) if mode not in ("I;16", "I", "F") else \
        Image.fromarray(rgb[:, :, 0].astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]) * 200)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header declares width x height: tiny bytes, a huge decode if nothing checks."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # keep bit depth, colour type, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@st.composite
def corrupted(draw, files: st.SearchStrategy[bytes]) -> bytes:
    """A valid file cut short, or with a few bytes overwritten (headers included)."""
    data = bytearray(draw(files))
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


def hostile_image_bytes() -> st.SearchStrategy[bytes]:
    files = image_files()
    bombs = st.builds(png_bomb, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
    return st.one_of(files, corrupted(files), bombs, st.binary(max_size=512))


@st.composite
def near_valid_requests(draw, max_boxes: int = 6, max_keypoints: int = 20) -> dict:
    """A pose request that is valid or nearly so — a decodable image, boxes around, across and off its edges, an
    optional custom keypoint set with arbitrary Unicode, long descriptions included — so that generated requests
    reach cropping, tokenization and inference, not only the parsers. Returns the JSON body plus `tokens`."""
    data = draw(image_files(min_side=8))
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    # fractions of the image: first boxes well inside it (Hypothesis starts from the first branch), then anywhere
    inside = st.tuples(st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0.25, 0.5), st.floats(0.25, 0.5))
    anywhere = st.tuples(*[st.floats(-1.5, 1.5)] * 2, *[st.floats(0.001, 2.0)] * 2)
    boxes = draw(st.lists(st.one_of(inside, anywhere).map(
        lambda b: [round(b[0] * w, 3), round(b[1] * h, 3), round(b[2] * w, 3), round(b[3] * h, 3)]),
        min_size=1, max_size=max_boxes))
    doc = {"image": data, "boxes": boxes}
    if draw(st.booleans()):
        text = st.text(min_size=1, max_size=30)
        doc["keypoints"] = draw(st.lists(st.fixed_dictionaries(
            {"name": text, "description": st.one_of(text, st.text(min_size=1, max_size=1500))}),
            min_size=1, max_size=max_keypoints))
    return {"doc": doc, "tokens": draw(st.booleans()), "multipart": draw(st.booleans())}
