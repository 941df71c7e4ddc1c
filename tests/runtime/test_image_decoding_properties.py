"""Property tests of image decoding (runtime.image_io.load_image, the CLI's reader): valid files in every odd mode
and format, truncated and corrupted copies, decompression bombs and arbitrary bytes either decode to uint8 RGB or
raise InputError in one line. The service's decoder (serve.payload.decode_image) has its own test in tests/serve."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given

from benchmarks.fuzz_inputs import hostile_image_bytes, png_bomb
from fuzzing import assert_one_line, bounded
from runtime.errors import InputError
from runtime.image_io import load_image

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # Pillow on corrupt EXIF/TIFF tags: expected here
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]


@bounded(200)
@given(hostile_image_bytes())
@example(png_bomb(100_000, 100_000))  # 10^10 pixels: Pillow's own bomb check
@example(b"")
def test_load_image_decodes_to_rgb_or_raises_input_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image"
        path.write_bytes(data)
        try:
            rgb = load_image(path)
        except InputError as exc:
            assert_one_line(exc)
            return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
