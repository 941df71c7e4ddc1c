"""Paths named by a manifest or an ONNX graph's external data stay inside the bundle (runtime.paths)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

import tiny
from runtime.errors import BundleError
from runtime.estimator import Estimator
from runtime.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file, write_manifest
from runtime.onnx_external import external_data_locations
from runtime.paths import UnsafePathError, inside


def test_inside(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.bin").write_bytes(b"x")
    assert inside(tmp_path, "a/f.bin", "t") == tmp_path.resolve() / "a/f.bin"
    (tmp_path / "a" / "out").symlink_to(tmp_path.parent)
    for name, why in [("../f", "'..'"), ("a/../../f", "'..'"), ("/etc/passwd", "absolute"), ("C:\\x", "absolute"),
                      ("a/out/x", "outside"), ("", "not a file name")]:
        with pytest.raises(UnsafePathError, match=why):
            inside(tmp_path / "a" if name == "../f" else tmp_path, name, "t")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    edit(data)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("field,value,why", [
    ("embedding", "../embed_tokens.npy", "'..'"),
    ("embedding", "/tmp/embed_tokens.npy", "absolute"),
    ("tokenizer", "../../etc/passwd", "'..'"),
    ("files", "../outside.bin", "'..'"),
])
def test_manifest_paths_outside_the_bundle_are_refused(tiny_bundle, tmp_path, field, value, why):
    bundle = _copy(tiny_bundle, tmp_path)

    def edit(data: dict) -> None:
        if field == "embedding":
            data["variants"]["fp32"]["embedding"] = value
        elif field == "tokenizer":
            data["tokenizer"] = value
        else:
            data["files"][value] = "0" * 64

    _edit_manifest(bundle, edit)
    for verify in (True, False):  # path checks run even when hashing is skipped
        with pytest.raises(BundleError, match=why) as err:
            load_manifest(bundle, verify=verify)
    print(err.value)
    assert value in str(err.value) and "\n" not in str(err.value)


def test_manifest_path_symlinked_out_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    table = bundle / "fp32" / "embed_tokens.npy"
    table.rename(tmp_path / "stolen.npy")
    table.symlink_to(tmp_path / "stolen.npy")
    with pytest.raises(BundleError, match="outside"):
        Estimator(bundle)


def _externalize(graph: Path, location: str, data_file: Path) -> None:
    """Move the graph's largest initializer to `data_file`, recorded under `location` (as a crafted file would)."""
    model = onnx.load(str(graph))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data_file.write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    graph.write_bytes(model.SerializeToString())


def _rehash(bundle: Path, extra: tuple[str, ...] = ()) -> None:
    m = Manifest.from_json((bundle / MANIFEST_NAME).read_text())  # no checks: the test is about what they find
    files = {rel: sha256_file(bundle / rel) for rel in [*m.files, *extra]}
    write_manifest(bundle, dataclasses.replace(m, files=files))


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "unlisted"])
def test_external_data_outside_or_unlisted_is_refused(tiny_bundle, tmp_path, case):
    bundle = _copy(tiny_bundle, tmp_path)
    graph = bundle / "fp32" / "decoder.onnx"
    outside = tmp_path / "outside.data"
    location = {"dotdot": "../../outside.data", "absolute": str(outside), "symlink": "w.data",
                "unlisted": "w.data"}[case]
    _externalize(graph, location, outside if case != "unlisted" else graph.parent / "w.data")
    if case == "symlink":
        (graph.parent / "w.data").symlink_to(outside)
    _rehash(bundle)
    why = {"dotdot": "'..'", "absolute": "absolute", "symlink": "outside", "unlisted": "not a file the manifest"}
    with pytest.raises(BundleError, match=why[case]) as err:
        Estimator(bundle)
    print(err.value)
    assert "external data" in str(err.value) and "\n" not in str(err.value)


def test_listed_external_data_runs_and_matches_inline(tiny_bundle, tmp_path):
    """No false alarm: a decoder whose weights live in a listed external file loads and gives the same answers."""
    bundle = _copy(tiny_bundle, tmp_path)
    graph = bundle / "fp32" / "decoder.onnx"
    _externalize(graph, "decoder.onnx.data", graph.parent / "decoder.onnx.data")
    assert external_data_locations(graph) == ["decoder.onnx.data"]
    _rehash(bundle, extra=("fp32/decoder.onnx.data",))
    image = tiny.random_image(3)
    boxes = [[10, 20, 100, 150]]
    a = Estimator(tiny_bundle, decoding="free").estimate(image, boxes)
    b = Estimator(bundle, decoding="free").estimate(image, boxes)
    assert a[0].tokens == b[0].tokens and np.array_equal(a[0].keypoints, b[0].keypoints)


def test_locations_agree_with_onnx(tmp_path):
    """The wire-format reader finds exactly what onnx's own helper reports, for initializers and Constant nodes."""
    big = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    const = onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
        np.ones((32, 32), np.float32), "cv"))
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph([const, node], "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 64])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [1, 64])], [big])
    model = onnx.helper.make_model(graph)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    expected = sorted({external_data_helper.ExternalDataInfo(t).location
                       for t in external_data_helper._get_all_tensors(loaded)
                       if external_data_helper.uses_external_data(t)})
    assert len(expected) == 2
    assert external_data_locations(tmp_path / "m.onnx") == expected


def test_unreadable_graph_is_a_bundle_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(BundleError, match="cannot read as an ONNX model"):
        external_data_locations(tmp_path / "bad.onnx")
