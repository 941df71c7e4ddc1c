"""The shared-prefix training layout: the same logits as separate inference prompts, every labelled keypoint asked,
one head's recomputed attention equal to eager attention, ordinal digit targets, the probes, and a resume from a
state directory that carries the run across machines (the fine-tune included)."""
from __future__ import annotations

import json

import pytest
import torch

from posellm.model import PoseLLM
from runtime.preprocess import CLIP_MEAN, CLIP_STD
from training.config import TrainConfig
from training.losses import digit_ids, ordinal_targets, rounds_loss
from training.probes import answer_probe
from training.samples import Augment, Sampler, SequenceBuilder
from training.shared_prefix import ANSWER_LEN, KeptInputs, answer_rows, forward_rounds, head_attention
from training.train import main

TINY = {"crop_size": 56, "patch_size": 14, "vit_dim": 32, "vit_depth": 1, "vit_heads": 2, "llm_hidden": 32,
        "llm_layers": 2, "llm_heads": 2, "llm_intermediate": 64, "lora_r": 2, "lora_alpha": 4.0,
        "train_images": 4, "val_images": 2, "batch_size": 3, "log_every": 1, "round_layout": "shared_prefix",
        "max_rounds": 17, "ordinal_weight": 0.3, "pointer_layer": 1}


def _model(ptok, cfg: TrainConfig, attn: str = "sdpa") -> PoseLLM:
    torch.manual_seed(0)
    return PoseLLM(cfg.model_config(ptok.tokenizer.get_vocab_size(), ptok.special.image, lora=False), attn).eval()


def _sampler(ptok, people, cfg: TrainConfig, model: PoseLLM, seed: int = 0) -> Sampler:
    return Sampler(people, SequenceBuilder(ptok, model.cfg.num_patches, cfg.crop_size, 17), Augment(), CLIP_MEAN,
                   CLIP_STD, seed)


def test_rounds_equal_separate_prompts(ptok, people):
    """Each round's logits over the shared prefix = the logits of its own full prompt (prefix + image + suffix +
    answer) through the plain model forward; tolerance 1e-5, max diff printed."""
    cfg = TrainConfig.from_dict(TINY)
    model = _model(ptok, cfg)
    batch = _sampler(ptok, people, cfg, model).rounds_batch(3)
    worst = 0.0
    with torch.no_grad():
        fw = forward_rounds(model, batch, ptok.prefix_ids())
        for r in range(batch.ids.shape[0]):
            n = int(batch.mask[r].sum())
            ids = ptok.prefix_ids() + [ptok.special.image] * model.cfg.num_patches + batch.ids[r, :n].tolist()
            ref = model(batch.pixel_values[batch.owner[r]][None], torch.tensor([ids])).logits[0, -n:]
            worst = max(worst, float((ref - fw.logits[r, :n]).abs().max()))
    print(f"{batch.ids.shape[0]} rounds: max |logit diff| vs separate prompts {worst:.2e}")
    assert worst <= 1e-5


def test_every_labelled_keypoint_is_asked_once(ptok, people):
    cfg = TrainConfig.from_dict(TINY)
    model = _model(ptok, cfg)
    sampler = _sampler(ptok, people, cfg, model, seed=5)
    batch = sampler.rounds_batch(4)
    rows = answer_rows(batch)
    answers = batch.ids.gather(1, rows + 1)
    for r in range(batch.ids.shape[0]):
        k = int(batch.keypoint[r])
        n = len(sampler.builder.suffixes[k])
        assert batch.ids[r, :n].tolist() == sampler.builder.suffixes[k]
        assert int(batch.first[r]) == n - 1 and int(batch.mask[r].sum()) == n + ANSWER_LEN
        assert answers[r, -1] == ptok.special.eos and ptok.decode(answers[r, :-1].tolist()).startswith("[0.")
        assert abs(float(batch.splat[r].sum()) - 1.0) < 1e-5  # an asked keypoint lies inside the crop
    for b in range(4):
        asked = sorted(int(k) for k, o in zip(batch.keypoint, batch.owner) if int(o) == b)
        labelled = sorted(int(k) for k in torch.nonzero(batch.heat[b].sum(-1) > 0).flatten())
        assert asked == labelled, (b, asked, labelled)


