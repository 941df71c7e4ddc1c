"""The MPII benchmark of `posellm-edge eval`: LocLLM's zero-shot protocol (the 16 MPII joints asked by name with
the `mpii` keypoint set, GT centre/scale crops, no flip) scored with PCKh, and LocLLM's `pred_kpt.json`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.errors import InputError

from .mpii_data import MpiiGroundTruth, MpiiPerson, read_gt_valid, read_mpii_persons
from .pckh import COLUMNS, pckh_table


@dataclass(frozen=True)
class MpiiBenchmark:
    persons: tuple[MpiiPerson, ...]
    gt: MpiiGroundTruth
    keypoints: str = "mpii"  # LocLLM's MPII_KEYPOINT_NAME with its descriptions
    primary: str = "Mean"
    columns: tuple[str, ...] = COLUMNS
    predictions_file: str = "pred_kpt.json"  # LocLLM's name and format

    @classmethod
    def load(cls, valid: Path, headboxes: Path, max_images: int | None = None) -> "MpiiBenchmark":
        persons = read_mpii_persons(valid)
        gt = read_gt_valid(headboxes, len(persons))
        if max_images:  # the persons of the first images, and their columns of gt_valid.mat
            keep = set(list(OrderedDict.fromkeys(p.file_name for p in persons))[:max_images])
            persons = [p for p in persons if p.file_name in keep]
            ids = [p.ins_id for p in persons]
            gt = MpiiGroundTruth(gt.pos_gt[:, :, ids], gt.visible[:, ids], gt.headboxes[:, :, ids])
            persons = [replace(p, ins_id=i) for i, p in enumerate(persons)]
        return cls(tuple(persons), gt)

    def describe(self) -> str:
        return f"{len(self.by_image())} images, {len(self.persons)} persons (MPII, 16 joints by name)"

    def by_image(self) -> "OrderedDict[str, list[MpiiPerson]]":
        groups: OrderedDict[str, list[MpiiPerson]] = OrderedDict()
        for p in self.persons:
            groups.setdefault(p.file_name, []).append(p)
        return groups

    @staticmethod
    def prediction(person: MpiiPerson, result) -> dict:
        """LocLLM's pred_kpt.json entry: 16 × (x, y, score), 0-based image pixels."""
        if result.keypoints.shape != (16, 3):
            raise InputError(f"MPII needs 16 keypoints per person, got {result.keypoints.shape[0]}")
        return {"ins_id": int(person.ins_id), "score": float(result.score),
                "keypoints": [float(v) for v in result.keypoints.reshape(-1)]}

    def metrics(self, predictions: list[dict]) -> dict:
        return pckh_table(predictions_array(predictions, self.gt.count), self.gt)


def predictions_array(predictions: list[dict], count: int) -> np.ndarray:
    """pred_kpt.json entries → [N, 16, 2] by ins_id (LocLLM: `preds[ins_id] = keypoints[:, :2]`)."""
    pred = np.zeros((count, 16, 2))
    seen = set()
    for p in predictions:
        i = p["ins_id"]
        if not (isinstance(i, int) and 0 <= i < count) or i in seen:
            raise InputError(f"prediction ins_id {i!r}: expected each of 0..{count - 1} once")
        seen.add(i)
        pred[i] = np.asarray(p["keypoints"], dtype=np.float64).reshape(16, 3)[:, :2]
    if len(seen) != count:
        raise InputError(f"{count - len(seen)} of {count} persons have no prediction")
    return pred
