"""Calibration data: real person crops from a COCO file and the decoder inputs they induce.

Vision inputs are the exact crops the runtime makes (`runtime.preprocess`, LocLLM's affine and normalisation) from
the file's ground-truth person boxes. Decoder inputs come from driving the bundle's fp32 graphs the way the runtime
does (vision once per person, prefix prefill, keypoint-suffix prefill); they are recorded and hashed so the
calibration artifact says exactly what was used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from runtime.backends.base import GraphRunner
from runtime.coco import read_coco_persons
from runtime.errors import InputError
from runtime.image_io import load_image
from runtime.preprocess import CropSpec, crop_at_center_scale


@dataclass(frozen=True, eq=False)
class PersonCrops:
    """Normalised crops [N, 3, S, S] of N COCO person instances and where each came from."""

    pixel_values: np.ndarray
    sources: tuple[dict[str, Any], ...]  # per crop: image file, image id, annotation id
    available: int  # person instances in the annotation file (after LocLLM's filtering)

    @property
    def sha256(self) -> str:
        return array_sha256(self.pixel_values)


def array_sha256(*arrays: np.ndarray) -> str:
    """Hash of dtype, shape and bytes of each array in order (the calibration data's identity)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_person_crops(coco: Path, images: Path, samples: int, seed: int, spec: CropSpec) -> PersonCrops:
    """Crop `samples` person instances (a seeded random subset, kept in file order) from a COCO keypoint file."""
    records = read_coco_persons(coco)
    if not records:
        raise InputError(f"{coco}: no person instance with labelled keypoints; calibration needs real crops")
    if not Path(images).is_dir():
        raise InputError(f"--images {images}: not a directory (expected the folder holding the COCO images)")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(records))[:samples])
    crops, sources = [], []
    image, image_name = None, None
    for i in chosen:  # sorted, so each image file is read once
        r = records[int(i)]
        if r.file_name != image_name:
            image, image_name = load_image(Path(images) / r.file_name), r.file_name
        crops.append(crop_at_center_scale(image, r.center, r.scale, spec))
        sources.append({"file_name": r.file_name, "image_id": r.image_id, "ann_id": r.ann_id})
    return PersonCrops(np.stack(crops).astype(np.float32), tuple(sources), len(records))


class VisionReader(CalibrationDataReader):
    """onnxruntime calibration reader over the crops, `batch` crops per inference.

    Supports `set_range`, so onnxruntime's strided collection (extra option `CalibStridedMinMax`) can build the
    histograms one batch at a time instead of holding every intermediate tensor of the whole set in memory.
    """

    def __init__(self, pixel_values: np.ndarray, batch: int, input_name: str = "pixel_values") -> None:
        self.batches = [pixel_values[i:i + batch] for i in range(0, len(pixel_values), batch)]
        self.input_name = input_name
        self.start, self.end = 0, len(self.batches)
        self.pos = self.start

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        self.pos += 1
        return {self.input_name: self.batches[self.pos - 1]}

    def rewind(self) -> None:
        self.pos = self.start

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.batches))
        self.pos = self.start


class RecordingRunner(GraphRunner):
    """Wraps a decoder runner and keeps a copy of the non-cache inputs of every call (the induced decoder data)."""

    RECORDED = ("inputs_embeds", "attention_mask", "position_ids")

    def __init__(self, inner: GraphRunner) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.check = False  # the inner runner checks
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, Any], keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        self.calls.append({k: np.array(inputs[k]) for k in self.RECORDED})
        return self.inner(inputs, keep_on_device)

    def to_numpy(self, value: Any) -> np.ndarray:
        return self.inner.to_numpy(value)

    @property
    def sha256(self) -> str:
        return array_sha256(*[c[k] for c in self.calls for k in self.RECORDED])

    def summary(self) -> list[dict[str, Any]]:
        return [{k: list(c[k].shape) for k in self.RECORDED} for c in self.calls]
