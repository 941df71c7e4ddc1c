"""Runtime parity with the PyTorch reference (LocLLM semantics), template vs free decoding, threads, bad input."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny
from runtime.errors import BundleError, InputError
from runtime.estimator import Estimator
from runtime.manifest import SCHEMA_VERSION

BOXES = [[10, 20, 100, 150], [120, 30, 90, 200], [0, 0, 320, 240]]
SCORE_TOL = 1e-4


def _compare(ref, got, check_tokens: bool = True) -> tuple[int, int, float]:
    same = total = 0
    max_score = 0.0
    for a, b in zip(ref, got, strict=True):
        for ta, tb in zip(a.tokens, b.tokens, strict=True):
            same += ta == tb
            total += 1
        if check_tokens:
            assert a.answers == b.answers
            assert np.array_equal(a.keypoints[:, :2], b.keypoints[:, :2])
        max_score = max(max_score, float(np.abs(a.keypoints[:, 2] - b.keypoints[:, 2]).max()))
    return same, total, max_score


@pytest.fixture(scope="module")
def grammar_bundle(tmp_path_factory, grammar_checkpoint) -> Path:
    from exporter.bundle import ExportConfig, export_bundle
    out = tmp_path_factory.mktemp("gb") / "bundle"
    export_bundle(ExportConfig(grammar_checkpoint, out, precisions=("fp32",), max_persons=3))
    return out


@pytest.mark.parametrize("source", ["native", "locllm"])
def test_free_mode_token_identical_to_reference(source, request):
    """native: our format, unmerged LoRA; locllm: LocLLM's training output (<im_patch> = vocab_size = 32000, bf16
    LLM, 2 .bin shards). The reference is loaded from the same files."""
    checkpoint = request.getfixturevalue(f"{'tiny' if source == 'native' else 'locllm'}_checkpoint")
    bundle = request.getfixturevalue(f"{'tiny' if source == 'native' else 'locllm'}_bundle")
    image = tiny.random_image(1)
    ref = tiny.reference_estimator(checkpoint, bundle).estimate(image, BOXES)
    got = Estimator(bundle, decoding="free", max_batch=34).estimate(image, BOXES)  # 2 persons per batch
    same, total, max_score = _compare(ref, got)
    print(f"{source}: free vs reference: {same}/{total} token-identical keypoints, max score diff {max_score:.2e}")
    assert same == total == 17 * len(BOXES)
    assert max_score <= SCORE_TOL


def test_template_equals_free_when_answers_follow_grammar(grammar_checkpoint, grammar_bundle):
    image = tiny.random_image(2)
    free = Estimator(grammar_bundle, decoding="free").estimate(image, BOXES)
    template = Estimator(grammar_bundle, decoding="template").estimate(image, BOXES)
    ref = tiny.reference_estimator(grammar_checkpoint, grammar_bundle).estimate(image, BOXES)
    well_formed = sum(not f for r in free for f in r.flags)
    assert well_formed == 17 * len(BOXES), [r.answers for r in free]
    same, total, max_score = _compare(free, template)
    print(f"template vs free: {same}/{total} identical keypoints, max score diff {max_score:.2e}")
    assert same == total and max_score <= SCORE_TOL
    same, total, max_score = _compare(ref, template)
    print(f"template vs reference: {same}/{total}, max score diff {max_score:.2e}")
    assert same == total and max_score <= SCORE_TOL


def test_malformed_answers_are_flagged_not_raised(tiny_bundle):
    """The random tiny model never answers in the grammar: every keypoint is score 0 + a flag, no exception."""
    results = Estimator(tiny_bundle, decoding="free").estimate(tiny.random_image(3), BOXES[:1])
    assert all(results[0].flags) and results[0].score == 0.0
    forced = Estimator(tiny_bundle, decoding="template").estimate(tiny.random_image(3), BOXES[:1])
    assert all("template forced" in f for f in forced[0].flags)


def test_custom_keypoints_and_standard_tokenization(tiny_bundle):
    est = Estimator(tiny_bundle, decoding="template")
    m = est.manifest
    for kp in m.prompts.keypoints:  # runtime tokenization == exporter's pre-tokenized ids
        assert est.tokenizer.suffix_ids(kp.name, kp.description) == list(kp.suffix_ids)
    custom = [("left thumb", "The left thumb is the short first digit of the left hand."),
              ("nose", m.prompts.keypoints[0].description)]
    res = est.estimate(tiny.random_image(4), BOXES[:2], keypoints=custom)
    assert [len(r.names) for r in res] == [2, 2] and res[0].keypoints.shape == (2, 3)
    std = est.estimate(tiny.random_image(4), BOXES[:2])
    assert res[0].tokens[1] == std[0].tokens[0]  # same prompt → same answer as in the standard batch


def test_threads_match_sequential(tiny_bundle):
    est = Estimator(tiny_bundle, decoding="template")
    images = [tiny.random_image(s) for s in range(4)]
    sequential = [est.estimate(im, BOXES[:2]) for im in images]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda im: est.estimate(im, BOXES[:2]), images))
    for s, p in zip(sequential, parallel):
        for a, b in zip(s, p):
            assert a.tokens == b.tokens and np.array_equal(a.keypoints, b.keypoints)


def test_timings_are_per_call_under_threads(tiny_bundle):
    """Each call's `timings` are its own: four threads whose vision stage takes 0.1, 0.5, 0.9, 1.3 s (a sleep
    wrapped around the shared runner) call one estimator at once, and every result carries its own thread's time.
    The sleeps are 0.4 s apart so that a loaded machine (the graph itself takes ms idle, ~0.2 s under a
    concurrent quantize on 2 cores) does not blur one thread's time into the next one's."""
    import threading
    est = Estimator(tiny_bundle, decoding="template")
    runner, delay = est.vision, threading.local()

    def slow_vision(inputs, *args):
        time.sleep(getattr(delay, "s", 0.0))
        return runner(inputs, *args)

    est.vision = slow_vision
    delays = [0.1, 0.5, 0.9, 1.3]
    start = threading.Barrier(len(delays))

    def call(d: float) -> list[float]:
        delay.s = d
        start.wait()  # the calls overlap: a last-writer-wins attribute would be overwritten by the others
        return [est.estimate(tiny.random_image(1), BOXES[:1]).timings["vision"] for _ in range(3)]

    with concurrent.futures.ThreadPoolExecutor(len(delays)) as pool:
        seen = dict(zip(delays, pool.map(call, delays)))
    print({d: [round(t, 3) for t in ts] for d, ts in seen.items()})
    for d, timings in seen.items():
        # at least its own sleep, and less than the next-longer thread's
        assert all(d <= t < d + 0.4 for t in timings), (d, timings)
    result = est.estimate(tiny.random_image(1), BOXES[:2])
    assert isinstance(result, list) and len(result) == 2 and set(result.timings) >= {"preprocess", "vision"}


def test_fp16_bundle_runs(tiny_bundle):
    ref = Estimator(tiny_bundle, precision="fp32", decoding="template").estimate(tiny.random_image(5), BOXES[:1])
    half = Estimator(tiny_bundle, precision="fp16", decoding="template").estimate(tiny.random_image(5), BOXES[:1])
    agree = sum(a == b for a, b in zip(ref[0].tokens, half[0].tokens))
    print(f"fp16 vs fp32 template tokens: {agree}/17 keypoints identical (random weights, tiny margins)")
    assert half[0].keypoints.shape == (17, 3) and np.isfinite(half[0].keypoints).all()


# -- bad input -------------------------------------------------------------------------------------------------

def test_corrupted_and_missing_files_fail_before_inference(tiny_bundle, tmp_path):
    broken = tmp_path / "b"
    shutil.copytree(tiny_bundle, broken)
    with open(broken / "fp32/decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"fp32/decoder\.onnx: sha256"):
        Estimator(broken)
    (broken / "fp32/decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"fp32/decoder\.onnx: listed in the manifest but missing"):
        Estimator(broken)


def test_newer_schema_rejected(tiny_bundle, tmp_path):
    newer = tmp_path / "b"
    shutil.copytree(tiny_bundle, newer)
    data = json.loads((newer / "manifest.json").read_text())
    data["schema_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=rf"schema_version 99 is not supported.*\[{SCHEMA_VERSION}\]"):
        Estimator(newer)


@pytest.mark.parametrize("box", [[10, 10, 0, 50], [10, 10, 50, -1], [float("nan"), 1, 5, 5], [900, 900, 10, 10]])
def test_bad_boxes_name_the_box(tiny_bundle, box):
    with pytest.raises(InputError, match="box"):
        Estimator(tiny_bundle).estimate(tiny.random_image(), [box])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posellm_edge.cli", *args], capture_output=True, text=True,
                          cwd=tiny.REPO, timeout=300)


def test_cli_run_json_and_draw(tiny_bundle, tmp_path):
    from PIL import Image
    Image.fromarray(tiny.random_image(6)).save(tmp_path / "img.png")
    r = _cli("run", str(tiny_bundle), "--image", str(tmp_path / "img.png"), "--box", "10,20,100,150",
             "--json", str(tmp_path / "out.json"), "--draw", str(tmp_path / "out.png"))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    person = data["persons"][0]
    assert {"box", "keypoint_names", "keypoints", "score", "answers"} <= set(person)
    assert len(person["keypoints"]) == 17 and (tmp_path / "out.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png", "--box", "1,1,5,5"], "missing.png"),
    (["--image", "IMG", "--box", "1,1,0,5"], "box"),
    (["--image", "IMG", "--box", "1,2,3"], "x,y,w,h"),
])
def test_cli_errors_are_one_line(tiny_bundle, tmp_path, args, message):
    from PIL import Image
    Image.fromarray(tiny.random_image(7)).save(tmp_path / "img.png")
    args = [a.replace("IMG", str(tmp_path / "img.png")) for a in args]
    r = _cli("run", str(tiny_bundle), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_runtime_imports_without_torch():
    """An edge install has no torch/transformers/peft: the runtime must import and construct without them."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'posellm', 'exporter'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import runtime.estimator, runtime.cli, runtime.backends.onnxruntime, posellm_edge.cli\n"
            "print('ok')\n")
    # bounded: an import on a loaded machine takes seconds, a hung child must fail, not stall the suite
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tiny.REPO, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_few_custom_keypoints_many_persons_stay_within_exported_batches(tiny_bundle):
    """One custom keypoint leaves room for max_batch rows, but a call may never hold more persons than the graphs
    were exported for (vision batch, decoder persons): 5 persons on a max-3-persons bundle run in 2 calls."""
    est = Estimator(tiny_bundle, precision="fp32", threads=2)
    assert est.manifest.max_persons == 3
    boxes = [[10 + 30 * i, 20, 60, 120] for i in range(5)]
    res = est.estimate(tiny.random_image(5), boxes, keypoints=[("nose", "The nose of the person.")])
    assert len(res) == 5 and all(r.keypoints.shape == (1, 3) for r in res)
