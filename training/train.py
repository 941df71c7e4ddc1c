"""Train a small PoseLLM from scratch on synthetic people, then LoRA-fine-tune it (SPEC §5, scaled down).

    python -m training.train --config CONFIG.json --out DIR [--work WORKDIR] [--state STATEDIR] [--resume [--recap]]
                             [--base BASE_CKPT]

Phase `vision` (optional): the ViT alone on a dense keypoint objective, a stand-in for DINOv2 pretraining; it ends
on its cap or, with `vision_stop_px`, at the first probe whose pixel error is that low. Phase `base`: all
parameters, LoRA disabled. Phase `finetune`: LoRA (B = 0 at start) on the ViT q/v thirds and the LLM q_proj/v_proj,
trained together with the full connector; everything else frozen. Answer-only cross-entropy, either on multi-round
conversations (`round_layout: conversation`, samples.SequenceBuilder) or with every labelled keypoint of a crop
asked over one shared image prefix (`shared_prefix`, training.shared_prefix: what inference computes). AdamW,
cosine schedule with warm-up; a phase ends after `steps` or `minutes` (the schedule runs on whichever fraction is
larger, so a time cap still ends on a decayed lr).
DIR receives the final native checkpoint (LoRA unmerged) + tokenizer.json, train_config.json and train_log.txt;
WORKDIR (default /tmp/posellm-train) keeps the base checkpoint; STATEDIR (default WORKDIR) keeps `resume.pt` (model,
optimizer, sampler and torch RNG, phase, step and the phase clock; written every `checkpoint_minutes` and at each
phase boundary). `--resume` continues from it, so several shorter runs, on other machines too when STATEDIR is in
the repository, add up to one (a phase's time cap counts the minutes of every run); `--recap` accepts changed phase
caps (extend a run over another stint, or end a copy of it early to ship a snapshot).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Sleeping (not spinning) OpenMP workers: on a shared 2-core machine spinning threads slow a step 3-6x whenever
# another process is busy. Only effective before torch is first imported (python -m training.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from runtime.preprocess import CLIP_MEAN, CLIP_STD
from runtime.prompts import PromptTokenizer

from posellm.checkpoint import load_checkpoint, save_native
from posellm.model import PoseLLM
from posellm.small_tokenizer import build_small_tokenizer
from .config import PhaseConfig, TrainConfig
from .samples import Augment, PersonSet, Sampler, SequenceBuilder, ensure_dataset
from .losses import heatmap_loss, heatmap_probe, lm_loss, rounds_loss
from .probes import answer_probe


class Log:
    """Append-only text log (one open/append per line, so it survives a crash), echoed to stdout."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def lr_at(progress: float, peak: float, warmup_frac: float) -> float:
    """Linear warm-up over warmup_frac of the phase, then cosine decay to 0 (HF get_cosine_schedule_with_warmup)."""
    if progress < warmup_frac:
        return peak * progress / warmup_frac
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup_frac) / (1 - warmup_frac))))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases/norms/LayerScale/position and class tokens do not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))


