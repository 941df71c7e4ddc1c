"""Property tests of the readers a stranger's file reaches: COCO annotation files, bundle manifests, image files.
Each either parses or raises the project's typed error (InputError / BundleError) with a one-line message — never
another exception type (a TypeError from `int([1])`, a RecursionError from 100 000 nested brackets, ...)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import assert_one_line, bounded, deep, json_values, mutated
from runtime.coco import read_coco_persons
from runtime.errors import BundleError, InputError, PoseLLMEdgeError
from runtime.manifest import MANIFEST_NAME, Manifest, load_manifest

KPTS = [10, 20, 2] * 17
COCO = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": "b", "file_name": "b.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 7, "image_id": 1, "iscrowd": 0, "bbox": [1, 2, 30, 40], "area": 900.0,
                         "category_id": 1, "keypoints": KPTS},
                        {"id": 8, "image_id": "b", "iscrowd": 0, "bbox": [5, 5, 50, 60], "area": 10,
                         "category_id": 1, "keypoints": KPTS}]}


def _read_coco(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_bytes(data)
        try:
            return read_coco_persons(path)
        except InputError as exc:
            assert_one_line(exc)
            return None


def test_the_seed_coco_file_parses():
    assert [r.ann_id for r in _read_coco(json.dumps(COCO).encode())] == [7, 8]


@bounded(150)
@given(mutated(COCO))
@example({**COCO, "images": [{"id": [1], "file_name": "a", "width": 1, "height": 1}]})  # unhashable id
@example({**COCO, "images": [{"id": 1, "file_name": "a", "width": "64", "height": 48}]})  # a string width
def test_coco_reader_parses_or_raises_input_error(doc):
    _read_coco(json.dumps(doc).encode())


@bounded(60)
@given(st.one_of(st.binary(max_size=200), st.builds(lambda d: json.dumps(COCO).encode()[:d], st.integers(0, 600))))
@example(deep(100_000).encode())
@example(b'{"images": ' + deep(50_000).encode() + b', "annotations": []}')
@example(b"\xff\xfe{}")
def test_coco_reader_on_arbitrary_bytes(data):
    _read_coco(data)


# -- manifests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_doc(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / MANIFEST_NAME).read_text())


def test_manifest_from_json_parses_or_raises_bundle_error(manifest_doc):
    assert Manifest.from_json(json.dumps(manifest_doc)).schema_version == manifest_doc["schema_version"]

    @bounded(150)
    @given(mutated(manifest_doc))
    def check(doc):
        try:
            Manifest.from_json(json.dumps(doc))
        except BundleError as exc:
            assert_one_line(exc)
    check()


@pytest.mark.parametrize("text", [deep(100_000), '{"schema_version": 3', "[1, 2]", '{"schema_version": 3}', "NaN"])
def test_manifest_from_json_refuses_odd_documents_in_one_line(text):
    with pytest.raises(BundleError) as err:
        Manifest.from_json(text)
    print(err.value)
    assert_one_line(err.value)


def test_load_manifest_on_a_mutated_bundle_parses_or_raises_bundle_error(tiny_bundle, manifest_doc, tmp_path):
    """The whole load (paths kept inside the bundle, external data listed) on a copy whose manifest is mutated;
    hashes are not checked (verify=False) so that the mutation, not a checksum, is what the loader meets."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)

    @bounded(40)
    @given(st.one_of(mutated(manifest_doc).map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
    @example(b"\xff\xfe\x00")
    def check(data):
        (bundle / MANIFEST_NAME).write_bytes(data)
        try:
            load_manifest(bundle, verify=False)
        except PoseLLMEdgeError as exc:
            assert_one_line(exc)
    check()
