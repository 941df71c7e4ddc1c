"""Greedy decoding on the KV-cached decoder graph: shared prefix once per person, keypoint suffixes as one batch
on top of it, then `free` (plain greedy, the reference's semantics) or `template` decoding.

Template decoding: the answer grammar is `▁[ 0 . d d d , 0 . d d d ]`. Only the six digits are model decisions, so
`▁[ 0 .` ride along with the suffix prefill, `d , 0 .` are fed in one pass, and the rest are single-digit passes:
5 decode passes instead of 12. The logits at every position are still computed, so each step's confidence — the
keypoint score of SPEC §3 — is the reference's (computed in the graph in fp32: equal to ~1e-7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .answer import KeypointAnswer, parse_answer
from .backends.base import GraphRunner, Stopwatch
from .manifest import Manifest


@dataclass(frozen=True)
class StepOutput:
    """What one decoder call returns for its last K positions: the greedy choices and confidences (host arrays),
    and the raw logits, left backend-native (on the GPU for CUDA/TensorRT: only the reductions are copied back)."""

    max_prob: np.ndarray  # [rows, K] max softmax probability (the step confidence)
    argmax: np.ndarray  # [rows, K] token id
    digit_argmax: np.ndarray  # [rows, K] index into Prompts.digit_ids
    logits: Any  # [rows, K, vocab]


@dataclass(frozen=True)
class Decoded:
    """Per sequence (person-major, keypoint-minor): generated ids and the parsed answer (text inside)."""

    tokens: list[list[int]]
    answers: list[KeypointAnswer]


class Decoder:
    def __init__(self, manifest: Manifest, runner: GraphRunner, embedding: np.ndarray,
                 detokenize: Callable[[list[int]], str]) -> None:
        self.m = manifest
        self.p = manifest.prompts
        self.runner = runner
        self.table = embedding
        self.detokenize = detokenize
        specs = {t.name: t for t in runner.spec.inputs}
        self.act = np.dtype(specs["inputs_embeds"].dtype)
        self.kv_names = [n for n in specs if n.startswith("past_key_values.")]
        self.prefix_names = [n.replace("past_", "prefix_") for n in self.kv_names]
        self.present = [n.replace("past_key_values.", "present.") for n in self.kv_names]

    # -- small helpers -------------------------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.table[ids], dtype=self.act)

    def _zeros(self, rows: int, length: int) -> np.ndarray:
        return np.zeros((rows, self.m.dims.num_kv_heads, length, self.m.dims.head_dim), self.act)

    def _step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, prefix: dict[str, Any],
              past: dict[str, Any]) -> tuple[StepOutput, dict[str, Any]]:
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **prefix, **past}
        out = self.runner(feeds, keep_on_device=(*self.present, "logits"))
        nxt = {k: out[p] for k, p in zip(self.kv_names, self.present)}
        return StepOutput(np.asarray(out["max_prob"], np.float64), np.asarray(out["argmax"], np.int64),
                          np.asarray(out["digit_argmax"], np.int64), out["logits"]), nxt

    # -- prefill -------------------------------------------------------------------------------------------------
    def prefill(self, image_embeds: np.ndarray, suffixes: list[list[int]], append: list[int] | np.ndarray,
                watch: Stopwatch) -> tuple[StepOutput, np.ndarray, dict[str, Any], dict[str, Any], np.ndarray]:
        """Prefix once per person, then all persons × suffixes (+ `append`, the forced answer head) as one batch
        that attends to each person's prefix K/V in place (shared-prefix attention: it is never repeated per row).
        `append` is one token list for every row, or a [rows, n] array (speculative drafts differ per row).

        Returns the suffix prefill's StepOutput, the attention mask so far (prefix included), the prefix K/V, the
        non-prefix KV cache, and each row's last position. Suffixes are left padded *between* prefix and suffix,
        masked, with positions continuing from the prefix, so every real token sits where the reference's
        left-padded full prompt puts it. The prefix prefill's own prefix is one dummy token, masked out (weight
        exactly 0): no graph call ever has an empty prefix (see exporter/graphs.py).
        """
        persons, q = image_embeds.shape[0], len(suffixes)
        prefix = np.asarray(self.p.prefix_ids, dtype=np.int64)
        with watch.stage("prefix_prefill"):
            emb = np.concatenate([np.broadcast_to(self.embed(prefix), (persons, len(prefix), self.table.shape[1])),
                                  image_embeds.astype(self.act)], axis=1)
            plen = emb.shape[1]
            dummy = {n: self._zeros(persons, 1) for n in self.prefix_names}
            mask = np.ones((persons, 1 + plen), np.int64)
            mask[:, 0] = 0
            _, kv = self._step(emb, mask, np.tile(np.arange(plen, dtype=np.int64), (persons, 1)), dummy,
                               {n: self._zeros(persons, 0) for n in self.kv_names})
            shared = {p: kv[n] for p, n in zip(self.prefix_names, self.kv_names)}
        with watch.stage("suffix_prefill"):
            per_row = np.asarray(append, np.int64).ndim == 2
            n_append = np.asarray(append).shape[-1] if len(append) else 0
            seqs = [list(s) + ([self.p.pad_id] * n_append if per_row else list(append)) for s in suffixes]
            width = max(len(s) for s in seqs)
            ids = np.full((q, width), self.p.pad_id, np.int64)
            mask = np.zeros((q, plen + width), np.int64)
            mask[:, :plen] = 1
            pos = np.full((q, width), plen, np.int64)
            for i, s in enumerate(seqs):
                ids[i, width - len(s):] = s
                mask[i, plen + width - len(s):] = 1
                pos[i, width - len(s):] = np.arange(plen, plen + len(s))
            rows = persons * q
            if per_row:  # the appended tokens sit at the right end of every row
                ids = np.tile(ids, (persons, 1))
                ids[:, width - n_append:] = append
                emb = self.embed(ids)
            else:
                emb = np.tile(self.embed(ids), (persons, 1, 1))
            mask, pos = np.tile(mask, (persons, 1)), np.tile(pos, (persons, 1))
            first, past = self._step(emb, mask, pos, shared, {n: self._zeros(rows, 0) for n in self.kv_names})
        assert first.argmax.shape[0] == rows
        return first, mask, shared, past, pos[:, -1]

    # -- free: plain greedy, 13 tokens ----------------------------------------------------------------------------
    def free(self, image_embeds: np.ndarray, suffixes: list[list[int]], watch: Stopwatch) -> Decoded:
        persons, q = image_embeds.shape[0], len(suffixes)
        out, mask, shared, past, last_pos = self.prefill(image_embeds, suffixes, [], watch)
        eos, steps = self.p.eos_id, self.p.max_new_tokens
        with watch.stage("decode"):
            confs = [out.max_prob[:, -1]]
            tokens = [out.argmax[:, -1]]
            done = tokens[0] == eos
            # The reference stops a person's 17-prompt batch when all 17 emitted EOS; we run the whole batch until
            # every row is done and cut per person below, which is equivalent (rows never interact).
            while len(tokens) < steps and not done.all():
                mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
                last_pos = last_pos + 1
                out, past = self._step(self.embed(tokens[-1][:, None]), mask, last_pos[:, None], shared, past)
                confs.append(out.max_prob[:, -1])
                tokens.append(out.argmax[:, -1])
                done |= tokens[-1] == eos
        gen = np.stack(tokens, axis=1)  # [rows, L]
        conf = np.stack(confs, axis=1)  # [rows, L]
        out_tokens, answers = [], []
        for n in range(persons):
            rows = slice(n * q, (n + 1) * q)
            seqs = [until_eos(list(map(int, g)), eos) for g in gen[rows]]
            length = min(steps, max(len(s) for s in seqs))  # this person's generate() length
            for s, c in zip(seqs, conf[rows]):
                out_tokens.append(s)
                answers.append(parse_answer(self.detokenize(s), c[:length - 1], self.m.preprocess.crop_size))
        return Decoded(out_tokens, answers)

    # -- template: only digits are decisions -----------------------------------------------------------------------
    def template(self, image_embeds: np.ndarray, suffixes: list[list[int]], watch: Stopwatch) -> Decoded:
        tpl = list(self.p.answer_template_ids)
        digits = np.asarray(self.p.digit_ids, dtype=np.int64)
        first, second = self.p.digit_positions[:3], self.p.digit_positions[3:]
        # Prefill carries the fixed head `▁[ 0 .` (answer positions 0..first[0]-1).
        out, mask, shared, past, last_pos = self.prefill(image_embeds, suffixes, tpl[:first[0]], watch)
        rows = out.argmax.shape[0]
        n_steps = len(tpl)
        conf = np.zeros((rows, n_steps), np.float64)
        forced = np.zeros(rows, np.int64)
        gen = np.tile(np.asarray(tpl, np.int64), (rows, 1))

        def take(o: StepOutput, first_step: int) -> None:
            """Position j of `o` predicts answer step first_step + j: record confidences, choose digits."""
            nonlocal forced
            for j in range(o.argmax.shape[1]):
                step = first_step + j
                if step < 0:  # a larger exported K also returns logits from inside the suffix
                    continue
                if step >= n_steps:
                    break
                conf[:, step] = o.max_prob[:, j]
                if step in self.p.digit_positions:
                    gen[:, step] = digits[o.digit_argmax[:, j]]
                forced += o.argmax[:, j] != gen[:, step]

        watch.count("persons", image_embeds.shape[0])  # each person's rows: suffix prefill + 5 decode passes
        watch.count("person_passes", 6 * image_embeds.shape[0])
        watch.count("row_passes", 6 * rows)
        with watch.stage("decode"):
            k = out.argmax.shape[1]  # the prefill's last k positions: ..., ▁[, 0, . → steps first[0]-k+1 ..
            take(out, first[0] - k + 1)
            plan = [[p] for p in first[1:]] + [list(range(first[-1] + 1, second[0] + 1))] + \
                   [[p] for p in second[1:]]
            for targets in plan:
                # feed tokens at steps targets[0]-1 .. targets[-1]-1; their logits predict steps targets[0]..
                feed = gen[:, targets[0] - 1:targets[-1]]
                width = feed.shape[1]
                mask = np.concatenate([mask, np.ones((rows, width), np.int64)], axis=1)
                pos = last_pos[:, None] + np.arange(1, width + 1)
                last_pos = pos[:, -1]
                out, past = self._step(self.embed(feed), mask, pos, shared, past)
                take(out, targets[0])
        return self.decoded(gen, conf, n_steps, forced)

    def decoded(self, gen: np.ndarray, conf: np.ndarray, n_steps: int, forced: np.ndarray) -> Decoded:
        """Generated ids [rows, steps] → tokens and parsed answers (LocLLM scores: the last step's dropped); a row
        whose template forced tokens is flagged so."""
        out_tokens, answers = [], []
        for r in range(len(gen)):
            s = list(map(int, gen[r]))
            a = parse_answer(self.detokenize(s), conf[r, :n_steps - 1], self.m.preprocess.crop_size)
            if forced[r]:
                a = KeypointAnswer(a.text, a.x, a.y, a.score, a.ok, f"template forced {int(forced[r])} token(s)")
            out_tokens.append(s)
            answers.append(a)
        return Decoded(out_tokens, answers)


def until_eos(ids: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first EOS (what the reference decodes)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids
