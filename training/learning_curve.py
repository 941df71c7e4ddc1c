"""Plot a `training.train` log (train_log.txt) as learning curves: the main loss term of every phase over its
steps, and the probe scores (vision: heatmap soft-argmax pixel error; base / finetune: probe-set AP).

    python -m training.learning_curve models/posellm-small/train_log.txt models/posellm-small/learning_curve.png
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

STEP = re.compile(r"\] (\w+) step +(\d+)  loss ([\d.]+)(?:  ce ([\d.]+))?")
PROBE = re.compile(r"\] (\w+) probe at step (\d+): (.*)$")
PIXELS = re.compile(r"soft-argmax error mean ([\d.]+) px")


def parse(log: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """→ ({phase: [(step, main loss)]}, {phase: [(step, probe score)]}); main loss = `ce` when logged, else loss.
    A resumed run repeats some steps: the later line wins."""
    curves: dict[str, dict[int, float]] = {}
    probes: dict[str, dict[int, float]] = {}
    for line in log.splitlines():
        if m := STEP.search(line):
            curves.setdefault(m[1], {})[int(m[2])] = float(m[4] or m[3])
        elif m := PROBE.search(line):
            px = PIXELS.search(m[3])
            score = float(px[1]) if px else float(json.loads(m[3])["AP"])
            probes.setdefault(m[1], {})[int(m[2])] = score
    as_lists = lambda d: {k: sorted(v.items()) for k, v in d.items()}  # noqa: E731
    return as_lists(curves), as_lists(probes)


def plot(log_path: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves, probes = parse(log_path.read_text())
    phases = list(curves)
    fig, axes = plt.subplots(2, len(phases), figsize=(4.2 * len(phases), 6), squeeze=False)
    for i, phase in enumerate(phases):
        steps, values = zip(*curves[phase])
        ax = axes[0, i]
        ax.plot(steps, values)
        ax.set_title(f"{phase}: " + ("heatmap cross-entropy (nats)" if phase == "vision"
                                     else "answer cross-entropy (nats/token)"), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax = axes[1, i]
        if probes.get(phase):
            steps, values = zip(*probes[phase])
            ax.plot(steps, values, marker="o")
        ax.set_title(f"{phase} probe: " + ("soft-argmax error (px, 112 px crop)" if phase == "vision"
                                           else "probe-set AP (%)"), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(plot(Path(sys.argv[1]), Path(sys.argv[2])))
