"""Image decoding for the runtime: files and untrusted bytes to RGB uint8 arrays, with Pillow only.

Every mode Pillow reads becomes RGB (gray replicated, alpha dropped, 16 bit by its high byte); whatever Pillow raises
on bytes it cannot decode is one of IMAGE_DECODE_ERRORS, which callers turn into a clear InputError.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

__all__ = ["IMAGE_DECODE_ERRORS", "ImageLike", "decode_pil", "ensure_rgb", "load_image"]

ImageLike = np.ndarray | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# What Pillow raises for bytes it cannot decode: unknown format, truncated data, a decompression bomb, and what its
# plugins let through from a crafted header: TypeError (a TIFF tag of the wrong type: found by the property tests,
# tests/runtime/test_image_decoding_properties.py), EOFError and struct.error (short reads in plugin headers).
IMAGE_DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError,
                       TypeError, EOFError, struct.error)


def decode_pil(fp, max_pixels: int | None = None, formats: Sequence[str] | None = None,
               limit_name: str | None = None) -> Image.Image:
    """Open and fully decode an image file (a path or a file object), so a truncated file fails here and not later;
    more than `max_pixels` is refused before decoding (InputError naming `limit_name`, the setting that raises it),
    and only `formats` (Pillow format names) are tried when given. Raises IMAGE_DECODE_ERRORS for unreadable
    data."""
    with Image.open(fp, formats=list(formats) if formats is not None else None) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise InputError(f"image is {im.width}x{im.height} pixels; at most {max_pixels} are accepted"
                             + (f" ({limit_name})" if limit_name else ""))
        im.load()
        return im.copy()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 HxWx3 RGB; EXIF orientation is ignored like cv2 IMREAD_IGNORE_ORIENTATION."""
    name = os.fspath(path)
    try:
        image = decode_pil(name)
    except FileNotFoundError:
        raise InputError(f"image file {name!r} does not exist") from None
    except IMAGE_DECODE_ERRORS as exc:
        raise InputError(f"cannot read image file {name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        return ensure_rgb(image)
    except InputError as exc:
        raise InputError(f"image file {name!r}: {exc}") from None


def ensure_rgb(image: ImageLike) -> np.ndarray:
    """Return a C-contiguous uint8 HxWx3 RGB array (the input itself when it already is one).

    Alpha is dropped without compositing and 16-bit data keeps its high byte, as cv2 IMREAD_COLOR does.
    Numpy arrays are taken to be RGB (not cv2's BGR).
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if not isinstance(image, np.ndarray):
        raise InputError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    arr = image
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)  # high byte, like libpng strip_16 in cv2
    elif arr.dtype != np.uint8:
        raise InputError(f"image array dtype {arr.dtype} is not supported; expected uint8 or uint16")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, :3]
    else:
        raise InputError(f"image array shape {arr.shape} is not supported; expected HxW, HxWx1, HxWx3 or HxWx4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"image has an empty shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "L", "RGBA", "RGBX"):
        return ensure_rgb(np.array(im))  # gray is replicated, the 4th channel dropped
    if mode in ("LA", "La"):
        return ensure_rgb(np.array(im)[:, :, 0])
    if mode == "1":
        return ensure_rgb(np.array(im.convert("L")))  # 0/255
    if mode in _SIXTEEN_BIT_MODES:
        # 16 bit -> 8 bit by the high byte (Pillow's convert("L") would clip at 255 instead).
        return ensure_rgb(np.clip(np.asarray(im).astype(np.int64), 0, 65535).astype(np.uint16))
    if mode == "F":
        raise InputError("32-bit float images (mode 'F') have no defined 8-bit range; convert to RGB first")
    try:  # P, PA, CMYK, YCbCr, LAB, HSV, RGBa: Pillow's own colour conversion
        return ensure_rgb(np.array(im.convert("RGB")))
    except ValueError as exc:
        raise InputError(f"image mode {mode!r} cannot be converted to RGB: {exc}") from exc
