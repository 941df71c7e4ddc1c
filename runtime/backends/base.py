"""The graph-runner interface and input checking against the manifest's graph description."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from ..manifest import GraphSpec


def check_inputs(spec: GraphSpec, inputs: Mapping[str, Any]) -> None:
    """Names, dtypes, ranks, fixed dims and dynamic-dim ranges, checked before the engine sees them."""
    expected = {t.name: t for t in spec.inputs}
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InputError(f"{spec.file}: inputs missing {missing}, unexpected {extra}")
    sizes: dict[str, int] = {}
    for name, t in expected.items():
        value = inputs[name]
        shape = tuple(value.shape() if callable(getattr(value, "shape", None)) else value.shape)
        dtype = value.data_type() if hasattr(value, "data_type") else str(value.dtype)
        if isinstance(dtype, str) and dtype.startswith("tensor("):  # OrtValue: tensor(float16)
            dtype = {"float": "float32"}.get(dtype[7:-1], dtype[7:-1])
        if dtype != t.dtype:
            raise InputError(f"{spec.file}: input {name} has dtype {dtype}, expected {t.dtype}")
        if len(shape) != len(t.shape):
            raise InputError(f"{spec.file}: input {name} has shape {shape}, expected rank {len(t.shape)} {t.shape}")
        for size, dim in zip(shape, t.shape):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(f"{spec.file}: input {name} has shape {shape}, expected {t.shape}")
                continue
            if sizes.setdefault(dim, size) != size:
                raise InputError(f"{spec.file}: dim {dim!r} is {sizes[dim]} in one input and {size} in {name}")
            lo, hi = spec.dynamic_ranges.get(dim, (0, None))
            if size < lo or (hi is not None and size > hi):
                raise InputError(f"{spec.file}: input {name} dim {dim!r}={size} outside the exported range "
                                 f"[{lo}, {hi}]; re-export with larger limits (--max-persons/--max-context)")


class GraphRunner(ABC):
    """Runs one graph. `run` takes numpy arrays (or the backend's device values) and returns outputs by name."""

    spec: GraphSpec
    check: bool = True

    def __call__(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        if self.check:
            check_inputs(self.spec, inputs)
        return self.run(inputs, keep_on_device)

    @abstractmethod
    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        """Outputs named in `keep_on_device` stay backend-native (device memory); the rest come back as numpy."""

    def to_numpy(self, value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else np.asarray(value.numpy())

    def input_limit(self, name: str, axis: int) -> int | None:
        """The largest size the engine accepts for an input dim when below the graph's exported range (a TensorRT
        engine built with `--max-persons`); None: the exported range applies."""
        return None


class Stopwatch:
    """Accumulates wall time per stage (thread-local use: one per estimate call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # decoder passes, draft digits offered/accepted (speculative decoding)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.watch.seconds[self.name] = self.watch.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0
