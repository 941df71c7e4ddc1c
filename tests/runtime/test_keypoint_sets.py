"""Named keypoint sets (LocLLM `datasets/constants.py`) through the Python API, `run --keypoint-set` and serve."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tiny
from runtime.errors import InputError
from runtime.estimator import Estimator
from runtime.keypoint_sets import KEYPOINT_SETS, keypoint_set
from serve import payload

FIXTURE = tiny.SHARED / "fixtures" / "locllm_keypoints.json"


@pytest.mark.skipif(not FIXTURE.exists(), reason="../shared/fixtures/locllm_keypoints.json is absent")
def test_sets_are_locllms_strings_exactly():
    ref = json.loads(FIXTURE.read_text())
    assert set(KEYPOINT_SETS) == set(ref["sets"])
    for name, names in ref["sets"].items():
        assert [n for n, _ in keypoint_set(name)] == names, name
        assert [d for _, d in keypoint_set(name)] == [ref["descriptions"][n] for n in names], name


def test_set_sizes_and_names_as_written():
    assert [len(keypoint_set(s)) for s in ("coco", "mpii", "h36m")] == [17, 16, 17]
    assert keypoint_set("mpii")[9][0] == "head_top"  # LocLLM asks with the underscore
    with pytest.raises(InputError, match="'mpi'.*coco"):
        keypoint_set("mpi")


def test_estimator_accepts_a_set_name(tiny_bundle):
    est = Estimator(tiny_bundle)
    names, suffixes = est.queries("mpii")
    assert names == list(KEYPOINT_SETS["mpii"])
    assert suffixes == [est.tokenizer.suffix_ids(n, d) for n, d in keypoint_set("mpii")]
    assert est.queries("coco") == est.queries(None)  # the bundle's own pre-tokenized 17
    res = est.estimate(tiny.random_image(3), [[10, 20, 100, 150]], keypoints="h36m")
    assert res[0].names == KEYPOINT_SETS["h36m"] and res[0].keypoints.shape == (17, 3)
    with pytest.raises(InputError, match="'body'"):
        est.queries("body")


def test_cli_run_keypoint_set(tiny_bundle, tmp_path):
    from PIL import Image
    Image.fromarray(tiny.random_image(6)).save(tmp_path / "img.png")
    base = [sys.executable, "-m", "posellm_edge.cli", "run", str(tiny_bundle), "--image", str(tmp_path / "img.png"),
            "--box", "10,20,100,150"]
    r = subprocess.run(base + ["--keypoint-set", "mpii", "--json", str(tmp_path / "o.json")], capture_output=True,
                       text=True, cwd=tiny.REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o.json").read_text())["persons"][0]["keypoint_names"] == list(KEYPOINT_SETS["mpii"])
    r = subprocess.run(base + ["--keypoint-set", "mpii", "--keypoint", "nose: The nose."], capture_output=True,
                       text=True, cwd=tiny.REPO, timeout=300)
    assert r.returncode == 2 and "--keypoint-set mpii" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_payload_accepts_a_set_name():
    limits = payload.RequestLimits()
    assert payload.parse_keypoints("mpii", limits) == tuple(keypoint_set("mpii"))
    assert payload.parse_keypoints('"h36m"', limits) == tuple(keypoint_set("h36m"))  # multipart: JSON text
    with pytest.raises(InputError, match="unknown keypoint set"):
        payload.parse_keypoints('"lsp"', limits)
