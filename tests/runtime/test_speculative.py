"""Speculative digits (last frame's answers as the draft) give template decoding's answers frame by frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny
from runtime.estimator import Estimator
from runtime.manifest import load_manifest

FRAMES = 4
BOXES = [[10, 20, 100, 150], [120, 30, 90, 200]]
# Same tokens required; scores may differ by the rounding of differently shaped matmuls / reductions only.
SCORE_TOL = {"fp32": 1e-6, "fp16": 1e-5}  # measured: 4e-10 (fp32), 2e-8 (fp16)


@pytest.fixture(scope="module")
def k12_external_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """K = 12 logit positions (the whole draft verified in the suffix prefill), weights forced to external data."""
    from exporter import onnx_export
    from exporter.bundle import ExportConfig, export_bundle
    out = tmp_path_factory.mktemp("k12") / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
        export_bundle(ExportConfig(tiny_checkpoint, out, precisions=("fp32", "fp16"), max_persons=3,
                                   logits_positions=12))
    return out


def _frames():
    """A moving scene: the image and the boxes shift a few pixels per frame."""
    base = tiny.random_image(7)
    for t in range(FRAMES):
        dy, dx = 2 * t, 3 * t
        yield np.roll(base, (dy, dx), axis=(0, 1)), [[x + dx, y + dy, w, h] for x, y, w, h in BOXES]


def _assert_same(want, got, precision: str, label: str) -> float:
    worst = 0.0
    for a, b in zip(want, got, strict=True):
        assert a.tokens == b.tokens, label
        assert a.flags == b.flags, label
        assert np.array_equal(a.keypoints[:, :2], b.keypoints[:, :2]), label
        worst = max(worst, float(np.abs(a.keypoints[:, 2] - b.keypoints[:, 2]).max()))
    assert worst <= SCORE_TOL[precision], f"{label}: score diff {worst:.2e} > {SCORE_TOL[precision]}"
    return worst


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["k4", "k12-external"])
def test_speculative_equals_template_frame_by_frame(kind, precision, request):
    bundle = request.getfixturevalue("tiny_bundle" if kind == "k4" else "k12_external_bundle")
    if kind != "k4":
        assert load_manifest(bundle).variants[precision].decoder.external_data, "fixture must use external data"
    template = Estimator(bundle, precision=precision, decoding="template")
    spec = Estimator(bundle, precision=precision, decoding="speculative")
    last = None
    worst, passes, persons = 0.0, 0, 0
    for t, (image, boxes) in enumerate(_frames()):
        want = template.estimate(image, boxes)
        got = spec.estimate(image, boxes, drafts=last)
        worst = max(worst, _assert_same(want, got, precision, f"{kind} {precision} frame {t}"))
        passes += got.counts["person_passes"]
        persons += got.counts["persons"]
        assert got.counts["person_passes"] <= 6 * len(boxes)  # never more than template's passes
        last = got
    print(f"{kind} {precision}: {FRAMES} frames identical tokens/flags/xy, max score diff {worst:.2e} "
          f"(tol {SCORE_TOL[precision]}), {passes / persons:.2f} decoder passes per person (template 6)")


@pytest.mark.parametrize("kind,expected_passes", [("k4", 3), ("k12-external", 1)])
def test_exact_and_partly_wrong_drafts(kind, expected_passes, request):
    """An exact draft is accepted whole (K=12: the suffix prefill alone; K=4: prefill + 2 passes); a draft with
    wrong digits in the middle is corrected there, the rest of it reused, and the answers are unchanged."""
    bundle = request.getfixturevalue("tiny_bundle" if kind == "k4" else "k12_external_bundle")
    image = tiny.random_image(3)
    want = Estimator(bundle, decoding="template").estimate(image, BOXES)
    spec = Estimator(bundle, decoding="speculative")
    got = spec.estimate(image, BOXES, drafts=want)
    _assert_same(want, got, "fp32", f"{kind} exact draft")
    counts = got.counts
    assert counts["person_passes"] == expected_passes * len(BOXES), counts
    assert all(counts[f"accepted_digit{j}"] == counts[f"draft_digit{j}"] == 17 * len(BOXES) for j in range(6))
    # wrong second and fifth digits (answer steps 4 and 10) in every keypoint of person 0, none for person 1
    m = load_manifest(bundle).prompts
    digits, (p4, p10) = list(m.digit_ids), (m.digit_positions[1], m.digit_positions[4])
    bad = []
    for ids in want[0].tokens:
        ids = list(ids)
        for p in (p4, p10):
            ids[p] = digits[(digits.index(ids[p]) + 1) % 10]
        bad.append(tuple(ids))
    wrong = type(want[0])(**{**want[0].__dict__, "tokens": tuple(bad)})
    got = spec.estimate(image, BOXES, drafts=[wrong, None])
    worst = _assert_same(want, got, "fp32", f"{kind} wrong draft")
    c = got.counts
    print(f"{kind}: exact draft {expected_passes} pass(es)/person; wrong digits: {c['person_passes']} person-passes, "
          f"accepted per digit {[c[f'accepted_digit{j}'] for j in range(6)]} of "
          f"{[c[f'draft_digit{j}'] for j in range(6)]}, max score diff {worst:.2e}")
    assert c["accepted_digit1"] == c["accepted_digit4"] == 0 and c["draft_digit1"] == 17
    assert c["accepted_digit0"] == 17  # the digits before the wrong one held


def test_drafts_must_match_boxes(tiny_bundle):
    from runtime.errors import InputError
    with pytest.raises(InputError, match="2 drafts for 1 boxes"):
        Estimator(tiny_bundle, decoding="speculative").estimate(tiny.random_image(1), BOXES[:1], drafts=[None, None])


def _wrong_digits(result, rows, positions, digits):
    """A copy of `result` whose keypoints `rows` have the digit at each answer step in `positions` changed."""
    bad = []
    for i, ids in enumerate(result.tokens):
        ids = list(ids)
        if i in rows:
            for p in positions:
                ids[p] = digits[(digits.index(ids[p]) + 1) % 10]
        bad.append(tuple(ids))
    return type(result)(**{**result.__dict__, "tokens": tuple(bad)})


@pytest.mark.parametrize("kind", ["k4", "k12-external"])
def test_compaction_with_persons_of_unequal_open_rows(kind, request):
    """Three persons: an exact draft (its rows leave first), a draft wrong in 5 keypoints (a group of 5 rows padded
    with copies to the widest person's size), no draft. Compacted or not, the answers are template decoding's,
    and compaction runs fewer rows."""
    from runtime.speculative import SpeculativeConfig
    bundle = request.getfixturevalue("tiny_bundle" if kind == "k4" else "k12_external_bundle")
    boxes = BOXES + [[40, 10, 120, 120]]
    image = tiny.random_image(5)
    want = Estimator(bundle, decoding="template").estimate(image, boxes)
    m = load_manifest(bundle).prompts
    drafts = [want[0], _wrong_digits(want[1], {0, 3, 7, 11, 16}, (m.digit_positions[1], m.digit_positions[4]),
                                     list(m.digit_ids)), None]
    rows, persons = {}, {}
    for compact in (True, False):
        est = Estimator(bundle, decoding="speculative", speculative=SpeculativeConfig(compact=compact))
        got = est.estimate(image, boxes, drafts=drafts)
        worst = _assert_same(want, got, "fp32", f"{kind} compact={compact}")
        rows[compact], persons[compact] = got.counts["row_passes"], got.counts["person_passes"]
        print(f"{kind} compact={compact}: {got.counts['person_passes']} person-passes, {rows[compact]} row-passes "
              f"(template {6 * 17 * len(boxes)}), max score diff {worst:.2e}")
    assert rows[True] < rows[False] and persons[True] < persons[False]  # rows and a whole person left


def test_undrafted_rows_take_template_windows(tiny_bundle, monkeypatch):
    """Rows without a draft never feed a guessed digit: their decode passes are template decoding's (1, 1, 4, 1, 1
    tokens), and the answers are template's."""
    from runtime.backends.base import Stopwatch
    from runtime.speculative import NO_DRAFT, speculative
    est = Estimator(tiny_bundle, decoding="speculative")
    image = tiny.random_image(4)
    want = Estimator(tiny_bundle, decoding="template").estimate(image, BOXES[:1])
    pixel_values, _ = __import__("runtime.preprocess", fromlist=["crop_persons"]).crop_persons(
        image, BOXES[:1], est.crop_spec)
    embeds = np.asarray(est.vision({"pixel_values": pixel_values})["image_embeds"])
    _, suffixes = est.queries(None)
    widths = []
    step = est.decoder._step
    monkeypatch.setattr(est.decoder, "_step", lambda e, *a: (widths.append(e.shape[1]), step(e, *a))[1])
    drafts = np.full((len(suffixes), 6), NO_DRAFT, np.int64)
    got = speculative(est.decoder, embeds, suffixes, drafts, Stopwatch())
    assert widths[2:] == [1, 1, 4, 1, 1], widths  # after the prefix and suffix prefills
    assert [tuple(t) for t in got.tokens] == list(want[0].tokens)
    print(f"no draft: decode pass widths {widths[2:]} (template's), tokens identical")


def test_speculative_without_any_draft_is_template(tiny_bundle):
    """No draft at all (a stream's first frame, or every person gated off): template decoding's passes exactly."""
    image = tiny.random_image(6)
    want = Estimator(tiny_bundle, decoding="template").estimate(image, BOXES)
    got = Estimator(tiny_bundle, decoding="speculative").estimate(image, BOXES, drafts=[None, None])
    _assert_same(want, got, "fp32", "no drafts")
    assert got.counts["person_passes"] == 6 * len(BOXES) and "draft_digit0" not in got.counts, got.counts
