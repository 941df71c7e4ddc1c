"""Property test of the shard index reader (`*.index.json` of a sharded checkpoint, someone else's file): any JSON
in it yields shard files inside the checkpoint or one CheckpointError line — never another exception type."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import assert_one_line, bounded, deep, mutated
from posellm.checkpoint import CheckpointError
from posellm.checkpoint_locllm import weight_files

INDEX = {"metadata": {"total_size": 8}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                       "b.weight": "model-00002-of-00002.safetensors"}}


def _weight_files(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in set(INDEX["weight_map"].values()):
            (root / name).write_bytes(b"x")
        (root / "model.safetensors.index.json").write_bytes(data)
        try:
            files = weight_files(root)
        except CheckpointError as exc:
            assert_one_line(exc)
            return None
        assert all(f.resolve().parent == root.resolve() for f in files)
        return [f.name for f in files]


def test_the_seed_index_names_both_shards_in_order():
    assert _weight_files(json.dumps(INDEX).encode()) == sorted(set(INDEX["weight_map"].values()))


@bounded(120)
@given(st.one_of(mutated(INDEX).map(lambda d: json.dumps(d).encode()), st.binary(max_size=100)))
@example(json.dumps({"weight_map": {"a": ["x"]}}).encode())  # an unhashable shard name
@example(json.dumps({"weight_map": {"a": "../outside.bin"}}).encode())
@example(deep(100_000).encode())
@example(b"\xff\xfe{")
def test_shard_index_parses_or_raises_one_checkpoint_error(data):
    _weight_files(data)
