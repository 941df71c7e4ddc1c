"""Provenance recorded in manifests and benchmark reports."""
from __future__ import annotations

from importlib import metadata

LIBRARIES = ("posellm-edge", "torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers",
             "numpy", "tensorrt")


def toolkit_version() -> str:
    try:
        return metadata.version("posellm-edge")
    except metadata.PackageNotFoundError:
        return "0+source"


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
