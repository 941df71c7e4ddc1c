"""Shared settings and checks of the property-based tests: deterministic (derandomized, no example database, so CI
runs the same examples every time), bounded in examples, no per-example deadline (a loaded CI machine must not
turn slowness into failures; the API fuzz bounds its own request time). POSELLM_FUZZ_SCALE=10 runs 10x more."""
from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("POSELLM_FUZZ_SCALE", "1"))


def bounded(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def assert_one_line(exc: BaseException) -> None:
    """The project's error contract: a non-empty message on one line."""
    text = str(exc)
    assert text.strip() and "\n" not in text, repr(text)


# any JSON value, small: what a hostile file or field may hold where the reader expects something else
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def deep(levels: int, open_: str = "[", close: str = "]") -> str:
    return open_ * levels + close * levels


@st.composite
def mutated(draw, doc):
    """`doc` (a JSON tree) with one node replaced, deleted or given an extra key: where readers trip."""
    doc = json.loads(json.dumps(doc))
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
    walk(doc, ())
    path = draw(st.sampled_from(paths))
    if not path:
        return draw(json_values)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "extra"]))
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return doc
