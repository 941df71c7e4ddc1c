"""Training samples for PoseLLM (LocLLM `datasets/coco.py` `_get_pose_item` / `_parse_data_item` semantics).

One sample = one person crop with LocLLM's augmentation (scale ×clip(N(1,sf),1-sf,1+sf), rotation U(-rf,rf) with
p=rot_prob, horizontal flip with left/right swap and mirrored centre) and a multi-round conversation: up to
`max_rounds` randomly chosen labelled keypoints inside the crop, tokenized with PromptTokenizer exactly as inference
tokenizes a prompt: prefix + <im_patch>×N + [suffix(k) + answer(k) + </s>] per round. Labels are -100 everywhere
except the answer tokens and their `</s>` (HF shifts labels inside the loss, so labels[t] == input_ids[t] there).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from runtime.coco import PersonRecord, read_coco_persons
from runtime.keypoints import FLIP_PAIRS, standard_keypoints
from runtime.preprocess import get_affine_transform, normalize, warp_affine
from runtime.prompts import PromptTokenizer

try:
    import cv2
except ImportError:  # optional: runtime.preprocess.warp_affine reproduces it in numpy
    cv2 = None

from .data.synthetic import ANNOTATION_FILE, SyntheticConfig, generate_dataset

if TYPE_CHECKING:
    from .shared_prefix import RoundBatch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Augment:
    scale_factor: float = 0.3
    rot_factor: float = 40.0
    rot_prob: float = 0.5
    flip_prob: float = 0.5


def ensure_dataset(root: str | Path, num_images: int, seed: int, **domain) -> Path:
    """A synthetic COCO set under root (generated once; regenerated if its recorded config differs). `domain`:
    SyntheticConfig fields other than num_images/seed (background, occluder_prob, ...); defaults if empty."""
    cfg = SyntheticConfig(num_images=num_images, seed=seed, **domain)
    tag = "" if not domain else "-" + hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    out = Path(root) / f"synthetic-s{seed}-n{num_images}{tag}"
    ann = out / ANNOTATION_FILE
    if ann.is_file():
        info = json.loads(ann.read_text()).get("info", {}).get("config", {})
        if info == json.loads(json.dumps(asdict(cfg))):
            return out
    return generate_dataset(cfg, out)


class PersonSet:
    """All persons of a COCO dataset directory, with every image decoded into RAM (uint8 RGB)."""

    def __init__(self, dataset_dir: str | Path) -> None:
        root = Path(dataset_dir)
        self.persons: list[PersonRecord] = read_coco_persons(root / ANNOTATION_FILE)
        self.images = {}
        for rec in self.persons:
            if rec.file_name not in self.images:
                with Image.open(root / "images" / rec.file_name) as im:
                    self.images[rec.file_name] = np.asarray(im.convert("RGB"))

    def __len__(self) -> int:
        return len(self.persons)


def augmented_crop(image: np.ndarray, rec: PersonRecord, crop_size: int, rng: np.random.Generator,
                   aug: Augment | None, mean, std) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ (pixel_values [3,S,S] float32, joints in crop pixels [17,2], labelled mask [17] bool)."""
    c, s = rec.center.astype(np.float32).copy(), rec.scale.astype(np.float32).copy()
    joints = rec.keypoints[:, :2].astype(np.float64).copy()
    vis = rec.keypoints[:, 2] > 0
    r = 0.0
    if aug is not None:
        sf = aug.scale_factor
        s = s * np.float32(np.clip(rng.standard_normal() * sf + 1, 1 - sf, 1 + sf))
        r = float(rng.uniform(-aug.rot_factor, aug.rot_factor)) if rng.random() <= aug.rot_prob else 0.0
        if rng.random() <= aug.flip_prob:  # LocLLM fliplr_joints + mirrored centre
            width = image.shape[1]
            image = image[:, ::-1]
            joints[:, 0] = width - joints[:, 0] - 1
            for a, b in FLIP_PAIRS:
                joints[[a, b]] = joints[[b, a]]
                vis[[a, b]] = vis[[b, a]]
            c[0] = width - c[0] - 1
    trans = get_affine_transform(c, s, r, (crop_size, crop_size))
    if cv2 is not None:  # what LocLLM trains with; ~40x faster than the numpy reference kernel
        crop = cv2.warpAffine(np.ascontiguousarray(image), trans, (crop_size, crop_size), flags=cv2.INTER_LINEAR)
    else:
        crop = warp_affine(np.ascontiguousarray(image), trans, crop_size)
    pts = joints @ trans[:, :2].T + trans[:, 2]
    return normalize(crop, mean, std), pts, vis


