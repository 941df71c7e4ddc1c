"""`Estimator`: the torch-free pose runtime over a bundle.

Per image: crop + normalise every person, run the vision graph once per person (not once per prompt), then decode
all persons × keypoints in batches of at most `max_batch` sequences. Thread-safe: the estimator holds no per-call
state (each call's stage timings come back with its result, `Estimate.timings`), and onnxruntime sessions (like
TensorRT contexts guarded in their runner) accept concurrent calls.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .backends import open_runner
from .backends.base import Stopwatch
from .decoding import Decoded, Decoder
from .errors import InputError
from .manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from .profiles import engine_profiles
from .coco import PersonRecord
from .image_io import ensure_rgb
from .preprocess import CropSpec, crop_at_center_scale, crop_persons
from .keypoint_sets import resolve_keypoints
from .prompts import PromptTokenizer
from .results import Estimate, PersonResult, person_result
from .speculative import NO_DRAFT, SpeculativeConfig, draft_digits, speculative

DECODINGS = ("template", "free", "speculative")
# None: the bundle's 17; a set name (runtime.keypoint_sets); or (name, description) pairs
Keypoints = str | Sequence[tuple[str, str]] | None
CUSTOM_PROMPT_CACHE = 256  # custom keypoint sets whose tokenized prompts are kept


@dataclass(frozen=True)
class EstimatorConfig:
    precision: str = "fp32"
    backend: str = "onnxruntime"
    decoding: str = "template"
    max_batch: int | None = None  # sequences per decoder batch; default: the bundle's max persons × 17
    threads: int | None = None
    verify: bool = True  # sha256 of every bundle file before the first inference
    speculative: SpeculativeConfig = SpeculativeConfig()  # how drafts are verified (decoding="speculative")


class Estimator:
    def __init__(self, bundle: str | Path, config: EstimatorConfig | None = None, **overrides) -> None:
        cfg = config or EstimatorConfig(**overrides)
        if config is not None and overrides:
            raise InputError("pass either an EstimatorConfig or keyword overrides, not both")
        if cfg.decoding not in DECODINGS:
            raise InputError(f"decoding={cfg.decoding!r}: expected one of {list(DECODINGS)}")
        self.bundle = Path(bundle)
        self.config = cfg
        self.manifest: Manifest = load_manifest(self.bundle, verify=cfg.verify)
        m = self.manifest
        variant = m.variant(cfg.precision)
        if cfg.decoding in ("template", "speculative") and (m.prompts.answer_template_ids is None or m.prompts.digit_ids is None):
            raise InputError("this bundle's tokenizer does not split the answer one character per token; "
                             "template decoding is unavailable — use decoding='free'")
        engines = {e.graph: e for e in variant.engines}
        form = variant.form(cfg.backend)  # weight-only int4/int8: MatMulNBits on onnxruntime, Q/DQ for TensorRT
        trt_ep = self._trt_ep_settings(variant) if cfg.backend == "onnxruntime-trt" else {}
        self.vision = open_runner(cfg.backend, self.bundle, form.vision, engines.get("vision"), cfg.threads,
                                  trt_ep.get("vision"))
        runner = open_runner(cfg.backend, self.bundle, form.decoder, engines.get("decoder"), cfg.threads,
                             trt_ep.get("decoder"))
        self.tokenizer = PromptTokenizer(Tokenizer.from_file(str(self.bundle / m.tokenizer)))
        table = np.load(self.bundle / form.embedding, mmap_mode="r")
        self.decoder = Decoder(m, runner, table, self.tokenizer.decode)
        self.crop_spec = CropSpec(crop_size=m.preprocess.crop_size, mean=tuple(m.preprocess.mean),
                                  std=tuple(m.preprocess.std))
        batch_hi = form.decoder.dynamic_ranges.get("batch", (1, None))[1]
        # A TensorRT engine built with `build --max-persons N` accepts less than the graphs were exported for.
        engine_rows = runner.input_limit("inputs_embeds", 0)
        engine_persons = [n for n in (self.vision.input_limit("pixel_values", 0),
                                      runner.input_limit(self.decoder.prefix_names[0], 0)) if n is not None]
        self.max_persons = min([m.max_persons, *engine_persons])
        default_batch = min(n for n in (batch_hi, engine_rows, m.max_persons * len(m.prompts.keypoints))
                            if n is not None)
        self.max_batch = cfg.max_batch or default_batch
        if batch_hi is not None and self.max_batch > batch_hi:
            raise InputError(f"max_batch={self.max_batch} exceeds the exported decoder batch range {batch_hi}")
        if engine_rows is not None and self.max_batch > engine_rows:
            raise InputError(f"max_batch={self.max_batch} exceeds the decoder engine's profiles (at most "
                             f"{engine_rows} sequences); rebuild with a larger `posellm-edge build --max-persons`")
        self.max_suffix_tokens = self._suffix_limit(form, cfg.decoding)
        self._lock = threading.Lock()  # guards only the lazily built custom-prompt cache
        # custom keypoint sets → suffix ids, least recently used first; bounded, as a server's clients choose them
        self._custom: dict[tuple[tuple[str, str], ...], list[list[int]]] = {}

    def with_decoding(self, decoding: str, speculative: SpeculativeConfig | None = None) -> "Estimator":
        """Another decoding over the same sessions (no second copy of the weights: a benchmark's variants of one
        bundle). The custom-prompt cache is shared; its suffix limit is the stricter of both decodings'."""
        if decoding not in DECODINGS:
            raise InputError(f"decoding={decoding!r}: expected one of {list(DECODINGS)}")
        if decoding != "free" and self.config.decoding == "free" and self.manifest.prompts.digit_ids is None:
            raise InputError("this bundle's tokenizer does not split the answer one character per token")
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, decoding=decoding,
                                           speculative=speculative or self.config.speculative)
        form = self.manifest.variant(self.config.precision).form(self.config.backend)
        other.max_suffix_tokens = min(self.max_suffix_tokens, self._suffix_limit(form, decoding))
        return other

    def _suffix_limit(self, form, decoding: str) -> int:
        """The longest custom keypoint suffix the decoder graph takes: the prefill's `seq` holds it (+ the
        template's forced answer head), the cache after the shared prefix (`past`) it plus every answer token."""
        m = self.manifest
        p = m.prompts
        head = p.digit_positions[0] if decoding == "template" else 0
        seq_hi = form.decoder.dynamic_ranges.get("seq", (1, None))[1]
        past_hi = form.decoder.dynamic_ranges.get("past", (0, None))[1]
        return min(n for n in (seq_hi and seq_hi - head, past_hi and past_hi - p.max_new_tokens, m.max_context)
                   if n is not None)

    def _trt_ep_settings(self, variant) -> dict:
        """TensorRT EP: the bundle's profiles; engines cached per bundle (manifest hash) in the user cache dir."""
        from .backends.onnxruntime import TrtEpSettings, user_cache_dir
        key = sha256_file(self.bundle / MANIFEST_NAME)[:16]
        root = user_cache_dir() / "ort-trt" / f"{key}-{self.config.precision}"
        profiles = engine_profiles(self.manifest, variant, self.manifest.max_persons)
        return {g: TrtEpSettings(profiles[g], self.config.precision, root / g) for g in profiles}

    # -- prompts -------------------------------------------------------------------------------------------------
    def queries(self, keypoints: Keypoints) -> tuple[list[str], list[list[int]]]:
        """Names and suffix ids: the bundle's pre-tokenized 17, a named set (`coco`, `mpii`, `h36m`) or custom
        (name, description) pairs."""
        kps = self.manifest.prompts.keypoints
        pairs = resolve_keypoints(keypoints)
        if pairs is None or pairs == [(k.name, k.description) for k in kps]:
            return [k.name for k in kps], [list(k.suffix_ids) for k in kps]
        key = tuple(pairs)
        if not key:
            raise InputError("keypoints is empty; pass None for the 17 COCO keypoints or (name, description) pairs")
        if len(key) > self.max_batch:
            raise InputError(f"{len(key)} keypoints in one query; the decoder runs at most {self.max_batch} "
                             "sequences per batch (max_batch, the bundle's max persons x 17)")
        with self._lock:
            suffixes = self._custom.pop(key, None)
        if suffixes is None:
            suffixes = [self.tokenizer.suffix_ids(n, d) for n, d in key]
            for (name, _), ids in zip(key, suffixes):
                if len(ids) > self.max_suffix_tokens:
                    raise InputError(f"keypoint {name[:60]!r}: its prompt is {len(ids)} tokens; this bundle's "
                                     f"decoder takes at most {self.max_suffix_tokens} (shorten the description)")
        with self._lock:
            self._custom[key] = suffixes  # most recently used last
            while len(self._custom) > CUSTOM_PROMPT_CACHE:
                del self._custom[next(iter(self._custom))]
        return [n for n, _ in key], suffixes

    # -- inference -----------------------------------------------------------------------------------------------
    def estimate(self, image, boxes: Sequence[Sequence[float]], keypoints: Keypoints = None,
                 watch: Stopwatch | None = None, drafts: Sequence[PersonResult | None] | None = None
                 ) -> Estimate:
        """Keypoints of every person box ([x, y, w, h] in image pixels, sanitised as LocLLM does) of one image;
        the result's `timings` / `counts` are this call's seconds per stage and decoder counters (also added to
        `watch` when one is given).

        `drafts` (speculative decoding): per box, last frame's result for that person (or None); its answers are
        only a draft, verified by the model — the output equals template decoding's whatever the drafts."""
        watch = watch or Stopwatch()
        if drafts is not None and len(drafts) != len(boxes):
            raise InputError(f"{len(drafts)} drafts for {len(boxes)} boxes: expected one (or None) per box")
        before = (dict(watch.seconds), dict(watch.counts))
        with watch.stage("preprocess"):
            pixel_values, crops = crop_persons(ensure_rgb(image), boxes, self.crop_spec)
        return self._estimate(pixel_values, [(c.center, c.scale) for c in crops], boxes, keypoints, watch, before,
                              drafts)

    def estimate_records(self, image, records: Sequence[PersonRecord],
                         keypoints: Keypoints = None,
                         watch: Stopwatch | None = None) -> Estimate:
        """COCO GT persons: crop from each record's centre/scale (its box is already sanitised — not twice)."""
        watch = watch or Stopwatch()
        before = (dict(watch.seconds), dict(watch.counts))
        with watch.stage("preprocess"):
            rgb = ensure_rgb(image)
            pixel_values = np.stack([crop_at_center_scale(rgb, r.center, r.scale, self.crop_spec)
                                     for r in records])
        return self._estimate(pixel_values, [(r.center, r.scale) for r in records], [r.box for r in records],
                              keypoints, watch, before)

    def estimate_crops(self, pixel_values: np.ndarray, affines: list, boxes: Sequence[Sequence[float]],
                       keypoints: Keypoints = None, watch: Stopwatch | None = None
                       ) -> Estimate:
        """Persons already cropped (possibly from several images, as a server batches them): [N, 3, S, S]
        pixel values, (center, scale) per person for the back-projection, and the boxes to report."""
        watch = watch or Stopwatch()
        return self._estimate(pixel_values, list(affines), boxes, keypoints, watch,
                              (dict(watch.seconds), dict(watch.counts)))

    def _estimate(self, pixel_values: np.ndarray, affines: list, boxes, keypoints, watch: Stopwatch,
                  before: tuple[dict[str, float], dict[str, int]],
                  drafts: Sequence[PersonResult | None] | None = None) -> Estimate:
        names, suffixes = self.queries(keypoints)
        q = len(suffixes)
        # rows = persons × queries within max_batch, and never more persons than the graphs/engines take
        per_batch = max(1, min(self.max_persons, self.max_batch // q))
        results: list[PersonResult] = []
        for start in range(0, len(affines), per_batch):
            chunk = slice(start, start + per_batch)
            with watch.stage("vision"):
                embeds = self.vision({"pixel_values": pixel_values[chunk]})["image_embeds"]
            draft = None if drafts is None else self._drafts(drafts[chunk], q)
            decoded = self.decode(np.asarray(embeds), suffixes, watch, draft)
            for i, (center, scale) in enumerate(affines[chunk]):
                rows = slice(i * q, (i + 1) * q)
                results.append(person_result(boxes[start + i], center, scale, self.crop_spec.crop_size,
                                             names, decoded.answers[rows], decoded.tokens[rows]))
        # this call's share of `watch` (a caller's watch may already hold earlier calls' figures)
        seconds, counts = before
        return Estimate(results, {k: v - seconds.get(k, 0.0) for k, v in watch.seconds.items()},
                        {k: v - counts.get(k, 0) for k, v in watch.counts.items()})

    def _drafts(self, people: Sequence[PersonResult | None], q: int) -> np.ndarray:
        """[persons × q, 6] digit indices from last frame's tokens (NO_DRAFT for a new person or keypoint set)."""
        p = self.manifest.prompts
        empty = [()] * q
        tokens = [t for r in people for t in (r.tokens if r is not None and len(r.tokens) == q else empty)]
        return draft_digits(tokens, p.digit_ids, p.digit_positions)

    def decode(self, image_embeds: np.ndarray, suffixes: list[list[int]], watch: Stopwatch,
               drafts: np.ndarray | None = None) -> Decoded:
        """Malformed answers never raise: they come back as score-0 keypoints with a flag (see answer.py)."""
        if self.config.decoding == "speculative" and drafts is not None and (drafts != NO_DRAFT).any():
            return speculative(self.decoder, image_embeds, suffixes, drafts, watch, self.config.speculative)
        if self.config.decoding in ("template", "speculative"):  # speculative without any draft: template's passes
            return self.decoder.template(image_embeds, suffixes, watch)
        return self.decoder.free(image_embeds, suffixes, watch)

