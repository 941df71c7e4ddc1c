"""COCO person-keypoint ground truth reader (json stdlib only; no pycocotools on the edge).

Reproduces the instance list of LocLLM ``COCODataset.__init__`` (SPEC section 4): images in file order,
their non-crowd annotations in file order, sanitised boxes with ``area > 0``, category 1 only, and only
instances with at least one labelled keypoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .paths import relative_name
from .preprocess import Box, box_to_center_scale, sanitize_box

__all__ = ["NUM_KEYPOINTS", "PersonRecord", "read_coco_persons"]

NUM_KEYPOINTS = 17  # COCO person keypoints


@dataclass(frozen=True, eq=False)
class PersonRecord:
    """One evaluated person instance: where to crop it and its ground-truth keypoints."""

    image_id: int
    file_name: str
    width: int
    height: int
    box: Box  # sanitised [x, y, w, h] (do not sanitise again: sanitation shrinks w, h by 1)
    center: np.ndarray  # float32 [2]
    scale: np.ndarray  # float32 [2]
    keypoints: np.ndarray  # float32 [17, 3]: x, y, COCO visibility flag v (0, 1, 2; LocLLM clips v to 1)
    area: float
    ann_id: int
    raw_box: Box | None = None  # the file's bbox: what crop_person / crop_persons expect (they sanitise)


def read_coco_persons(ann_path: str | os.PathLike) -> list[PersonRecord]:
    """Read a COCO keypoint annotation file and return LocLLM's evaluation instances in LocLLM's order."""
    name = os.fspath(ann_path)
    try:
        with open(name, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"COCO annotation file {name!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read COCO annotation file {name!r}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"COCO annotation file {name!r} is not valid JSON: {exc}") from exc
    except RecursionError:  # the stdlib parser recurses once per nesting level
        raise InputError(f"COCO annotation file {name!r} nests arrays/objects too deeply to parse") from None
    if not isinstance(data, dict):
        raise InputError(f"COCO annotation file {name!r} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise InputError(f"COCO annotation file {name!r} needs a list under key {key!r}")

    # pycocotools index: images keyed by id (first position wins the order), annotations grouped per image.
    images: dict[Any, Mapping[str, Any]] = {}
    for img in data["images"]:
        images[_id(_get(img, "id", name, "image"), name, "an image's id")] = img
    anns_by_image: dict[Any, list[Mapping[str, Any]]] = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(_id(_get(ann, "image_id", name, "annotation"), name, "an annotation's image_id"),
                                 []).append(ann)

    records: list[PersonRecord] = []
    for image_id, img in images.items():
        width = _number(_get(img, "width", name, f"image {image_id}"), name, f"image {image_id} width", integer=True)
        height = _number(_get(img, "height", name, f"image {image_id}"), name, f"image {image_id} height",
                         integer=True)
        # sub-directories are fine (Human-Art: images/<scenario>/...); `..` or an absolute name is refused
        file_name = relative_name(str(_get(img, "file_name", name, f"image {image_id}")),
                                  f"{name}: image {image_id} file_name", "the images folder", InputError)
        for ann in anns_by_image.get(image_id, []):
            record = _person_record(ann, image_id, file_name, width, height, name)
            if record is not None:
                records.append(record)
    return records


def _person_record(
    ann: Mapping[str, Any], image_id: Any, file_name: str, width: int, height: int, source: str
) -> PersonRecord | None:
    ann_id = _get(ann, "id", source, f"an annotation of image {image_id}")
    where = f"annotation {ann_id}"
    if _get(ann, "iscrowd", source, where) != 0:  # getAnnIds(iscrowd=False) keeps iscrowd == 0 / False
        return None
    bbox = _get(ann, "bbox", source, where)
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        raise InputError(f"{source}: {where} has bbox {_short(bbox)}; expected [x, y, w, h] (four numbers)")
    box = sanitize_box(bbox, width, height)
    area = _number(_get(ann, "area", source, where), source, f"{where} area")
    if box is None or not area > 0:
        return None
    if _get(ann, "category_id", source, where) != 1:
        return None
    kpts = _get(ann, "keypoints", source, where)
    if not isinstance(kpts, (list, tuple)) or len(kpts) != 3 * NUM_KEYPOINTS or not all(map(_is_number, kpts)):
        raise InputError(f"{source}: {where} needs {3 * NUM_KEYPOINTS} keypoint values (numbers), got "
                         f"{_short(kpts)}")
    if max(kpts) == 0:  # LocLLM: `if max(obj['keypoints']) == 0: continue` (no labelled keypoint)
        return None
    center, scale = box_to_center_scale(box)
    return PersonRecord(
        image_id=image_id, file_name=file_name, width=width, height=height, box=box, center=center,
        scale=scale, keypoints=np.asarray(kpts, dtype=np.float32).reshape(NUM_KEYPOINTS, 3), area=area,
        ann_id=ann_id, raw_box=tuple(float(v) for v in bbox),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, source: str, what: str, integer: bool = False) -> Any:
    """A JSON number (an integer where `integer`) or InputError naming the file and the field."""
    if not _is_number(value) or (integer and not float(value).is_integer()):
        raise InputError(f"{source}: {what} is {_short(value)}; expected {'an integer' if integer else 'a number'}")
    return int(value) if integer else float(value)


def _id(value: Any, source: str, what: str) -> Any:
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise InputError(f"{source}: {what} is {_short(value)}; expected an integer or a string")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _get(obj: Any, key: str, source: str, where: str) -> Any:
    """Dictionary lookup whose failure names the file, the entry and the missing key."""
    if not isinstance(obj, Mapping):
        raise InputError(f"{source}: {where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise InputError(f"{source}: {where} has no key {key!r}")
    return obj[key]