class SequenceBuilder:
    """Multi-round Q/A token sequences with answer-only labels."""

    def __init__(self, ptok: PromptTokenizer, num_patches: int, crop_size: int, max_rounds: int = 5) -> None:
        self.ptok = ptok
        self.crop_size = crop_size
        self.max_rounds = max_rounds
        self.patch = crop_size // math.isqrt(num_patches)  # patch side in crop pixels
        self.image_start = len(ptok.prefix_ids())  # first <im_patch> position
        self.head = ptok.prefix_ids() + [ptok.special.image] * num_patches
        self.suffixes = [ptok.suffix_ids(n, d) for n, d in standard_keypoints()]

    def answer_ids(self, x: float, y: float) -> list[int]:
        """`[x,y]` (crop pixels / crop size, clipped to [0, 0.999]) + `</s>`."""
        fx, fy = (min(max(v / self.crop_size, 0.0), 0.999) for v in (x, y))
        return self.ptok.encode_chunk(f"[{fx:.3f},{fy:.3f}]") + [self.ptok.special.eos]

    def pick(self, pts: np.ndarray, vis: np.ndarray, rng: np.random.Generator) -> list[int]:
        """Up to max_rounds random labelled keypoints inside the crop (LocLLM: shuffle, keep, first 5)."""
        s = self.crop_size
        inside = [k for k in rng.permutation(len(pts)).tolist()
                  if vis[k] and 0 <= pts[k, 0] < s and 0 <= pts[k, 1] < s]
        return inside[: self.max_rounds]

    def build(self, pts: np.ndarray, keypoints: list[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """→ ids, labels, and (first row, keypoint) per round: rows first..first+13 predict its answer + </s>."""
        ids, labels, rounds = list(self.head), [IGNORE_INDEX] * len(self.head), []
        for k in keypoints:
            answer = self.answer_ids(float(pts[k, 0]), float(pts[k, 1]))
            ids += self.suffixes[k]
            labels += [IGNORE_INDEX] * len(self.suffixes[k])
            rounds.append((len(ids) - 1, k))
            ids += answer
            labels += answer
        return ids, labels, rounds


def collate(rows: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (pixels, ids, labels, ...) rows to the longest: pad id, attention 0, label -100."""
    width = max(len(row[1]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for i, (_, ids, lab, *_) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    pixels = torch.from_numpy(np.stack([row[0] for row in rows]))
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask, "labels": labels}


class Sampler:
    """Draws augmented multi-round samples from a PersonSet with one seeded numpy Generator (deterministic)."""

    def __init__(self, data: PersonSet, builder: SequenceBuilder, aug: Augment | None, mean, std,
                 seed: int) -> None:
        self.data, self.builder, self.aug, self.mean, self.std = data, builder, aug, mean, std
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, list[int], list[int], list[tuple[int, int]], np.ndarray]:
        """→ pixels, ids, labels, (first answer row, keypoint) per round, keypoint splats over the patch grid."""
        while True:  # LocLLM: a crop with no usable keypoint is replaced by a random other person
            rec = self.data.persons[int(self.rng.integers(len(self.data)))]
            px, pts, vis = augmented_crop(self.data.images[rec.file_name], rec, self.builder.crop_size,
                                          self.rng, self.aug, self.mean, self.std)
            keypoints = self.builder.pick(pts, vis, self.rng)
            if keypoints:
                ids, labels, rounds = self.builder.build(pts, keypoints)
                b = self.builder
                return px, ids, labels, rounds, patch_targets(pts, vis, b.crop_size, b.patch)

    def batch(self, size: int, pointer: bool = False, heat: bool = False) -> dict[str, torch.Tensor]:
        """A collated batch; pointer=True adds `pointer_rows` [P,2] (batch row, sequence row predicting an answer
        token) and `pointer_target` [P, patches]: the keypoint's splat, as a target for attention on the image;
        heat=True adds `heat_target` [B, 17, patches]: every keypoint's splat (zero rows where unlabelled)."""
        rows = [self.sample() for _ in range(size)]
        batch = collate(rows, self.builder.ptok.special.pad)
        if heat:
            batch["heat_target"] = torch.from_numpy(np.stack([row[4] for row in rows]))
        if pointer:
            index = [(b, first + j) for b, row in enumerate(rows) for first, _ in row[3] for j in range(14)]
            target = [row[4][k] for row in rows for _, k in row[3] for _ in range(14)]
            batch["pointer_rows"] = torch.tensor(index)
            batch["pointer_target"] = torch.from_numpy(np.stack(target))
        return batch

    def rounds_batch(self, size: int, max_rounds: int = 17) -> "RoundBatch":
        """`size` augmented crops with up to max_rounds labelled keypoints each, in the shared-prefix layout
        (training.shared_prefix): every round sees the image prefix and its own question only, as at inference."""
        from .shared_prefix import build_rounds
        b, samples = self.builder, []
        while len(samples) < size:
            rec = self.data.persons[int(self.rng.integers(len(self.data)))]
            px, pts, vis = augmented_crop(self.data.images[rec.file_name], rec, b.crop_size, self.rng, self.aug,
                                          self.mean, self.std)
            s = b.crop_size
            keypoints = [k for k in self.rng.permutation(len(pts)).tolist()
                         if vis[k] and 0 <= pts[k, 0] < s and 0 <= pts[k, 1] < s][:max_rounds]
            if keypoints:  # LocLLM: a crop with no usable keypoint is replaced by another person
                samples.append((px, pts, keypoints, patch_targets(pts, vis, s, b.patch)))
        return build_rounds(samples, b)

    def heatmap_batch(self, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The vision warm-up batch: crops [B,3,S,S]; per-keypoint soft targets over the patch grid [B,17,grid²]
        (rows sum to 1 for labelled keypoints inside the crop, else 0); keypoints / crop size [B,17,2]."""
        pixels, targets, coords = [], [], []
        s = self.builder.crop_size
        for _ in range(size):
            rec = self.data.persons[int(self.rng.integers(len(self.data)))]
            px, pts, vis = augmented_crop(self.data.images[rec.file_name], rec, s, self.rng, self.aug, self.mean,
                                          self.std)
            pixels.append(px)
            targets.append(patch_targets(pts, vis, s, patch))
            coords.append((pts / s).astype(np.float32))
        return tuple(torch.from_numpy(np.stack(a)) for a in (pixels, targets, coords))  # type: ignore[return-value]


def patch_targets(pts: np.ndarray, vis: np.ndarray, crop_size: int, patch: int) -> np.ndarray:
    """Bilinear splat of each keypoint onto the patch centres, so the expected centre equals the keypoint."""
    grid = crop_size // patch
    out = np.zeros((len(pts), grid * grid), dtype=np.float32)
    for k, (x, y) in enumerate(pts):
        if not (vis[k] and 0 <= x < crop_size and 0 <= y < crop_size):
            continue
        u, v = x / patch - 0.5, y / patch - 0.5
        i0, j0 = int(np.floor(u)), int(np.floor(v))
        fu, fv = u - i0, v - j0
        for di, wu in ((0, 1 - fu), (1, fu)):
            for dj, wv in ((0, 1 - fv), (1, fv)):
                i, j = min(max(i0 + di, 0), grid - 1), min(max(j0 + dj, 0), grid - 1)
                out[k, j * grid + i] += wu * wv
    return out
