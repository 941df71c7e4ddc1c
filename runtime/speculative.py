"""Exact speculative digits: last frame's answer is the draft, the model's own greedy choice decides.

Template decoding (decoding.py) feeds each chosen digit back in its own pass: 5 decode passes. Here every row also
carries a draft of its six digits (last frame's answer for this person and keypoint). A pass feeds a row's committed
token followed by draft tokens; the graph returns the greedy reductions at every fed position (up to the bundle's K
logit positions), and the row keeps each prediction while the token fed after it equals the model's own choice:
up to its first mismatch, whose prediction is still valid (it saw only accepted tokens) and becomes the corrected
digit. The rejected draft tokens' K/V stay in the cache but are masked out of every later call (attention weight
exactly 0), and the next pass feeds the corrected digit plus the rest of the draft (the rest of the corrected
number re-drafted as the value closest to the old one). So every committed token and
confidence is computed from exactly the context template decoding gives it: answers, scores and "forced" flags are
template decoding's (to float rounding of the differently shaped matmuls; tests/runtime/test_speculative.py).

With K >= 12 (`export --logits-positions 12`) the suffix prefill itself carries `▁[ 0 .` + the whole draft and
verifies it: a fully accepted row needs no decode pass. With the default K = 4 the prefill carries `▁[ 0 .` (its
logits must score steps 1-3) and each later pass verifies up to 4 tokens: 2 decode passes when the draft holds.
Never more passes than template decoding's 5: each pass commits at least up to the next digit.

Rows whose six digits are committed leave the batch (their K/V with them): the last passes, gated by the slowest
row, run on the few rows still open. A digit without a draft is never fed as a guess: its row's window ends there,
as template decoding's does. On the shipped small model a pass costs ~0.6 ms fixed + ~0.03 ms per row-token, so
verifying a draft costs about what decoding it costs; runtime/acceptance.py decides who gets a draft at all
(measured figures: benchmarks/results/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import Stopwatch
from .decoding import Decoded, Decoder

NO_DRAFT = -1  # a digit without a draft (a new person): any digit works as a draft, it is only verified


def draft_digits(tokens: list[list[int]] | tuple, digit_ids: tuple[int, ...], positions: tuple[int, ...]
                 ) -> np.ndarray:
    """Generated ids per keypoint → [keypoints, 6] digit indices at the digit positions (NO_DRAFT where the answer
    had no digit there)."""
    index = {t: i for i, t in enumerate(digit_ids)}
    out = np.full((len(tokens), len(positions)), NO_DRAFT, np.int64)
    for r, ids in enumerate(tokens):
        for j, p in enumerate(positions):
            if p < len(ids):
                out[r, j] = index.get(int(ids[p]), NO_DRAFT)
    return out


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the drafts are verified (every choice gives template decoding's answers; only the cost differs)."""

    # rows whose digits are all committed leave the batch: later passes run on the rows still open only
    compact: bool = True
    # the suffix prefill carries the whole draft (K >= 12 verifies it there: a fully accepted row needs no decode
    # pass) or only template's head `▁[ 0 .` (the prefill stays template's width); None: the draft when K >= 12
    prefill_draft: bool | None = None

    def draft_in_prefill(self, k: int, last_digit_step: int) -> bool:
        return k > last_digit_step if self.prefill_draft is None else self.prefill_draft


