"""GPTQ's calibration statistics for `quantize`: Σ xᵀx per decoder MatMul input, recorded once and replayed a few
LLM layers at a time so that only those layers' statistics are ever in memory (issue #24)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import Stopwatch
from runtime.backends.onnxruntime import OrtRunner, session_options
from runtime.decoding import Decoder
from runtime.manifest import Manifest, Variant
from runtime.preprocess import CropSpec

from .blockwise import BlockQuantized, quantize_gptq
from .data import array_sha256, load_person_crops
from .segmented import SegmentedRunner
from .weight_only import accumulate

if TYPE_CHECKING:
    from .quantize import QuantizeConfig


def layer_groups(nodes: list[str], num_layers: int, layers_per_group: int) -> list[list[str]]:
    """The quantized MatMuls (graph order) in groups of `layers_per_group` LLM layers: the exporter writes each
    layer's projections together, so equal runs of the graph-ordered weights are the layers; a MatMul past the last
    layer (lm_head) joins the last group."""
    per_layer = max(1, len(nodes) // num_layers)
    size = per_layer * layers_per_group
    end = per_layer * num_layers
    groups = [nodes[i:min(i + size, end)] for i in range(0, end, size)]
    groups[-1] += nodes[per_layer * num_layers:]
    return [g for g in groups if g]


class Calibration:
    """GPTQ's statistics: Σ xᵀx per MatMul input while the fp32 graphs decode `samples` person crops the way the
    runtime does. At 7B all 32 layers' statistics would be 45 GB (float64), and the fp32 decoder 26 GB, so:
    one decoding pass runs the decoder `hessian_layers` LLM layers per session (segmented.py) and records every
    call's inputs of every segment on disk; `collect` then replays one segment's recorded calls with its MatMul
    inputs tapped — bit for bit what a whole-graph tap saw — holding that segment's statistics only. Every layer
    runs twice in all, whatever the number of groups."""

    def __init__(self, cfg: QuantizeConfig, manifest: Manifest, bundle: Path, fp32: Variant, acts: set[str],
                 scratch: Path) -> None:
        self.cfg = cfg
        spec = CropSpec(crop_size=manifest.preprocess.crop_size, mean=tuple(manifest.preprocess.mean),
                        std=tuple(manifest.preprocess.std))
        self.crops = load_person_crops(Path(cfg.coco), Path(cfg.images), cfg.samples, cfg.seed, spec)
        vision = OrtRunner(bundle / fp32.vision.file, fp32.vision, threads=cfg.threads)
        step = manifest.max_persons
        embeds = [np.asarray(vision({"pixel_values": self.crops.pixel_values[i:i + step]})["image_embeds"])
                  for i in range(0, len(self.crops.pixel_values), step)]
        del vision  # its weights are not needed while the decoder runs
        scratch.mkdir()
        try:
            self._record(cfg, manifest, bundle, fp32, acts, scratch, embeds)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        self.digests: dict[str, str] = {}
        self.tokens: dict[str, int] = {}
        self.replays = 0

    def _record(self, cfg: QuantizeConfig, manifest: Manifest, bundle: Path, fp32: Variant, acts: set[str],
                scratch: Path, embeds: list[np.ndarray]) -> None:
        self.runner = SegmentedRunner(bundle / fp32.decoder.file, fp32.decoder, manifest.dims.num_layers,
                                      lambda: session_options(cfg.threads), cfg.hessian_layers,
                                      taps=sorted(acts), record=scratch)
        self.runner.active_taps = set()  # the recording pass returns the graph's outputs only
        table = np.load(bundle / fp32.embedding, mmap_mode="r")
        decoder = Decoder(manifest, self.runner, table, lambda ids: "")
        suffixes = [list(k.suffix_ids) for k in manifest.prompts.keypoints]
        p = manifest.prompts
        self.template = p.answer_template_ids is not None and p.digit_ids is not None
        for e in embeds:
            (decoder.template if self.template else decoder.free)(e, suffixes, Stopwatch())
        self.runner.release()
        self.recorded_bytes = sum(f.stat().st_size for f in scratch.iterdir())

    def collect(self, acts: set[str]) -> dict[str, np.ndarray]:
        by_segment: dict[int, list[str]] = {}
        for a in sorted(acts):
            by_segment.setdefault(self.runner.segment_of(a), []).append(a)
        hessians: dict[str, np.ndarray] = {}
        tokens: dict[str, int] = {}
        for call in range(self.runner.calls):  # in call order, as the decoding accumulated them
            outs = {}
            for seg, names in by_segment.items():
                outs.update(self.runner.run_segment(seg, call, names))
            accumulate(hessians, tokens, outs, self.runner.recorded_mask(call))
        self.runner.release()
        self.replays += 1
        self.tokens.update(tokens)
        self.digests.update({a: array_sha256(h) for a, h in hessians.items()})
        return hessians

    def close(self) -> None:
        self.runner.close()
        if self.runner.record is not None:
            shutil.rmtree(self.runner.record, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        c = self.crops
        return {"coco": Path(self.cfg.coco).name, "seed": self.cfg.seed, "persons": int(len(c.pixel_values)),
                "available_persons": c.available, "crops_sha256": c.sha256,
                # identity of the crops and of every input's statistics (collected a few layers at a time)
                "sha256": hashlib.sha256((c.sha256 + "".join(f"{a}:{d}" for a, d in sorted(self.digests.items())))
                                         .encode()).hexdigest(),
                "decoding": "template" if self.template else "free", "decoder_calls": self.runner.calls,
                "passes": self.replays, "layers_per_pass": self.cfg.hessian_layers,
                "recorded_gb": round(self.recorded_bytes / 1e9, 3),
                "tokens_per_input": dict(sorted(self.tokens.items()))}


def gptq_handed_over(w: np.ndarray, hessians: dict[str, np.ndarray], act: str, last: bool, spill: Path, bits: int,
                     node: str, per_channel: bool, cfg: QuantizeConfig) -> BlockQuantized:
    """GPTQ of `w` on `hessians[act]`. At the input's last use the statistics are handed over to the solve
    (quantize_gptq frees them before inverting: 0.97 GB less at a 7B down_proj), kept on disk meanwhile and put
    back in `hessians` afterwards for the output error."""
    if not last:
        return quantize_gptq(w, hessians[act], bits, cfg.block_size, cfg.damp, node, per_channel)
    np.save(spill, hessians[act])
    try:
        bq = quantize_gptq(w, [hessians.pop(act)], bits, cfg.block_size, cfg.damp, node, per_channel)
        hessians[act] = np.load(spill)
    finally:
        spill.unlink(missing_ok=True)
    return bq


def output_error(w: np.ndarray, bq: BlockQuantized, h: np.ndarray) -> float:
    """||X (W - Wq)||_F / ||X W||_F from H = XᵀX: relative error of the layer's outputs on the calibration data.
    The products are formed in place (a * b is b * a exactly; float32 → float64 is exact), so at most two [K, N]
    float64 arrays are alive at once (lm_head's are 1.05 GB each at 7B) and the sums are those of d * (h @ d) and
    w * (h @ w) bit for bit."""
    d = bq.dequantize(np.float64)
    d = np.subtract(w.astype(np.float64), d, out=d)
    hd = h @ d
    hd *= d
    del d
    num = float(np.sum(hd))
    del hd
    hw = h @ w.astype(np.float64)
    hw *= w
    den = float(np.sum(hw))
    return float(np.sqrt(num / den)) if den > 0 else 0.0
