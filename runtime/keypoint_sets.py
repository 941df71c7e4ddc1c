"""LocLLM's named keypoint sets (`datasets/constants.py`): `coco` (17), `mpii` (16), `h36m` (17).

Names and descriptions are model inputs, so they are LocLLM's strings as written: MPII asks for `head_top` (with
the underscore), H36M for `torso`. The order is each dataset's joint order, which the evaluators index by position.
"""
from __future__ import annotations

from .errors import InputError
from .keypoints import KEYPOINT_DESCRIPTIONS, KEYPOINT_NAMES

__all__ = ["DESCRIPTIONS", "KEYPOINT_SETS", "SET_NAMES", "keypoint_set", "resolve_keypoints"]

# LocLLM's descriptions beyond the 17 COCO ones (the zero-shot joints of MPII and H36M).
_EXTRA_DESCRIPTIONS = {
    "neck": "The neck is the part of the body connecting the head to the torso, typically situated between the "
            "shoulders.",
    "torso": "The torso is the central part of the body, typically encompassing the chest, abdomen, and back.",
    "pelvis": "The pelvis is the bony structure that forms the base of the spine and connects the torso to the lower "
              "body, typically located between the left hip and right hip.",
    "left toe": "The left toe is located at the end of the left foot, typically at the front or tip of the foot.",
    "right toe": "The right toe is the digit located at the end of the right foot, typically at the front or tip of "
                 "the foot.",
    "head_top": "The head_top keypoint is the highest point on their head, typically at the crown.",
    "thorax": "The thorax is the central part of the torso, typically located between the neck and the abdomen.",
}
DESCRIPTIONS: dict[str, str] = {**KEYPOINT_DESCRIPTIONS, **_EXTRA_DESCRIPTIONS}

KEYPOINT_SETS: dict[str, tuple[str, ...]] = {
    "coco": KEYPOINT_NAMES,
    "mpii": ("right ankle", "right knee", "right hip", "left hip", "left knee", "left ankle", "pelvis", "thorax",
             "neck", "head_top", "right wrist", "right elbow", "right shoulder", "left shoulder", "left elbow",
             "left wrist"),
    "h36m": ("pelvis", "right hip", "right knee", "right ankle", "left hip", "left knee", "left ankle", "torso",
             "neck", "nose", "head_top", "left shoulder", "left elbow", "left wrist", "right shoulder",
             "right elbow", "right wrist"),
}
SET_NAMES: tuple[str, ...] = tuple(KEYPOINT_SETS)


def keypoint_set(name: str) -> list[tuple[str, str]]:
    """(name, description) pairs of a named set, in its dataset's joint order."""
    if name not in KEYPOINT_SETS:
        raise InputError(f"keypoint set {name!r} is unknown; expected one of {list(SET_NAMES)}")
    return [(k, DESCRIPTIONS[k]) for k in KEYPOINT_SETS[name]]


def resolve_keypoints(keypoints) -> list[tuple[str, str]] | None:
    """None (the bundle's own 17), a set name, or (name, description) pairs → pairs or None."""
    if keypoints is None:
        return None
    if isinstance(keypoints, str):
        return keypoint_set(keypoints)
    return [(str(n), str(d)) for n, d in keypoints]