def speculative(dec: Decoder, image_embeds: np.ndarray, suffixes: list[list[int]], drafts: np.ndarray | None,
                watch: Stopwatch, config: SpeculativeConfig = SpeculativeConfig()) -> Decoded:
    """`drafts`: [persons × keypoints, 6] digit indices (NO_DRAFT: none), person-major like the rows."""
    p = dec.p
    tpl = np.asarray(p.answer_template_ids, np.int64)
    digits = np.asarray(p.digit_ids, np.int64)
    dpos = np.asarray(p.digit_positions, np.int64)
    n_steps, last = len(tpl), int(dpos[-1])  # steps after the last digit are fixed and unscored (`]`)
    is_digit = np.zeros(n_steps, bool)
    is_digit[dpos] = True
    persons, q = image_embeds.shape[0], len(suffixes)
    rows = persons * q
    if drafts is None:
        drafts = np.full((rows, len(dpos)), NO_DRAFT, np.int64)
    drafts = np.asarray(drafts, np.int64)
    if drafts.shape != (rows, len(dpos)):
        raise ValueError(f"drafts of shape {drafts.shape}: expected ({rows}, {len(dpos)})")
    seq = np.tile(tpl, (rows, 1))  # committed tokens before `n`, the draft from `n` on
    seq[:, dpos] = digits[np.where(drafts == NO_DRAFT, 0, drafts)]
    # undrafted digits hold a placeholder that is never fed: a window ends at the first one (where template
    # decoding's window ends), so a row without a draft costs template's tokens, not wasted guesses
    guess = np.zeros((rows, n_steps + 1), bool)
    guess[:, dpos] = drafts == NO_DRAFT
    guess[:, n_steps] = True  # sentinel: "no placeholder left"
    k = dec.m.dims.logits_positions
    # answer tokens the suffix prefill carries (its last a+1 logits predict steps 0..a): the whole draft, or only
    # the fixed head `▁[ 0 .` as template decoding's prefill
    a = min(k - 1, last) if config.draft_in_prefill(k, last) else int(dpos[0])
    out, mask, shared, past, last_pos = dec.prefill(image_embeds, suffixes, seq[:, :a], watch)
    p0 = last_pos - a + 1  # position of answer step 0 per row
    conf = np.zeros((rows, n_steps), np.float64)
    forced = np.zeros(rows, np.int64)
    n = np.zeros(rows, np.int64)  # next step to predict
    index_of = {int(t): i for i, t in enumerate(digits)}
    later = {int(q): [int(x) for x in grp if x > q] for grp in (dpos[:3], dpos[3:]) for q in grp}
    # The batch: row b of every graph input is original row cur[b]; primary[b] is False for a filler copy.
    cur, primary, batch_persons = np.arange(rows), np.ones(rows, bool), np.arange(persons)

    def verify(o, w: np.ndarray) -> None:
        """Batch row b fed tokens at steps n-1 .. n+w-2 (right-aligned in its window); its predictions of steps
        n .. n+w-1 are the last w of o's positions. Commit up to and including the first prediction that differs
        from the draft token fed after it (vectorised over rows and positions: no per-step Python loop). Filler
        copies compute the same and commit nothing."""
        k_out, width = o.argmax.shape[1], int(w.max(initial=0))
        if width == 0:
            return
        nb, sb = n[cur], seq[cur]
        j = np.arange(width)[None, :]
        valid = j < w[:, None]
        step = np.minimum(nb[:, None] + j, n_steps - 1)
        col = np.clip(k_out - w[:, None] + j, 0, k_out - 1)
        dig = np.take_along_axis(o.digit_argmax, col, axis=1)
        choice = np.where(is_digit[step], digits[dig], tpl[step])
        draft = np.take_along_axis(sb, step, axis=1)  # the token fed after prediction j (if j + 1 < w)
        differs = valid & (draft != choice)
        reject = differs & (j + 1 < w[:, None])
        first = np.where(reject.any(axis=1), reject.argmax(axis=1), w - 1)  # last committed prediction
        commit = valid & (j <= first[:, None]) & primary[:, None]
        b, c = np.nonzero(commit)
        r, st, cl = cur[b], step[b, c], col[b, c]
        conf[r, st] = o.max_prob[b, cl]
        np.add.at(forced, r, (o.argmax[b, cl] != choice[b, c]).astype(np.int64))
        # a corrected digit (the last committed one, where it differs from the draft): re-draft the rest of its
        # number as the value closest to the old one (0.239 → 0.24_: 0.240, not 0.249), the usual case when a
        # coordinate moved by a few thousandths
        for bb in np.nonzero(primary & (w > 0) & differs[np.arange(len(w)), np.maximum(first, 0)])[0]:
            jj = first[bb]
            if guess[cur[bb], step[bb, jj]]:  # a placeholder's rest stays undrafted
                continue
            was, now = int(draft[bb, jj]), int(choice[bb, jj])
            seq[cur[bb], later[int(step[bb, jj])]] = digits[0] if index_of[now] > index_of[was] else digits[9]
            guess[cur[bb], later[int(step[bb, jj])]] = False  # re-drafted
        seq[r, st] = choice[b, c]
        guess[r, st] = False
        # a rejected row's window columns after its first mismatch held rejected tokens: masked from now on
        rejected = reject.any(axis=1)
        if rejected.any():
            tail = mask[:, mask.shape[1] - width:]
            tail[(np.arange(width)[None, :] > (width - w + first)[:, None]) & rejected[:, None]] = 0
        moved = primary & (w > 0)
        n[cur[moved]] = (nb + first + 1)[moved]

    with watch.stage("decode"):
        watch.count("person_passes", persons)  # the suffix prefill: one pass for each person's rows
        watch.count("row_passes", rows)
        verify(out, np.full(rows, a + 1, np.int64))
        while (n <= last).any():
            if config.compact:
                # Rows with every digit committed leave the batch, their K/V with them; a person keeps its
                # prefix K/V while any of its rows is left. Each person's rows stay one group of equal size (the
                # graph's shared-prefix layout): a person with fewer rows left is padded with copies of its own.
                active = primary & (n[cur] <= last)
                owner = cur // q
                groups = [np.nonzero(active & (owner == person))[0] for person in batch_persons]
                keep = [i for i, g in enumerate(groups) if len(g)]
                size = max(len(groups[i]) for i in keep)
                idx = np.concatenate([np.resize(groups[i], size) for i in keep])
                if len(idx) != len(cur) or (idx != np.arange(len(cur))).any():
                    primary = np.concatenate([np.arange(size) < len(groups[i]) for i in keep])
                    cur, mask = cur[idx], mask[idx]
                    past = {name: v[idx] for name, v in past.items()}
                    if len(keep) != len(batch_persons):
                        shared = {name: v[keep] for name, v in shared.items()}
                        batch_persons = batch_persons[keep]
            nb = n[cur]
            steps = np.arange(n_steps + 1)[None, :]
            placeholder = np.argmax(guess[cur] & (steps >= nb[:, None]), axis=1)  # first one at or after n
            w = np.clip(np.minimum(np.minimum(k, last - nb + 1), placeholder - nb + 1), 0, None)
            width = int(w.max())
            src = nb[:, None] - 1 + np.arange(width)[None, :] - (width - w)[:, None]  # answer step per column
            real = src >= nb[:, None] - 1  # left padding (masked) before each row's w tokens
            src = np.clip(src, 0, n_steps - 1)
            ids = np.where(real, np.take_along_axis(seq[cur], src, axis=1), p.pad_id)
            pos = np.where(real, p0[cur][:, None] + src, p0[cur][:, None])
            mask = np.concatenate([mask, real.astype(np.int64)], axis=1)
            out, past = dec._step(dec.embed(ids), mask, pos, shared, past)
            watch.count("person_passes", len(batch_persons))
            watch.count("row_passes", len(cur))
            verify(out, w)
    watch.count("persons", persons)
    hit = (drafts != NO_DRAFT) & (seq[:, dpos] == digits[np.where(drafts == NO_DRAFT, 0, drafts)])
    for j in range(len(dpos)):
        watch.count(f"draft_digit{j}", int((drafts[:, j] != NO_DRAFT).sum()))
        watch.count(f"accepted_digit{j}", int(hit[:, j].sum()))
    return dec.decoded(seq, conf, n_steps, forced)
