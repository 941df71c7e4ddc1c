"""Training: answer-only label mask, a short run lowers the loss, the CLI ships a LoRA checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from posellm.config import ConfigError
from training.train import enable_lora, lr_at, main, train_phase
from training.config import TrainConfig
from training.samples import IGNORE_INDEX, Augment, Sampler, SequenceBuilder, patch_targets
from training.losses import lm_loss
from runtime.keypoints import standard_keypoints
from runtime.preprocess import CLIP_MEAN, CLIP_STD

TINY = {"crop_size": 56, "patch_size": 14, "vit_dim": 32, "vit_depth": 1, "vit_heads": 2, "llm_hidden": 32,
        "llm_layers": 1, "llm_heads": 2, "llm_intermediate": 64, "lora_r": 2, "lora_alpha": 4.0,
        "train_images": 4, "val_images": 2, "batch_size": 4, "log_every": 5}


def test_label_mask_is_answer_only(ptok, people):
    cfg = TrainConfig.from_dict(TINY)
    builder = SequenceBuilder(ptok, num_patches=16, crop_size=56, max_rounds=5)
    sampler = Sampler(people, builder, Augment(), CLIP_MEAN, CLIP_STD, seed=0)
    batch = sampler.batch(cfg.batch_size)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (4, 3, 56, 56)
    suffixes = {tuple(ptok.suffix_ids(n, d)) for n, d in standard_keypoints()}
    for row_ids, row_labels, row_mask in zip(ids.tolist(), labels.tolist(), mask.tolist()):
        n = sum(row_mask)
        assert row_ids[:n][:2 + 16] == ptok.prefix_ids() + [ptok.special.image] * 16
        assert all(m == 0 for m in row_mask[n:]) and all(t == ptok.special.pad for t in row_ids[n:])
        supervised = [i for i, lab in enumerate(row_labels) if lab != IGNORE_INDEX]
        # HF shifts inside the loss: a supervised label equals the input id at the same position.
        assert all(row_labels[i] == row_ids[i] for i in supervised)
        rounds = len(supervised) // 14
        assert 1 <= rounds <= 5 and len(supervised) == 14 * rounds and max(supervised) < n
        pos = 2 + 16
        for _ in range(rounds):  # [suffix (ignored)] [13 answer tokens + </s> (supervised)] per round
            suffix = next(s for s in suffixes if tuple(row_ids[pos:pos + len(s)]) == s)
            assert all(row_labels[i] == IGNORE_INDEX for i in range(pos, pos + len(suffix)))
            pos += len(suffix)
            answer = row_ids[pos:pos + 14]
            assert all(row_labels[i] == row_ids[i] for i in range(pos, pos + 14))
            assert answer[-1] == ptok.special.eos
            text = ptok.decode(answer)
            assert text.startswith("[0.") and text.endswith("]") and len(text) == 13
            pos += 14
        assert pos == n
        assert all(lab == IGNORE_INDEX for i, lab in enumerate(row_labels) if i not in set(supervised))


def test_pointer_targets_match_answer_rows(ptok, people):
    """Attention-supervision rows are exactly the 14 rows that predict each answer token; targets are the splat."""
    builder = SequenceBuilder(ptok, num_patches=16, crop_size=56)
    batch = Sampler(people, builder, Augment(), CLIP_MEAN, CLIP_STD, seed=2).batch(3, pointer=True)
    rows, target, labels = batch["pointer_rows"], batch["pointer_target"], batch["labels"]
    predicted = {(int(b), int(t) + 1) for b, t in rows}  # row t predicts the label at t + 1
    supervised = {(int(b), int(t)) for b, t in (labels != IGNORE_INDEX).nonzero()}
    assert predicted == supervised and len(rows) == len(supervised)
    assert target.shape == (len(rows), 16) and torch.allclose(target.sum(-1), torch.ones(len(rows)))


def test_patch_targets_expectation_is_the_keypoint():
    pts = np.array([[10.0, 20.0], [3.0, 52.9], [30.0, 30.0]])
    t = patch_targets(pts, np.array([True, True, False]), crop_size=56, patch=14)
    centres = (np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="xy"), -1).reshape(-1, 2) + 0.5) * 14
    assert np.allclose(t[0] @ centres, [10.0, 20.0]) and np.isclose(t[0].sum(), 1)
    assert np.isclose(t[1].sum(), 1) and t[2].sum() == 0  # clamped at the border; unlabelled → no target


def test_answer_text_clips_and_formats(ptok):
    builder = SequenceBuilder(ptok, num_patches=16, crop_size=56)
    assert ptok.decode(builder.answer_ids(55.99, 0.0)) == "[0.999,0.000]"
    assert ptok.decode(builder.answer_ids(28.0, -3.0)) == "[0.500,0.000]"


def test_short_training_lowers_loss(ptok, people):
    """40 AdamW steps on 4 images: mean loss of the last 4 steps at most 75% of the first 4 (measured 53%)."""
    cfg = TrainConfig.from_dict({**TINY, "base": {"steps": 40, "lr": 3e-3, "warmup_frac": 0.1}})
    torch.manual_seed(0)
    from posellm.model import PoseLLM
    model = PoseLLM(cfg.model_config(ptok.tokenizer.get_vocab_size(), ptok.special.image, lora=False), "sdpa")
    builder = SequenceBuilder(ptok, model.cfg.num_patches, cfg.crop_size)
    sampler = Sampler(people, builder, Augment(), CLIP_MEAN, CLIP_STD, 0)
    losses = train_phase(model, lm_loss(model, sampler, cfg), cfg.base, cfg, lambda msg: None, "test")
    assert len(losses) == 40 and all(np.isfinite(losses))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    print(f"loss first 4 steps {first:.3f} → last 4 {last:.3f} ({last / first:.0%})")
    assert last <= 0.75 * first, (first, last)
    # LoRA fine-tune set-up: outputs unchanged at start, only LoRA + connector train.
    lora = enable_lora(model, cfg).eval()
    model.eval()
    batch = Sampler(people, builder, None, CLIP_MEAN, CLIP_STD, 1).batch(2)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, lora(**batch).logits, atol=1e-5)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("mm_projector.") for n in trainable)
    assert any(n.startswith("vision_model.") for n in trainable) and any(n.startswith("llm.") for n in trainable)
    assert all(float(p.detach().abs().max()) == 0 for n, p in lora.named_parameters() if "lora_B" in n)


def test_schedule_and_strict_config():
    assert lr_at(0.0, 1.0, 0.1) == 0.0 and lr_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(0.55, 1.0, 0.1) == pytest.approx(0.5) and lr_at(1.0, 1.0, 0.1) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict({"base": {"steps": 1, "rate": 2}})


def test_cli_ships_lora_checkpoint(tmp_path):
    from posellm.checkpoint import load_checkpoint
    cfg = {**TINY, "data_dir": str(tmp_path / "data"), "vision": {"steps": 2}, "vision_batch_size": 4,
           "base": {"steps": 2}, "finetune": {"steps": 2}, "pointer_weight": 1.0, "pointer_layer": 0,
           "log_every": 1}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "model"
    assert main(["--config", str(tmp_path / "c.json"), "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"posellm_config.json", "model.safetensors", "tokenizer.json", "train_config.json",
            "train_log.txt"} <= names
    saved = json.loads((out / "posellm_config.json").read_text())
    assert saved["lora"]["llm_enable"] and saved["lora"]["vision_enable"] and saved["crop_size"] == 56
    assert TrainConfig.load(out / "train_config.json") == TrainConfig.from_dict(cfg)
    model = load_checkpoint(out)
    assert model.has_lora() and any("lora_B" in k for k in model.state_dict())
    log = (out / "train_log.txt").read_text()
    assert "vision step" in log and "ce " in log and "finetune step" in log and "final val" in log


def test_resumed_phase_continues_exactly(ptok, people):
    """A phase resumed from a mid-phase save (model, optimizer, sampler rng, step) repeats the uninterrupted
    run's remaining losses (tolerance 1e-6)."""
    import copy
    from posellm.model import PoseLLM
    cfg = TrainConfig.from_dict({**TINY, "base": {"steps": 6, "lr": 3e-3}, "checkpoint_minutes": 0.0})

    def fresh():
        torch.manual_seed(0)
        model = PoseLLM(cfg.model_config(ptok.tokenizer.get_vocab_size(), ptok.special.image, lora=False), "sdpa")
        builder = SequenceBuilder(ptok, model.cfg.num_patches, cfg.crop_size)
        return model, Sampler(people, builder, Augment(), CLIP_MEAN, CLIP_STD, 0)

    model, sampler = fresh()
    saved: dict = {}

    def save(progress):
        if progress["step"] == 3:
            saved.update(copy.deepcopy(progress), model=copy.deepcopy(model.state_dict()),
                         rng=copy.deepcopy(sampler.rng.bit_generator.state))
    full = train_phase(model, lm_loss(model, sampler, cfg), cfg.base, cfg, lambda msg: None, "t", save=save)
    model2, sampler2 = fresh()
    model2.load_state_dict(saved["model"])
    sampler2.rng.bit_generator.state = saved["rng"]
    rest = train_phase(model2, lm_loss(model2, sampler2, cfg), cfg.base, cfg, lambda msg: None, "t", resume=saved)
    print("uninterrupted", full[3:], "resumed", rest)
    assert np.allclose(rest, full[3:], rtol=0, atol=1e-6)