def test_head_attention_equals_eager(ptok, people):
    """head_attention's one-head recomputation = head 0 of eager attention of the same full prompt (tolerance
    1e-6, max diff printed) at every answer row."""
    cfg = TrainConfig.from_dict(TINY)
    model = _model(ptok, cfg, "eager")
    kept = KeptInputs(model.llm.model.layers[1].self_attn)
    batch = _sampler(ptok, people, cfg, model, seed=2).rounds_batch(2)
    rows = answer_rows(batch)
    worst = 0.0
    with torch.no_grad():
        fw = forward_rounds(model, batch, ptok.prefix_ids())
        got = head_attention(kept, fw.cache.layers[1].keys, rows, fw.prefix_len)
        for r in range(batch.ids.shape[0]):
            n = int(batch.mask[r].sum())
            ids = ptok.prefix_ids() + [ptok.special.image] * model.cfg.num_patches + batch.ids[r, :n].tolist()
            embeds = model.embed(torch.tensor([ids]), model.encode_image(batch.pixel_values[batch.owner[r]][None]))
            att = model.llm(inputs_embeds=embeds, output_attentions=True, use_cache=False).attentions[1][0, 0]
            ref = att[fw.prefix_len + rows[r]]  # [14, T]
            worst = max(worst, float((ref - got[r, :, :ref.shape[1]]).abs().max()))
            assert float(got[r, :, ref.shape[1]:].abs().sum()) == 0.0  # padding never attended
    print(f"pointer head attention max|diff| vs eager {worst:.2e}")
    assert worst <= 1e-6


def test_ordinal_targets(ptok):
    digits = digit_ids(ptok)
    assert ptok.decode(digits) == "0123456789"
    vocab = ptok.tokenizer.get_vocab_size()
    t = ordinal_targets(torch.tensor([digits[3], digits[0], ptok.special.eos]), digits, vocab, 0.3)
    assert torch.allclose(t.sum(-1), torch.ones(3))
    row = t[0, digits]
    assert int(row.argmax()) == 3 and row[2] == pytest.approx(float(row[4])) and row[2] > row[1] > row[0]
    assert t[1, digits].argmax() == 0 and t[2, ptok.special.eos] == 1.0  # not a digit: one-hot


def test_rounds_loss_trains_and_probe_reports(ptok, people):
    cfg = TrainConfig.from_dict(TINY)
    model = _model(ptok, cfg).train()
    heads = torch.nn.ModuleList([torch.nn.Linear(cfg.vit_dim, 17), torch.nn.Linear(cfg.vit_dim, 2)])
    loss = rounds_loss(model, _sampler(ptok, people, cfg, model), cfg, 1.0, heads, 0.5)
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=3e-3)
    first = last = None
    for _ in range(8):
        total, ce = loss()
        total.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else float(ce)
        last = float(ce)
    print(f"answer ce {first:.3f} -> {last:.3f}")
    assert last < first
    model.eval()
    line = answer_probe(model, _sampler(ptok, people, cfg, model, seed=9).rounds_batch(2), ptok.prefix_ids(), 1)()
    print(line)
    assert "shuffle gap" in line and "pointer hit" in line and line.count(" ") > 10


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="round_layout 'chat'"):
        TrainConfig.from_dict({"round_layout": "chat"})


def test_resume_from_a_state_dir_on_a_new_machine(tmp_path):
    """A run stopped inside the fine-tune continues on a 'new machine' (fresh work dir, fresh data dir): the state
    directory alone carries it, and the shipped checkpoint has its LoRA tensors."""
    from posellm.checkpoint import load_checkpoint
    cfg = {**TINY, "data_dir": str(tmp_path / "data"), "vision": {"steps": 2}, "vision_batch_size": 3,
           "base": {"steps": 2}, "finetune": {"steps": 4}, "pointer_weight": 1.0, "probe_images": 1,
           "checkpoint_minutes": 0.0}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    args = ["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "m"), "--state", str(tmp_path / "state")]
    assert main(args + ["--work", str(tmp_path / "w1")]) == 0
    state = torch.load(tmp_path / "state" / "resume.pt", weights_only=False)
    assert state["phase"] == "finetune" and state["step"] is not None
    state["step"] = 2  # as if the first machine stopped half-way through the fine-tune
    torch.save(state, tmp_path / "state" / "resume.pt")
    cfg2 = {**cfg, "data_dir": str(tmp_path / "data2")}  # another machine's scratch: operational, not maths
    (tmp_path / "c2.json").write_text(json.dumps(cfg2))
    args2 = ["--config", str(tmp_path / "c2.json"), "--out", str(tmp_path / "m"), "--state", str(tmp_path / "state")]
    assert main(args2 + ["--work", str(tmp_path / "w2"), "--resume"]) == 0
    log = (tmp_path / "m" / "train_log.txt").read_text()
    assert "resume from" in log and "fine-tune from the resume state's weights" in log
    assert "finetune: resumed at step 2" in log and "vision step" in log
    assert load_checkpoint(tmp_path / "m").has_lora()
