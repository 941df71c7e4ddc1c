"""`posellm-edge bench BUNDLE [BUNDLE ...] --video [IN.mp4 --detections DETS.json] --out VIDEO_BENCH.json`:
ms/person of template vs speculative decoding on a video, every (bundle, decoding) in turn on each frame.

All frames are decoded up front (video decoding is not timed) and every estimator gets the same boxes per frame
(the detections, default: the synthetic walking-figure video and its ground-truth boxes), so the answers must be
identical: the report counts identical keypoints and the max score difference against the first estimator.
Each speculative estimator drafts from its own previous frame, through its own acceptance gate (AcceptanceConfig:
one estimator per gate; min_rate 0 drafts every frame); with `oracle`, one more per bundle is given each frame's
own template answers as drafts: the bound no draft can beat. Estimators of one bundle share its sessions. The order
of the estimators rotates per frame, so on a shared machine every one sees the same load. Warm-up frames are
excluded. Pass a bundle exported with `--logits-positions 12` to verify the whole draft in the suffix prefill (see
runtime/speculative.py).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.acceptance import AcceptanceConfig, AcceptanceTracker
from runtime.backends.base import Stopwatch
from runtime.detections import read_detections
from runtime.estimator import Estimator
from runtime.speculative import SpeculativeConfig
from runtime.manifest import load_manifest
from runtime.results import write_json
from runtime.stream import StreamSummary
from runtime.video import VideoSource

from .bench import STAGES, _pct, environment

ORACLE = "speculative-oracle"  # drafts = this frame's template answers: what no real draft can beat


@dataclass(frozen=True)
class VideoBenchConfig:
    bundles: tuple[Path, ...]
    video: Path | None = None  # None: the synthetic walking figure (training/data/video.py), 3 s at 10 fps
    detections: Path | None = None  # with --video: COCO results, image_id = frame index
    det_score: float = 0.5
    precision: str = "fp32"
    backend: str = "onnxruntime"
    decodings: tuple[str, ...] = ("template", "speculative")
    speculative: tuple[SpeculativeConfig, ...] = (SpeculativeConfig(),)  # each timed as its own estimator
    oracle: bool = False  # also time speculative decoding with perfect drafts (the upper bound of any draft)
    acceptance: tuple[AcceptanceConfig, ...] = (AcceptanceConfig(),)  # who gets a draft (the stream's default)
    warmup: int = 2  # frames
    max_frames: int | None = None
    threads: int | None = None
    out: Path | None = None


def _load(cfg: VideoBenchConfig, tmp: Path) -> tuple[str, list[np.ndarray], list[list]]:
    video, dets = cfg.video, cfg.detections
    if video is None:
        from training.data.video import VideoConfig, generate_video
        root = generate_video(VideoConfig(), tmp / "video")
        video, dets = root / "video.mp4", root / "detections.json"
    if dets is None:
        raise SystemExit("bench --video FILE needs --detections DETS.json (the same boxes for every decoding)")
    detections = read_detections(dets, cfg.det_score)
    source = VideoSource(video)
    try:
        frames = [f.rgb for f in source][: cfg.max_frames]
    finally:
        source.close()
    boxes = [[d.box for d in detections.get(i, [])] for i in range(len(frames))]
    return str(video), frames, boxes


def video_benchmark(cfg: VideoBenchConfig, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        video, frames, boxes = _load(cfg, Path(tmp))
    spec = [(sc, ac) for sc in cfg.speculative for ac in cfg.acceptance]
    runs = [(b, d, sc, ac) for b in cfg.bundles for d in cfg.decodings
            for sc, ac in (spec if d == "speculative" else [(SpeculativeConfig(), AcceptanceConfig())])]
    if cfg.oracle:  # the bound: speculative decoding given this frame's own answers (template's) as drafts
        runs += [(b, ORACLE, SpeculativeConfig(), AcceptanceConfig(min_rate=0.0)) for b in cfg.bundles]
    # one set of sessions per bundle, every decoding over it (full width: one copy of the weights, not one each)
    base = {b: Estimator(b, precision=cfg.precision, backend=cfg.backend, threads=cfg.threads) for b in cfg.bundles}
    ests = [base[b].with_decoding("speculative" if d == ORACLE else d, sc) for b, d, sc, _ in runs]
    last: list[list | None] = [None] * len(ests)
    gates = [AcceptanceTracker(tuple(e.manifest.prompts.digit_ids), tuple(e.manifest.prompts.digit_positions),
                               ac) for e, (_, _, _, ac) in zip(ests, runs)]
    times: list[list[float]] = [[] for _ in ests]
    summaries = [StreamSummary() for _ in ests]
    stage_ms: list[dict[str, list[float]]] = [{s: [] for s in STAGES} for _ in ests]
    same = total = 0
    worst = 0.0
    for i, (rgb, bx) in enumerate(zip(frames, boxes)):
        if not bx:
            continue
        results: list = [None] * len(ests)
        truth = base[cfg.bundles[0]].with_decoding("template").estimate(rgb, bx) if cfg.oracle else None  # untimed
        for j in np.roll(np.arange(len(ests)), -i):
            watch = Stopwatch()
            t0 = time.perf_counter()
            keys = list(range(len(bx)))  # the same boxes every frame order: box i is person i
            lasts = last[j] if last[j] is not None and len(last[j]) == len(bx) else [None] * len(bx)
            drafts = gates[j].drafts(keys, lasts) if ests[j].config.decoding == "speculative" else None
            if runs[j][1] == ORACLE:
                drafts = truth
            results[j] = ests[j].estimate(rgb, bx, watch=watch, drafts=drafts)
            dt = time.perf_counter() - t0
            gates[j].update(keys, lasts, results[j])
            last[j] = results[j]
            if i >= cfg.warmup:
                times[j].append(dt / len(bx))
                summaries[j].add(watch)
                summaries[j].persons += len(bx)
                summaries[j].frames += 1
                summaries[j].estimate_seconds += dt
                for s in STAGES:
                    stage_ms[j][s].append(watch.seconds.get(s, 0.0) / len(bx))
        for r in results[1:]:
            for a, b in zip(results[0], r):
                same += sum(x == y for x, y in zip(a.tokens, b.tokens))
                total += len(a.tokens)
                worst = max(worst, float(np.abs(a.keypoints[:, 2] - b.keypoints[:, 2]).max()))
    rows = []
    for (bundle, decoding, sc, _), t, s, st, gate in zip(runs, times, summaries, stage_ms, gates):
        sj = s.to_json()
        rows.append({"bundle": str(bundle), "logits_positions": load_manifest(bundle, verify=False).dims.logits_positions,
                     "decoding": decoding, **({"speculative": asdict(sc)} if decoding == "speculative" else {}),
                     "ms_per_person": _pct(t), "ms_per_person_mean": 1e3 * float(np.mean(t)),
                     "stages_ms_mean": {k: round(1e3 * float(np.mean(v)), 3) for k, v in st.items()},
                     "passes_per_person": sj["passes_per_person"],
                     "row_passes_per_person": sj["row_passes_per_person"], "draft_acceptance": sj["draft_acceptance"],
                     **({"speculation": gate.to_json()} if decoding == "speculative" else {})})
        if decoding == ORACLE:
            rows[-1]["speculative"] = asdict(sc)
    base = rows[0]["ms_per_person"]["p50"]
    for r in rows:
        r["speedup_p50_vs_first"] = round(base / r["ms_per_person"]["p50"], 3)
        gate = r.get("speculation", {}).get("config", {})
        label = r["decoding"] + (f" (gate {gate['min_rate']})" if gate else "")
        log(f"{Path(r['bundle']).name} (K={r['logits_positions']}) {label:<24} p50 "
            f"{r['ms_per_person']['p50']:.1f} ms/person, {r['speedup_p50_vs_first']:.2f}x, "
            f"{r['passes_per_person']:.2f} passes/person, acceptance {r['draft_acceptance']}")
    report = {"video": video, "frames": len(frames), "warmup_frames": cfg.warmup, "precision": cfg.precision,
              "backend": cfg.backend, "identical_keypoints": same, "compared_keypoints": total,
              "identical": same == total, "max_score_diff": worst, "results": rows, "environment": environment()}
    log(f"answers: {same}/{total} keypoints token-identical to the first estimator, max score diff {worst:.2e}")
    if cfg.out is not None:
        write_json(cfg.out, report)
    return report
