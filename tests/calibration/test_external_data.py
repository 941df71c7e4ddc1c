"""`quantize` and `calibrate` on a bundle whose graphs keep their weights in external data, as every 7B bundle does
(issue #24, item 0). A tiny bundle is forced to that layout by lowering the writers' threshold to 0; the commands
run through the CLI, as the README gives them, with calibration data and the PyTorch checkpoint."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tiny
from exporter.bundle import ExportConfig, export_bundle
from posellm_edge.cli import main as cli
from runtime.estimator import Estimator
from runtime.manifest import load_manifest

BOX = [[10, 20, 100, 150]]


@pytest.fixture(scope="module")
def external_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    from exporter import onnx_export
    out = tmp_path_factory.mktemp("ext") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        export_bundle(ExportConfig(tiny_checkpoint, out, precisions=("fp32", "fp16"), max_persons=3))
    v = load_manifest(out).variants["fp32"]
    assert v.decoder.external_data == ("fp32/decoder.onnx.data",), v.decoder.external_data
    return out


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    from training.data.synthetic import SyntheticConfig, generate_dataset
    return generate_dataset(SyntheticConfig(num_images=2, seed=7), tmp_path_factory.mktemp("coco") / "set")


def _no_leftovers(bundle: Path) -> None:
    left = sorted(p.name for p in bundle.rglob(".*") if p.is_file())
    assert left == [], f"temporary graphs left in the bundle: {left}"


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_with_calibration_data_on_external_data(external_bundle, coco, tiny_checkpoint, tmp_path,
                                                         monkeypatch, method):
    """The activation tap (GPTQ) and the validation sessions load a decoder whose weights are external data: the
    derived graphs live beside it (onnxruntime refuses external data outside a model's folder)."""
    from calibration import form_writer
    monkeypatch.setattr(form_writer, "EXTERNAL_DATA_THRESHOLD", 0)  # the variant too keeps its weights external
    bundle = tmp_path / "b"
    shutil.copytree(external_bundle, bundle)
    rc = cli(["quantize", str(bundle), "--bits", "4", "--block-size", "32", "--method", method, "--samples", "3",
              "--coco", str(coco / "person_keypoints.json"), "--images", str(coco / "images"),
              "--checkpoint", str(tiny_checkpoint), "--threads", "1"])
    assert rc == 0
    v = load_manifest(bundle).variants["int4"]
    print(f"{method}: int4 decoder files {v.decoder.file}, {v.decoder.external_data}")
    assert v.decoder.external_data == ("int4/decoder.onnx.data",)
    assert v.form("tensorrt").decoder.external_data == ("int4/decoder_qdq.onnx.data",)
    est = Estimator(bundle, precision="int4", decoding="template")
    assert len(est.estimate(tiny.random_image(5), BOX)[0].answers) == 17
    _no_leftovers(bundle)


def test_calibrate_on_external_data(external_bundle, coco, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(external_bundle, bundle)
    rc = cli(["calibrate", str(bundle), "--coco", str(coco / "person_keypoints.json"), "--images",
              str(coco / "images"), "--samples", "3"])
    assert rc == 0
    est = Estimator(bundle, precision="int8")
    assert len(est.estimate(tiny.random_image(6), BOX)[0].answers) == 17
    _no_leftovers(bundle)
