"""`posellm-edge export`: checkpoint → ONNX graphs per precision → validated, atomic bundle.

Memory stays near one variant's size: weights are read lazily from the checkpoint and streamed into the graphs'
external data (exporter/streamed.py), and the fp32 reference runs one LLM layer at a time (exporter/validate.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from posellm.checkpoint import checkpoint_hash
from posellm.config import ConfigError, PoseLLMConfig
from posellm.lazy_weights import open_weights
from runtime.errors import InputError
from runtime.keypoints import standard_keypoints
from runtime.manifest import (SCHEMA_VERSION, Dims, ExportStats, GraphSpec, KeypointPrompt, Manifest, Preprocess,
                              Prompts, Variant, sha256_file, write_manifest)
from runtime.memory import current_rss_bytes, peak_rss_bytes, peak_rss_context
from runtime.preprocess import CLIP_MEAN, CLIP_STD, DINO_MEAN, DINO_STD
from runtime.prompts import DIGIT_POSITIONS, PromptTokenizer

from .graphs import DecoderGraph, VisionGraph, keep_norms_fp32
from .onnx_export import export_decoder, export_vision
from .streamed import PlaceholderModel
from .tokenizer import bundle_tokenizer
from .validate import ValidationError, format_checks, reference_outputs, report, validate_variant
from .versions import library_versions, toolkit_version

PRECISIONS = ("fp32", "fp16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    out_dir: Path
    precisions: tuple[str, ...] = ("fp32",)
    max_persons: int = 8
    max_context: int = 512
    logits_positions: int = 4
    overwrite: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise InputError(f"precision {bad or self.precisions}: expected a subset of {list(PRECISIONS)}")
        if self.logits_positions < 4:
            raise InputError(f"logits_positions={self.logits_positions}: template decoding needs >= 4")
        if self.max_persons < 1:
            raise InputError(f"max_persons={self.max_persons}: expected >= 1")


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    seconds: float
    peak_rss_mb: float
    baseline_rss_bytes: int  # this process's RSS when the export began (interpreter, torch): the floor of every peak
    validation: dict | None
    file_sizes: dict[str, int]
    variants: dict[str, ExportStats]  # per precision: bytes written, peak RSS, seconds


def _prompts(tok: PromptTokenizer, num_patches: int) -> Prompts:
    template = tok.answer_template()
    digits = tok.digit_ids()
    return Prompts(
        prefix_ids=tuple(tok.prefix_ids()), image_token_id=tok.special.image, num_image_tokens=num_patches,
        keypoints=tuple(KeypointPrompt(n, d, tuple(tok.suffix_ids(n, d))) for n, d in standard_keypoints()),
        bos_id=tok.special.bos, eos_id=tok.special.eos, pad_id=tok.special.pad,
        answer_template_ids=tuple(template) if template else None, digit_ids=tuple(digits) if digits else None,
        digit_positions=DIGIT_POSITIONS,
    )


def _dims(c: PoseLLMConfig, k: int) -> Dims:
    return Dims(vision_embed=c.vision.embed_dim, hidden_size=c.llm.hidden_size,
                num_layers=c.llm.num_hidden_layers, num_heads=c.llm.num_attention_heads,
                num_kv_heads=c.llm.num_key_value_heads, head_dim=c.llm.head_dim, vocab_size=c.llm.vocab_size,
                num_patches=c.num_patches, logits_positions=k)


def export_bundle(cfg: ExportConfig, log=print) -> ExportResult:
    start = time.perf_counter()
    baseline_rss = current_rss_bytes()
    out = Path(cfg.out_dir)
    if not Path(cfg.checkpoint).exists():
        raise InputError(f"checkpoint {cfg.checkpoint} does not exist")
    if out.exists() and not cfg.overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    tokenizer = bundle_tokenizer(Path(cfg.checkpoint))  # fails early, naming the missing tokenizer files
    tok = PromptTokenizer(tokenizer)
    source = open_weights(Path(cfg.checkpoint))  # lazy: tensors are read (and LoRA merged) one at a time
    model_cfg = source.cfg
    try:
        model_cfg.check_image_token(tok.special.image, f"{cfg.checkpoint} tokenizer")
    except ConfigError as e:
        raise InputError(str(e)) from e
    prompts = _prompts(tok, model_cfg.num_patches)
    prefix_len = len(prompts.prefix_ids) + model_cfg.num_patches
    longest = max(len(k.suffix_ids) for k in prompts.keypoints) + 13  # suffix + the whole answer
    max_seq = max(prefix_len, longest)  # the prefix prefill is the longest single pass
    max_context = max(cfg.max_context, prefix_len + longest)
    t0 = time.perf_counter()
    ref = reference_outputs(source) if cfg.validate else None  # fp32, one LLM layer resident at a time
    ref_seconds = time.perf_counter() - t0
    # digit_argmax needs the single-token digits; without them (no template decoding) it is a stub on id 0
    digit_ids = prompts.digit_ids or (0,)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        variants: dict[str, Variant] = {}
        checks = {}
        c = model_cfg.llm
        for precision in sorted(cfg.precisions, key=PRECISIONS.index):
            t0 = time.perf_counter()
            dtype = DTYPES[precision]
            vdir = tmp / precision
            vdir.mkdir()
            emb = f"{precision}/embed_tokens.npy"
            np.save(tmp / emb, source.get("llm.model.embed_tokens.weight").to(dtype).numpy())
            placeholders = PlaceholderModel(source, dtype)  # the graphs' weights stream from `source`
            vision = VisionGraph(placeholders.model)
            if precision != "fp32":
                keep_norms_fp32(vision)
            vspec = export_vision(vision, placeholders, vdir / "vision.onnx", model_cfg.crop_size, cfg.max_persons)
            graph = DecoderGraph(placeholders.model, cfg.logits_positions, digit_ids)
            dspec = export_decoder(graph, placeholders, vdir / "decoder.onnx", dtype,
                                   c.hidden_size, c.num_key_value_heads, c.head_dim, c.num_hidden_layers,
                                   cfg.max_persons, cfg.max_persons * len(prompts.keypoints), max_seq, prefix_len,
                                   max_context)
            del placeholders, vision, graph
            export_s = time.perf_counter() - t0
            log(f"exported {precision} graphs in {export_s:.1f}s")
            validation_s = None
            if ref is not None:
                t1 = time.perf_counter()
                checks[precision] = validate_variant(ref, vdir / "vision.onnx", vdir / "decoder.onnx", precision,
                                                     c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                                     cfg.logits_positions, digit_ids)
                validation_s = time.perf_counter() - t1 + ref_seconds  # the shared reference counted in each
                log(format_checks(precision, checks[precision]))
            stats = ExportStats(bytes=sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file()),  # + table
                                peak_rss_bytes=peak_rss_bytes(),
                                export_seconds=round(export_s, 2),
                                validation_seconds=None if validation_s is None else round(validation_s, 2))
            variants[precision] = Variant(
                precision=precision, embedding=emb,
                vision=_prefixed(vspec, precision), decoder=_prefixed(dspec, precision), export=stats)
            log(f"{precision}: {stats.bytes / 1e9:.3f} GB written, peak RSS {stats.peak_rss_bytes / 1e9:.3f} GB "
                f"({peak_rss_context(stats.peak_rss_bytes, stats.bytes, baseline_rss)})")
        validation = report(checks) if ref is not None else None
        if validation is not None:
            (tmp / "validation.json").write_text(json.dumps(validation, indent=1) + "\n")
        norm = model_cfg.normalization
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, toolkit_version=toolkit_version(),
            source_checkpoint_sha256=checkpoint_hash(Path(cfg.checkpoint)), library_versions=library_versions(),
            dims=_dims(model_cfg, cfg.logits_positions),
            preprocess=Preprocess(crop_size=model_cfg.crop_size, mean=CLIP_MEAN if norm == "clip" else DINO_MEAN,
                                  std=CLIP_STD if norm == "clip" else DINO_STD),
            prompts=prompts, tokenizer="tokenizer.json", max_persons=cfg.max_persons, max_context=max_context,
            variants=variants,
            files={str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        )
        write_manifest(tmp, manifest)
        if validation is not None and not validation["passed"]:
            failed = [f"{p}:{c.output} ({c.max_abs:.3e} > {c.tolerance:.3e})"
                      for p, cs in checks.items() for c in cs if not c.passed]
            raise ValidationError(f"exported graphs disagree with PyTorch beyond tolerance: {failed}")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    stats = {p: v.export for p, v in variants.items() if v.export is not None}
    return ExportResult(out, time.perf_counter() - start, peak_rss_bytes() / 2**20, baseline_rss, validation, sizes,
                        stats)


def _prefixed(spec: GraphSpec, precision: str) -> GraphSpec:
    """Graph files live in the precision's folder; the manifest names them relative to the bundle."""
    return replace(spec, file=f"{precision}/{spec.file}",
                   external_data=tuple(f"{precision}/{e}" for e in spec.external_data))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Atomic publish: the new bundle appears by rename; an old one is moved aside first and then deleted."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
