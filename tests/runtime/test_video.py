"""Video / camera streams: tracked or detected boxes, one JSON line per frame, drawn MP4, bad inputs in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny
from runtime.detections import read_detections
from runtime.errors import InputError
from runtime.estimator import Estimator
from runtime.stream import run_stream
from runtime.tracking import TrackConfig, Tracker, keypoint_box
from runtime.video import Frame
from training.data.video import VideoConfig, generate_video, render_video

CFG = VideoConfig(seconds=1.0, fps=5, size=(160, 120))  # 5 frames: the tiny model costs ~1 s per frame here
LOOSE = TrackConfig(keypoint_score=0.0, lost_score=0.0)  # the random tiny model scores ~0: never lose the person


def _frames(frames):
    return [Frame(i, i / CFG.fps, rgb) for i, rgb in enumerate(frames)]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    pytest.importorskip("av", reason="PyAV not installed (pip install 'posellm-edge[video]')")
    return generate_video(CFG, tmp_path_factory.mktemp("video"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posellm_edge.cli", *args], capture_output=True, text=True,
                          cwd=tiny.REPO, timeout=600)


def test_tracked_stream_is_template_decoding_frame_by_frame(tiny_bundle, tmp_path):
    """Tracking from one box, speculative drafts from the previous frame: every frame's answers equal a template
    decode of the same frame and boxes; one complete JSON line per frame."""
    frames, coco, _ = render_video(CFG)
    first = coco["annotations"][0]["bbox"]
    spec = Estimator(tiny_bundle, decoding="speculative")
    template = Estimator(tiny_bundle, decoding="template")
    jsonl = tmp_path / "frames.jsonl"
    summary = run_stream(spec, _frames(frames), Tracker.from_boxes([first], LOOSE), jsonl=jsonl, log=lambda m: None)
    lines = [json.loads(s) for s in jsonl.read_text().splitlines()]
    assert [d["frame"] for d in lines] == list(range(CFG.frames)) and summary.frames == CFG.frames
    worst = 0.0
    for d, rgb in zip(lines, frames):
        (p,) = d["persons"]
        (want,) = template.estimate(rgb, [p["box"]])
        assert p["answers"] == list(want.answers)
        got = np.asarray(p["keypoints"])
        assert np.array_equal(got[:, :2], want.keypoints[:, :2])
        worst = max(worst, float(np.abs(got[:, 2] - want.keypoints[:, 2]).max()))
    s = summary.to_json()
    print(f"{CFG.frames} frames: answers identical to template, max score diff {worst:.2e} (tol 1e-6); "
          f"{s['passes_per_person']:.2f} passes/person, acceptance {s['draft_acceptance']}")
    assert worst <= 1e-6
    assert s["ms_per_person"] > 0 and len(s["draft_acceptance"]) == 6


def test_keypoint_box_follows_the_confident_keypoints():
    kp = np.array([[10, 20, 0.9], [30, 60, 0.8], [50, 30, 0.7], [400, 400, 0.1]], float)
    box = keypoint_box(kp, TrackConfig(keypoint_score=0.5, margin=1.25))
    assert box == pytest.approx((30 - 25, 40 - 25, 50, 50))  # 40x40 → square 40 × 1.25, same centre
    assert keypoint_box(kp, TrackConfig(keypoint_score=0.75, min_keypoints=3)) is None


def test_lost_person_is_dropped_with_a_log_line(tiny_bundle):
    frames, coco, _ = render_video(CFG)
    log: list[str] = []
    tracker = Tracker.from_boxes([coco["annotations"][0]["bbox"]], TrackConfig(lost_score=0.99))
    summary = run_stream(Estimator(tiny_bundle, decoding="speculative"), _frames(frames[:2]), tracker,
                         log=log.append)
    print(log)
    assert summary.frames == 2 and summary.persons == 1  # lost after frame 0, frame 1 has nobody
    assert len(log) == 1 and "person 0 lost: mean keypoint score" in log[0]


def test_detections_reader(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"image_id": 0, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9},
                             {"image_id": 0, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.05},
                             {"image_id": 1, "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.99}]))
    dets = read_detections(f, score_threshold=0.3)
    assert list(dets) == [0] and [d.score for d in dets[0]] == [0.9]
    assert len(read_detections(f)[0]) == 2
    for content, message in (("[]", "is empty"), ("{}", "holds a dict"), ("[{\"bbox\": [1]}]", "entry 0"),
                             ("nope", "not JSON")):
        f.write_text(content)
        with pytest.raises(InputError, match=message):
            read_detections(f)
    f.write_text(json.dumps([{"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.1}]))
    with pytest.raises(InputError, match="none of its 1 person"):
        read_detections(f, score_threshold=0.5)


def test_cli_video_with_detections(tiny_bundle, video_dir, tmp_path):
    import av
    out, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    r = _cli("run", str(tiny_bundle), "--video", str(video_dir / "video.mp4"), "--detections",
             str(video_dir / "detections.json"), "--det-score", "0.5", "--out", str(out), "--json", str(jsonl))
    assert r.returncode == 0, r.stderr
    print(r.stdout.strip().splitlines()[-3])
    lines = [json.loads(s) for s in jsonl.read_text().splitlines()]
    assert len(lines) == CFG.frames and all(len(d["persons"]) == 1 for d in lines)  # the 0.05 box dropped
    assert len({d["persons"][0]["id"] for d in lines}) == 1  # one person, matched frame to frame
    assert "frames/s" in r.stdout and "ms/person" in r.stdout
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == CFG.frames
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["decoding"] == "speculative" and summary["frames"] == CFG.frames


def test_cli_video_tracked_from_box(tiny_bundle, video_dir, tmp_path):
    box = (video_dir / "first_box.txt").read_text().strip()
    r = _cli("run", str(tiny_bundle), "--video", str(video_dir / "video.mp4"), "--box", box, "--lost-score", "0",
             "--keypoint-score", "0", "--json", str(tmp_path / "t.jsonl"), "--max-frames", "3")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["persons"][0]["box"] == [float(v) for v in box.split(",")]


def _one_error_line(r: subprocess.CompletedProcess, message: str) -> None:
    errors = [s for s in r.stderr.replace("\r", "\n").splitlines() if "error:" in s]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(errors) == 1 and message in errors[0], r.stderr
    print(errors[0])


def test_bad_streams_fail_in_one_line(tiny_bundle, video_dir, tmp_path):
    video = str(video_dir / "video.mp4")
    dets = video_dir / "detections.json"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty, unknown = tmp_path / "empty.json", tmp_path / "unknown.json"
    empty.write_text("[]")
    entries = json.loads(dets.read_text())
    unknown.write_text(json.dumps(entries + [{**entries[0], "image_id": 500}]))
    cases = [
        (["--video", str(corrupt), "--box", "1,1,50,50"], "is not a readable video"),
        (["--video", str(tmp_path / "none.mp4"), "--box", "1,1,50,50"], "does not exist"),
        (["--camera", "97", "--box", "1,1,50,50"], "camera 97 could not be opened"),
        (["--video", video, "--detections", str(empty)], "is empty"),
        (["--video", video, "--detections", str(unknown)], "image id(s) not in the video's 5 frames (500)"),
        (["--video", video], "--box x,y,w,h"),
    ]
    for args, message in cases:
        _one_error_line(_cli("run", str(tiny_bundle), *args, "--json", str(tmp_path / "x.jsonl")), message)


def test_truncated_video_keeps_the_jsonl_valid(tiny_bundle, video_dir, tmp_path):
    """A video cut short (a crashed recorder: faststart MP4 whose data stops mid-stream): the frames before the
    cut are written, every JSONL line parses, the failure is one line."""
    import av
    frames, coco, _ = render_video(CFG)
    full = tmp_path / "faststart.mp4"
    with av.open(str(full), mode="w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=CFG.fps)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        for rgb in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    jsonl = tmp_path / "cut.jsonl"
    r = _cli("run", str(tiny_bundle), "--video", str(cut), "--detections", str(video_dir / "detections.json"),
             "--json", str(jsonl), "--out", str(tmp_path / "cut_out.mp4"))
    _one_error_line(r, "cut.mp4")
    lines = [json.loads(s) for s in jsonl.read_text().splitlines()]
    assert 0 < len(lines) < CFG.frames, len(lines)
    print(f"truncated at 60%: {len(lines)} of {CFG.frames} frames written before the error")


def test_detector_boxes_outside_the_frame_are_skipped():
    from runtime.stream import _usable
    assert _usable([10, 10, 50, 50], 160, 120) and _usable([-20, -20, 50, 50], 160, 120)  # partly inside: cropped
    assert not _usable([-100, 10, 50, 50], 160, 120) and not _usable([200, 10, 50, 50], 160, 120)
    assert not _usable([10, 10, 0, 50], 160, 120)


def _shared_video() -> Path | None:
    root = tiny.SHARED / "data"
    found = sorted(p for ext in ("mp4", "mov", "avi", "mkv", "webm") for p in root.rglob(f"*.{ext}")) \
        if root.is_dir() else []
    return found[0] if found else None


def test_real_video_smoke(request, tmp_path):
    """The first video under ../shared/data, 3 frames tracked from a centred box (decoding and the stream on real
    footage; the tiny model's answers are meaningless)."""
    av = pytest.importorskip("av", reason="PyAV not installed (pip install 'posellm-edge[video]')")
    video = _shared_video()
    if video is None:
        pytest.skip("no video under ../shared/data (mp4/mov/avi/mkv/webm)")
    tiny_bundle = request.getfixturevalue("tiny_bundle")  # built only when there is a video to run
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        w, h = s.codec_context.width, s.codec_context.height
    r = _cli("run", str(tiny_bundle), "--video", str(video), "--box", f"{w / 4},{h / 4},{w / 2},{h / 2}",
             "--lost-score", "0", "--keypoint-score", "0", "--max-frames", "3", "--json", str(tmp_path / "r.jsonl"))
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