def test_pointer_probe_equals_eager_attention(ptok, people):
    """PointerProbe's one-head recomputation = head 0 of the layer's eager attention probabilities (max diff
    printed, tolerance 1e-6) at every supervised row."""
    from posellm.model import PoseLLM
    from training.losses import PointerProbe
    cfg = TrainConfig.from_dict({**TINY, "llm_layers": 2})
    torch.manual_seed(0)
    model = PoseLLM(cfg.model_config(ptok.tokenizer.get_vocab_size(), ptok.special.image, lora=False), "eager")
    probe = PointerProbe(model.llm.model.layers[1].self_attn)
    builder = SequenceBuilder(ptok, model.cfg.num_patches, cfg.crop_size)
    batch = Sampler(people, builder, Augment(), CLIP_MEAN, CLIP_STD, 4).batch(3, pointer=True)
    mask, rows = batch["attention_mask"], batch["pointer_rows"]
    with torch.no_grad():
        out = model.llm(inputs_embeds=model.embed(batch["input_ids"], model.encode_image(batch["pixel_values"])),
                        attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                        output_attentions=True)
        ref = out.attentions[1][rows[:, 0], 0, rows[:, 1]]
        got = probe.attention(rows)
    diff = float((ref - got).abs().max())
    print(f"pointer attention max|diff| {diff:.2e}")
    assert diff <= 1e-6
