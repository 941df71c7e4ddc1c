"""A real bundle of the shipped small model (3 persons per batch, so cross-request batches fill quickly) and
synthetic test images encoded as JPEG, as clients would send them."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from training.data.synthetic import SyntheticConfig, render_image

MODEL = Path(__file__).resolve().parents[2] / "models" / "posellm-small"
MAX_PERSONS = 3


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory) -> Path:
    from exporter.bundle import ExportConfig, export_bundle
    out = tmp_path_factory.mktemp("serve-bundle") / "small"
    # graph-vs-PyTorch validation is the export tests' job; here the bundle only has to be real
    export_bundle(ExportConfig(MODEL, out, precisions=("fp32",), max_persons=MAX_PERSONS, validate=False),
                  log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def scenes() -> list[tuple[bytes, list[list[float]]]]:
    """Six synthetic images (JPEG bytes) with their person boxes (1-3 each)."""
    cfg = SyntheticConfig(num_images=6, seed=4242)
    out = []
    for i in range(cfg.num_images):
        image, persons = render_image(cfg, i)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        out.append((buf.getvalue(), [[float(v) for v in p["bbox"]] for p in persons]))
    return out