def train_phase(model: torch.nn.Module, loss_fn: Callable[[], Any], phase: PhaseConfig, cfg: TrainConfig,
                log: Callable[[str], None], name: str, resume: dict[str, Any] | None = None,
                save: Callable[[dict[str, Any]], None] | None = None,
                probe: Callable[[], str] | None = None, stop: Callable[[], bool] | None = None) -> list[float]:
    """One phase of AdamW on model's parameters that require grad; loss_fn draws a batch and returns its loss
    (or (loss, cross-entropy part), logged as `ce`). resume: {step, elapsed, opt} of an interrupted run of this
    phase; every cfg.checkpoint_minutes, probe() (a one-line score) is logged and save({step, elapsed, opt}) called;
    the phase ends early when stop() (asked after each probe) says so. Each step line carries the 1-minute load
    average and the steps/minute since the last line, so a slow stretch explains itself."""
    model.train()
    opt = make_optimizer(model, phase.lr, cfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"{name}: {sum(p.numel() for p in trainable):,} trainable of {sum(p.numel() for p in model.parameters()):,}"
        f" params; {phase.steps} steps, cap {phase.minutes} min, peak lr {phase.lr}")
    losses: list[float] = []
    ces: list[float] = []
    step, done_before = 0, 0.0
    if resume is not None:
        opt.load_state_dict(resume["opt"])
        step, done_before = int(resume["step"]), float(resume["elapsed"])
        log(f"{name}: resumed at step {step}, {done_before / 60:.2f} min done")
    start = time.perf_counter() - done_before
    last_save = last_line = time.perf_counter()
    while step < phase.steps:
        if (save or probe) and time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes:
            if probe is not None:
                model.eval()
                log(f"{name} probe at step {step}: {probe()}")
                model.train()
            if save is not None:
                save({"step": step, "elapsed": time.perf_counter() - start, "opt": opt.state_dict()})
            last_save = time.perf_counter()
            if stop is not None and stop():
                log(f"{name}: stop criterion met at step {step}")
                break
        elapsed = time.perf_counter() - start
        progress = max(step / phase.steps, elapsed / (60 * phase.minutes) if phase.minutes > 0 else 0.0)
        if progress >= 1.0:
            log(f"{name}: time cap reached at step {step}")
            break
        lr = lr_at(progress, phase.lr, phase.warmup_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn()
        if isinstance(loss, tuple):  # (total, main cross-entropy part)
            loss, ce = loss
            ces.append(float(ce))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
        if (step % cfg.log_every == 0 or step == phase.steps) and losses:
            recent, ce = losses[-cfg.log_every:], ces[-cfg.log_every:]
            ce_text = f"  ce {sum(ce) / len(ce):.4f}" if ce else ""
            now = time.perf_counter()
            rate = len(recent) / max(now - last_line, 1e-9) * 60
            last_line = now
            log(f"{name} step {step:5d}  loss {sum(recent) / len(recent):.4f}{ce_text}  lr {lr:.2e}  "
                f"{now - start:7.1f}s  {rate:5.1f} steps/min  load {os.getloadavg()[0]:.2f}")
    log(f"{name}: done, {step} steps in {(time.perf_counter() - start) / 60:.2f} min")
    if probe is not None:
        model.eval()
        log(f"{name} probe at step {step}: {probe()}")
    return losses


def enable_lora(base: PoseLLM, cfg: TrainConfig) -> PoseLLM:
    """A LoRA model holding base's weights (LoRA B = 0, so outputs are unchanged); only LoRA + connector train."""
    lora_cfg = cfg.model_config(base.cfg.llm.vocab_size, base.cfg.image_token_id, lora=True)
    torch.manual_seed(cfg.seed + 1)  # LoRA A init
    model = PoseLLM(lora_cfg, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any("lora_" not in k for k in missing):
        raise RuntimeError(f"LoRA model does not match the base: missing {missing}, unexpected {unexpected}")
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n or n.startswith("mm_projector.")
    return model


def evaluate(model: PoseLLM, ptok: PromptTokenizer, dataset_dir: Path) -> dict[str, float]:
    """COCO keypoint AP (GT boxes, no flip) of the reference inference on a synthetic COCO directory."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from posellm.reference import ReferenceEstimator
    from .samples import ANNOTATION_FILE
    data = PersonSet(dataset_dir)
    est = ReferenceEstimator(model, ptok)
    by_image: dict[str, list] = {}
    for rec in data.persons:
        by_image.setdefault(rec.file_name, []).append(rec)
    results = [res.to_coco(recs[0].image_id) for name, recs in by_image.items()
               for res in est.estimate_records(data.images[name], recs)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(dataset_dir / ANNOTATION_FILE))
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ["AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL"]
    return {n: round(float(v) * 100, 2) for n, v in zip(names, ev.stats)} | {"persons": len(results)}


PHASES = ("vision", "base", "finetune")
# Settings a resumed run may change: they do not enter the training maths (logging, checkpoint/probe cadence).
OPERATIONAL = {"log_every": 20, "checkpoint_minutes": 5.0, "probe_images": 0, "threads": 2, "data_dir": ""}


def _training_math(cfg: TrainConfig, recap: bool = False) -> TrainConfig:
    """The settings a resumed run must share with its state; recap=True also leaves out the phases' caps."""
    cfg = dataclasses.replace(cfg, **OPERATIONAL)
    if recap:
        uncapped = {name: dataclasses.replace(getattr(cfg, name), steps=0, minutes=0.0) for name in PHASES}
        cfg = dataclasses.replace(cfg, **uncapped)
    return cfg


def _save_resume(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file, then rename: a crash mid-write keeps the previous resume point."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(cfg: TrainConfig, out: Path, work: Path, base_dir: Path | None = None, resume: bool = False,
        state_dir: Path | None = None, recap: bool = False) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir or work
    state_dir.mkdir(parents=True, exist_ok=True)
    resume_path = state_dir / "resume.pt"
    state = torch.load(resume_path, weights_only=False) if resume and resume_path.is_file() else None
    if state is None:
        (out / "train_log.txt").unlink(missing_ok=True)
    log = Log(out / "train_log.txt")
    if state is not None:
        before = TrainConfig.from_dict(state["config"])
        if _training_math(before, recap) != _training_math(cfg, recap):
            raise ValueError(f"{resume_path} was written with another train config; start without --resume"
                             + ("" if recap else " (or pass --recap if only phase caps changed)"))
        log(f"resume from {resume_path}: phase {state['phase']}, step {state['step']}")
        for name in PHASES:
            old, new = getattr(before, name), getattr(cfg, name)
            if (old.steps, old.minutes) != (new.steps, new.minutes):  # --recap: the schedule follows the new cap
                log(f"{name}: cap changed from {old.steps} steps / {old.minutes} min to {new.steps} steps / "
                    f"{new.minutes} min (--recap); its lr schedule continues at the new cap's progress")
    elif resume:
        log(f"no {resume_path}: starting from scratch")
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    build_small_tokenizer().save(str(tok_dir / "tokenizer.json"))
    ptok = PromptTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = ptok.tokenizer.get_vocab_size()

    t0 = time.perf_counter()
    train_dir = ensure_dataset(cfg.data_dir, cfg.train_images, cfg.train_seed, **cfg.domain())
    val_dir = ensure_dataset(cfg.data_dir, cfg.val_images, cfg.val_seed, **cfg.domain())
    probe_dir = ensure_dataset(cfg.data_dir, cfg.probe_images, cfg.probe_seed, **cfg.domain()) \
        if cfg.probe_images > 0 else None
    data = PersonSet(train_dir)
    log(f"data: {len(data)} train persons from {train_dir}, val {val_dir}, probe {probe_dir}; "
        f"{time.perf_counter() - t0:.1f}s")
    mcfg = cfg.model_config(vocab, ptok.special.image, lora=False)
    builder = SequenceBuilder(ptok, mcfg.num_patches, cfg.crop_size, cfg.max_rounds)
    aug = Augment(rot_factor=cfg.rot_factor) if cfg.augment else None
    summary: dict[str, Any] = dict(state["summary"]) if state else {}
    at = PHASES.index(state["phase"]) if state else 0

    def phase_state(name: str) -> dict[str, Any] | None:
        return state if state is not None and state["phase"] == name and state["step"] is not None else None

    def saver(name: str, model: torch.nn.Module, heads: torch.nn.Module | None, sampler: Sampler
              ) -> Callable[[dict[str, Any]], None]:
        def save(progress: dict[str, Any] | None) -> None:
            _save_resume(resume_path, {
                "config": cfg.to_dict(), "phase": name, "summary": summary, **(progress or {"step": None}),
                "model": model.state_dict(), "heads": heads.state_dict() if heads is not None else None,
                "sampler_rng": sampler.rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
        return save

    def restore(name: str, sampler: Sampler) -> dict[str, Any] | None:
        st = phase_state(name)
        if st is not None:
            sampler.rng.bit_generator.state = st["sampler_rng"]
            torch.set_rng_state(st["torch_rng"])
        return st

    shared = cfg.round_layout == "shared_prefix"
    objective = rounds_loss if shared else lm_loss
    probe = None
    if probe_dir is not None:
        # fixed, un-augmented probe crops (never the val seed)
        probe_crops = Sampler(PersonSet(probe_dir), builder, None, CLIP_MEAN, CLIP_STD, cfg.probe_seed)
        def probe() -> str:
            return json.dumps({k: v for k, v in evaluate(model, ptok, probe_dir).items() if k in ("AP", "AP50", "AR")})

    if base_dir is None and at <= PHASES.index("base"):
        torch.manual_seed(cfg.seed)
        model = PoseLLM(mcfg, attn_implementation="sdpa")
        if cfg.llm_init_std > 0:
            with torch.no_grad():
                for module in model.llm.modules():
                    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                        module.weight.normal_(0.0, cfg.llm_init_std)
        heads = torch.nn.ModuleList([torch.nn.Linear(cfg.vit_dim, 17), torch.nn.Linear(cfg.vit_dim, 2)])
        if state is not None:
            model.load_state_dict(state["model"])
            heads.load_state_dict(state["heads"])
        if cfg.vision.steps > 0 and at == 0:  # stand-in for DINOv2 pretraining: a dense keypoint objective
            t = time.perf_counter()
            sampler = Sampler(data, builder, aug, CLIP_MEAN, CLIP_STD, cfg.seed + 2)
            st = restore("vision", sampler)
            vprobe = stop = None
            if probe_dir is not None:
                vprobe = heatmap_probe(model, heads, probe_crops.heatmap_batch(64, cfg.patch_size))
                if cfg.vision_stop_px > 0:
                    def stop() -> bool:
                        return getattr(vprobe, "last_px", float("inf")) <= cfg.vision_stop_px
            both = torch.nn.ModuleList([model.vision_model, heads])
            train_phase(both, heatmap_loss(model, heads, sampler, cfg.vision_batch_size), cfg.vision, cfg, log,
                        "vision", st, saver("vision", model, heads, sampler), vprobe, stop)
            summary["vision_minutes"] = round(summary.get("vision_minutes", 0) + (time.perf_counter() - t) / 60, 2)
            saver("base", model, heads, sampler)(None)
            state = None
        t = time.perf_counter()
        sampler = Sampler(data, builder, aug, CLIP_MEAN, CLIP_STD, cfg.seed)
        st = restore("base", sampler)
        base_probe = probe
        if probe_dir is not None and shared:
            ask = answer_probe(model, probe_crops.rounds_batch(8, 17), ptok.prefix_ids(), cfg.pointer_layer)
            pixels = heatmap_probe(model, heads, probe_crops.heatmap_batch(64, cfg.patch_size))

            def base_probe() -> str:
                return f"{probe()}; {ask()}; vit {pixels()}"
        train_phase(model, objective(model, sampler, cfg, cfg.pointer_weight, heads, cfg.heatmap_weight), cfg.base,
                    cfg, log, "base", st, saver("base", model, heads, sampler), base_probe)
        summary["base_minutes"] = round(summary.get("base_minutes", 0) + (time.perf_counter() - t) / 60, 2)
        base_dir = save_native(model, work / "base", tok_dir, overwrite=True)
        saver("finetune", model, None, sampler)(None)
        state = None
    if base_dir is not None:
        log(f"fine-tune from the base checkpoint {base_dir}")
        model = enable_lora(load_checkpoint(base_dir), cfg)
    else:  # resuming inside the fine-tune: the state holds the base (at the boundary) or every weight
        base = PoseLLM(mcfg, attn_implementation="sdpa")
        if state is not None and state["step"] is None:
            base.load_state_dict(state["model"])
        log("fine-tune from the resume state's weights")
        model = enable_lora(base, cfg)
    t = time.perf_counter()
    sampler = Sampler(data, builder, aug, CLIP_MEAN, CLIP_STD, cfg.seed + 1)
    st = restore("finetune", sampler)
    if st is not None:
        model.load_state_dict(st["model"])
    train_phase(model, objective(model, sampler, cfg), cfg.finetune, cfg, log, "finetune", st,
                saver("finetune", model, None, sampler), probe)
    summary["finetune_minutes"] = round(summary.get("finetune_minutes", 0) + (time.perf_counter() - t) / 60, 2)
    model.eval()
    _save_into(model, out, tok_dir)
    summary["final_val"] = evaluate(load_checkpoint(out), ptok, val_dir)
    size = (out / "model.safetensors").stat().st_size
    summary["params"] = sum(p.numel() for p in model.parameters())
    summary["checkpoint_bytes"] = size
    log(f"final val (saved LoRA checkpoint): {summary['final_val']}")
    log(f"summary: {json.dumps(summary)}")
    return summary


def _save_into(model: PoseLLM, out: Path, tok_dir: Path) -> None:
    """save_native into a temp dir, then move its files into `out` (keeping the log, config and README there)."""
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out))
    try:
        save_native(model, tmp / "ckpt", tok_dir)
        for f in (tmp / "ckpt").iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="TrainConfig JSON (unknown keys are errors)")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--work", default="/tmp/posellm-train", help="scratch directory (base checkpoint)")
    ap.add_argument("--base", default=None, help="start the fine-tune from this base checkpoint (skip phase a)")
    ap.add_argument("--resume", action="store_true", help="continue from STATE/resume.pt if there is one")
    ap.add_argument("--recap", action="store_true", help="with --resume: accept changed phase caps (steps, "
                    "minutes), e.g. to extend a run over another stint, or to end a copy of it early")
    ap.add_argument("--state", default=None, help="where resume.pt lives (default WORKDIR); a directory in the "
                    "repository (e.g. models/posellm-small/train_state) lets the next machine continue the run")
    args = ap.parse_args(argv)
    run(TrainConfig.load(args.config), Path(args.out), Path(args.work), Path(args.base) if args.base else None,
        args.resume, Path(args.state) if args.state else None, args.recap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
