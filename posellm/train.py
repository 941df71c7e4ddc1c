"""Train a small PoseLLM from scratch on synthetic people, then LoRA-fine-tune it (SPEC §5, scaled down).

    python -m posellm.train --config CONFIG.json --out DIR [--work WORKDIR] [--base BASE_CKPT]

Phase `base`: all parameters, LoRA disabled. Phase `finetune`: LoRA (B = 0 at start) on the ViT q/v thirds and the
LLM q_proj/v_proj, trained together with the full connector; everything else frozen. Answer-only cross-entropy on
multi-round conversations (train_data). AdamW, cosine schedule with warm-up; a phase ends after `steps` or
`minutes` (the schedule runs on whichever fraction is larger, so a time cap still ends on a decayed lr).
DIR receives the final native checkpoint (LoRA unmerged) + tokenizer.json, train_config.json and train_log.txt;
WORKDIR (default /tmp/posellm-train) keeps the base checkpoint; `--base` skips phase `base` and starts from one.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sleeping (not spinning) OpenMP workers: on a shared 2-core machine spinning threads slow a step 3-6x whenever
# another process is busy. Only effective before torch is first imported (python -m posellm.train).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

from runtime.preprocess import CLIP_MEAN, CLIP_STD
from runtime.prompts import PromptTokenizer

from .checkpoint import load_checkpoint, save_native
from .config import LLMConfig, LoRAConfig, PoseLLMConfig, VisionConfig, _strict
from .model import PoseLLM
from .small_tokenizer import build_small_tokenizer
from .train_data import Augment, PersonSet, Sampler, SequenceBuilder, ensure_dataset


@dataclass(frozen=True)
class PhaseConfig:
    steps: int
    minutes: float = 0.0  # wall-clock cap (0 = none)
    lr: float = 1e-3
    warmup_frac: float = 0.03


@dataclass(frozen=True)
class TrainConfig:
    # model
    crop_size: int = 112
    patch_size: int = 14
    vit_dim: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    llm_hidden: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_intermediate: int = 344
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    llm_init_std: float = 0.0  # >0: re-initialise the LLM's linear and embedding weights N(0, std); 0 = HF 0.02
    # data
    data_dir: str = "/tmp/posellm-synth"
    train_images: int = 4000
    train_seed: int = 1000
    val_images: int = 80
    val_seed: int = 2000
    max_rounds: int = 5
    augment: bool = True
    # optimisation
    seed: int = 0
    batch_size: int = 16
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    vision: PhaseConfig = PhaseConfig(steps=0)  # optional ViT warm-up (0 steps = none)
    vision_batch_size: int = 64
    pointer_weight: float = 0.0  # base phase: attention supervision (see lm_loss); 0 = plain cross-entropy
    pointer_layer: int = 1
    base: PhaseConfig = PhaseConfig(steps=1000)
    finetune: PhaseConfig = PhaseConfig(steps=200, lr=5e-4)
    log_every: int = 10
    threads: int = 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        for key in ("vision", "base", "finetune"):
            if key in data:
                data[key] = _strict(PhaseConfig, data[key], key)
        return _strict(cls, data, "train config")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int, image_token_id: int, lora: bool) -> PoseLLMConfig:
        grid = self.crop_size // self.patch_size
        return PoseLLMConfig(
            vision=VisionConfig(embed_dim=self.vit_dim, depth=self.vit_depth, num_heads=self.vit_heads,
                                patch_size=self.patch_size, pos_grid=grid),
            llm=LLMConfig(vocab_size=vocab_size, hidden_size=self.llm_hidden, intermediate_size=self.llm_intermediate,
                          num_hidden_layers=self.llm_layers, num_attention_heads=self.llm_heads,
                          num_key_value_heads=self.llm_heads, max_position_embeddings=1024),
            connector="mlp2x_gelu", crop_size=self.crop_size, normalization="clip", image_token_id=image_token_id,
            lora=LoRAConfig(llm_enable=lora, llm_r=self.lora_r, llm_alpha=self.lora_alpha, vision_enable=lora,
                            vision_r=self.lora_r, vision_alpha=self.lora_alpha, dropout=self.lora_dropout))


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
                log: Callable[[str], None], name: str) -> list[float]:
    """One phase of AdamW on model's parameters that require grad; loss_fn draws a batch and returns its loss
    (or (loss, cross-entropy part), logged as `ce`)."""
    model.train()
    opt = make_optimizer(model, phase.lr, cfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"{name}: {sum(p.numel() for p in trainable):,} trainable of {sum(p.numel() for p in model.parameters()):,}"
        f" params; {phase.steps} steps, cap {phase.minutes} min, peak lr {phase.lr}")
    losses: list[float] = []
    ces: list[float] = []
    start = time.perf_counter()
    step = 0
    while step < phase.steps:
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
        if step % cfg.log_every == 0 or step == phase.steps:
            recent, ce = losses[-cfg.log_every:], ces[-cfg.log_every:]
            ce_text = f"  ce {sum(ce) / len(ce):.4f}" if ce else ""
            log(f"{name} step {step:5d}  loss {sum(recent) / len(recent):.4f}{ce_text}  lr {lr:.2e}  "
                f"{time.perf_counter() - start:7.1f}s")
    log(f"{name}: done, {step} steps in {(time.perf_counter() - start) / 60:.2f} min")
    return losses


def lm_loss(model: PoseLLM, sampler: Sampler, cfg: TrainConfig, pointer_weight: float = 0.0
            ) -> Callable[[], Any]:
    """Answer-only cross-entropy of a fresh multi-round batch (HF shifts the labels).

    pointer_weight > 0 (needs eager attention) adds an attention-supervision term: at every row that predicts an
    answer token, head 0 of LLM layer `pointer_layer` should put its attention on the image tokens as the bilinear
    splat of that round's keypoint over the patch grid (cross-entropy). It forms the "look up keypoint k" circuit
    that plain cross-entropy only finds after a long plateau; the fine-tune phase uses plain cross-entropy.
    """
    def loss() -> torch.Tensor:
        batch = sampler.batch(cfg.batch_size, pointer=pointer_weight > 0)
        if pointer_weight <= 0:
            return model(**batch).loss
        rows, target = batch.pop("pointer_rows"), batch.pop("pointer_target")
        mask = batch["attention_mask"]
        out = model.llm(inputs_embeds=model.embed(batch["input_ids"], model.encode_image(batch["pixel_values"])),
                        attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        labels=batch["labels"], use_cache=False, output_attentions=True)
        start = sampler.builder.image_start
        attn = out.attentions[cfg.pointer_layer][rows[:, 0], 0, rows[:, 1], start:start + target.shape[1]]
        pointer = -(target * torch.log(attn + 1e-6)).sum(-1).mean()
        return out.loss + pointer_weight * pointer, out.loss.detach()
    return loss


def heatmap_loss(model: PoseLLM, heads: torch.nn.ModuleList, sampler: Sampler, batch_size: int
                 ) -> Callable[[], torch.Tensor]:
    """Vision warm-up on the patch tokens: per keypoint, cross-entropy of a softmax over the patches against the
    bilinear splat (heads[0]) + 10 × L1 of each token's own patch centre / crop (heads[1]), so that a token the LLM
    attends to also tells it *where* it is (values carry no RoPE position)."""
    patch = model.cfg.vision.patch_size
    grid = model.cfg.grid
    ij = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy"), -1).reshape(-1, 2)
    centres = (ij.float() + 0.5) / grid  # [patches, 2] as (x, y), row-major like the tokens

    def loss() -> tuple[torch.Tensor, torch.Tensor]:
        pixels, target, _ = sampler.heatmap_batch(batch_size, patch)
        tokens = model.vision_model(pixels)
        logp = heads[0](tokens).transpose(1, 2).log_softmax(-1)  # [B, 17, patches]
        labelled = target.sum(-1) > 0
        heat = -(target * logp).sum(-1)[labelled].mean()
        return heat + 10.0 * (heads[1](tokens) - centres).abs().mean(), heat.detach()
    return loss


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

    from .reference import ReferenceEstimator
    from .train_data import ANNOTATION_FILE
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


def run(cfg: TrainConfig, out: Path, work: Path, base_dir: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (out / "train_log.txt").unlink(missing_ok=True)
    log = Log(out / "train_log.txt")
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tok_dir = work / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    build_small_tokenizer().save(str(tok_dir / "tokenizer.json"))
    ptok = PromptTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = ptok.tokenizer.get_vocab_size()

    t0 = time.perf_counter()
    train_dir = ensure_dataset(cfg.data_dir, cfg.train_images, cfg.train_seed)
    val_dir = ensure_dataset(cfg.data_dir, cfg.val_images, cfg.val_seed)
    data = PersonSet(train_dir)
    log(f"data: {len(data)} train persons from {train_dir}, val {val_dir}; {time.perf_counter() - t0:.1f}s")
    mcfg = cfg.model_config(vocab, ptok.special.image, lora=False)
    builder = SequenceBuilder(ptok, mcfg.num_patches, cfg.crop_size, cfg.max_rounds)
    aug = Augment() if cfg.augment else None
    summary: dict[str, Any] = {}

    if base_dir is None:
        torch.manual_seed(cfg.seed)
        model = PoseLLM(mcfg, attn_implementation="eager" if cfg.pointer_weight > 0 else "sdpa")
        if cfg.llm_init_std > 0:
            with torch.no_grad():
                for module in model.llm.modules():
                    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                        module.weight.normal_(0.0, cfg.llm_init_std)
        if cfg.vision.steps > 0:  # stand-in for DINOv2 pretraining: a dense keypoint objective on the ViT alone
            t = time.perf_counter()
            heads = torch.nn.ModuleList([torch.nn.Linear(cfg.vit_dim, 17), torch.nn.Linear(cfg.vit_dim, 2)])
            sampler = Sampler(data, builder, aug, CLIP_MEAN, CLIP_STD, cfg.seed + 2)
            train_phase(torch.nn.ModuleList([model.vision_model, heads]),
                        heatmap_loss(model, heads, sampler, cfg.vision_batch_size), cfg.vision, cfg, log, "vision")
            summary["vision_minutes"] = round((time.perf_counter() - t) / 60, 2)
        t = time.perf_counter()
        sampler = Sampler(data, builder, aug, CLIP_MEAN, CLIP_STD, cfg.seed)
        train_phase(model, lm_loss(model, sampler, cfg, cfg.pointer_weight), cfg.base, cfg, log, "base")
        summary["base_minutes"] = round((time.perf_counter() - t) / 60, 2)
        base_dir = save_native(model, work / "base", tok_dir, overwrite=True)
        summary["base_val"] = evaluate(model, ptok, val_dir)
        log(f"base val: {summary['base_val']}")
    else:
        log(f"base: loaded from {base_dir}")
        model = load_checkpoint(base_dir)
    model = enable_lora(model, cfg)
    t = time.perf_counter()
    sampler = Sampler(data, builder, aug, CLIP_MEAN, CLIP_STD, cfg.seed + 1)
    train_phase(model, lm_loss(model, sampler, cfg), cfg.finetune, cfg, log, "finetune")
    summary["finetune_minutes"] = round((time.perf_counter() - t) / 60, 2)
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
    ap = argparse.ArgumentParser(prog="python -m posellm.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="TrainConfig JSON (unknown keys are errors)")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--work", default="/tmp/posellm-train", help="scratch directory (base checkpoint)")
    ap.add_argument("--base", default=None, help="start the fine-tune from this base checkpoint (skip phase a)")
    args = ap.parse_args(argv)
    run(TrainConfig.load(args.config), Path(args.out), Path(args.work), Path(args.base) if args.base else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
