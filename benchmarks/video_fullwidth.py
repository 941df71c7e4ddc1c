"""Issue 27 at the real model's width: template vs speculative ms/person on the synthetic video, onnxruntime CPU.

A random posellm-7b-width checkpoint (ViT-L/14 + Vicuna-7B width, N LLM layers: benchmarks/export_memory.py) is
exported fp32 with each K of --logits-positions (default 12: the suffix prefill verifies the whole draft), and
`bench --video` times template decoding, speculative decoding with the stream's acceptance gate and speculative
decoding drafting every frame (min_rate 0) and with perfect drafts (the bound), interleaved frame by frame on the
same boxes, all over one set of sessions per bundle (~4 GB at 2 layers). Random weights make the answers
meaningless, but they must still be identical across all, and the draft acceptance is whatever this random model's
frame-to-frame stability gives (reported, not assumed).

    python -m benchmarks.video_fullwidth --tokenizer ../shared/fixtures/llama-tokenizer --layers 2 --frames 4 \\
        --out benchmarks/results/cpu-fullwidth-video-bench.json
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.export_memory import write_checkpoint
from benchmarks.video_bench import VideoBenchConfig, video_benchmark
from exporter.bundle import ExportConfig, export_bundle
from runtime.acceptance import AcceptanceConfig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, type=Path, help="dir with tokenizer.json (LLaMA's, 32000 ids)")
    p.add_argument("--preset", default="posellm-7b", help="model shapes (tiny: a CPU smoke test)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=4, help="frames timed after 1 warm-up frame")
    p.add_argument("--logits-positions", default="12", help="K per exported bundle, comma separated (e.g. 4,12)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/video_fullwidth"))
    a = p.parse_args(argv)
    ckpt = a.work / "ckpt"
    write_checkpoint(ckpt, a.tokenizer, a.preset, a.layers)
    bundles = []
    for k in (int(v) for v in a.logits_positions.split(",")):
        bundles.append(a.work / f"bundle-k{k}")
        export_bundle(ExportConfig(ckpt, bundles[-1], precisions=("fp32",), max_persons=1, logits_positions=k,
                                   overwrite=True, validate=False))
    shutil.rmtree(ckpt, ignore_errors=True)
    report = video_benchmark(VideoBenchConfig(tuple(bundles), warmup=1, max_frames=a.frames + 1, out=a.out,
                                              acceptance=(AcceptanceConfig(), AcceptanceConfig(min_rate=0.0)),
                                              oracle=True))
    return report


if __name__ == "__main__":
    main()
