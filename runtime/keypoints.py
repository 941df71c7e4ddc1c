"""The 17 COCO keypoints: names (COCO order), LocLLM/PoseLLM descriptions (paper Table 1) and the skeleton."""
from __future__ import annotations

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left eye", "right eye", "left ear", "right ear", "left shoulder", "right shoulder", "left elbow",
    "right elbow", "left wrist", "right wrist", "left hip", "right hip", "left knee", "right knee", "left ankle",
    "right ankle",
)

KEYPOINT_DESCRIPTIONS: dict[str, str] = {
    "nose": "The nose is the central, protruding feature on their face, located just above the upper lip.",
    "left eye": "The left eye is the visual organ on the left side of their face, typically located above the "
                "left cheek and beside the nose.",
    "right eye": "The right eye is the visual organ on the right side of their face, typically located above the "
                 "right cheek and beside the nose.",
    "left ear": "The left ear is the auditory organ on the left side of their head, typically located to the side "
                "of the left temple.",
    "right ear": "The right ear is the auditory organ on the right side of their head, typically located to the "
                 "side of the right temple.",
    "left shoulder": "The left shoulder is the joint connecting the left arm and the torso, typically situated on "
                     "the upper left side of the chest.",
    "right shoulder": "The right shoulder is the joint connecting the right arm and the torso, typically situated "
                      "on the upper right side of the chest.",
    "left elbow": "The left elbow is the joint connecting the left upper arm and the left forearm, typically "
                  "situated in the middle of the left arm, between left shoulder and left wrist.",
    "right elbow": "The right elbow is the joint connecting the right upper arm and the right forearm, typically "
                   "situated in the middle of the right arm, between right shoulder and right wrist.",
    "left wrist": "The left wrist is the joint connecting the left forearm and the left hand, typically located at "
                  "the base of the left hand.",
    "right wrist": "The right wrist is the joint connecting the right forearm and the right hand, typically located "
                   "at the base of the right hand.",
    "left hip": "The left hip is the joint connecting the left thigh to the pelvis, typically located on the left "
                "side of the lower torso.",
    "right hip": "The right hip is the joint connecting the right thigh to the pelvis, typically located on the "
                 "right side of the lower torso.",
    "left knee": "The left knee is the joint connecting the left thigh and the left lower leg, typically situated "
                 "in the middle of the left leg, it is located between the left hip and left ankle.",
    "right knee": "The right knee is the joint connecting the upper leg and lower leg on the right side, it is "
                  "located between the right hip and right ankle.",
    "left ankle": "The left ankle is the joint connecting the left lower leg and the left foot, typically located "
                  "at the base of the left leg.",
    "right ankle": "The right ankle is the joint connecting the right lower leg and the right foot, typically "
                   "located at the base of the right leg.",
}

# COCO skeleton as 0-based index pairs (for drawing).
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

# Left/right pairs (0-based), for flip augmentation.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def standard_keypoints() -> list[tuple[str, str]]:
    return [(name, KEYPOINT_DESCRIPTIONS[name]) for name in KEYPOINT_NAMES]
