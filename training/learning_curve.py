"""Plot a `training.train` log (train_log.txt) as learning curves: the main loss term of every phase over its
steps, the probe scores (vision: heatmap soft-argmax pixel error; base / finetune: probe-set AP) and, where the
probe logged them, the per-digit answer cross-entropy and the image-shuffle gap (training.probes).

    python -m training.learning_curve models/posellm-small/train_log.txt models/posellm-small/learning_curve.png
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

STEP = re.compile(r"\] (\w+) step +(\d+)  loss ([\d.]+)(?:  ce ([\d.]+))?")
PROBE = re.compile(r"\] (\w+) probe at step (\d+): (.*)$")
PIXELS = re.compile(r"soft-argmax error mean ([\d.]+) px")
AP = re.compile(r'"AP": ([\d.]+)')
DIGITS = re.compile(r"digit ce \[x3 y3\] ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)")
GAP = re.compile(r"shuffle gap ([+-][\d.]+) nats")


Series = dict[str, list[tuple[int, float]]]


def parse(log: str) -> tuple[Series, Series, dict[str, Series]]:
    """→ ({phase: [(step, main loss)]}, {phase: [(step, probe score)]}, {phase: {readout series: [(step, v)]}});
    main loss = `ce` when logged, else loss; readout series: first digit CE, second digit CE (mean of x and y),
    shuffle gap. A resumed run repeats some steps: the later line wins."""
    curves: dict[str, dict[int, float]] = {}
    probes: dict[str, dict[int, float]] = {}
    readout: dict[str, dict[str, dict[int, float]]] = {}
    for line in log.splitlines():
        if m := STEP.search(line):
            curves.setdefault(m[1], {})[int(m[2])] = float(m[4] or m[3])
        elif m := PROBE.search(line):
            phase, step, text = m[1], int(m[2]), m[3]
            px, ap = PIXELS.search(text), AP.search(text)
            if phase == "vision" and px:
                probes.setdefault(phase, {})[step] = float(px[1])
            elif ap:
                probes.setdefault(phase, {})[step] = float(ap[1])
            if d := DIGITS.search(text):
                ce = [float(v) for v in d.groups()]
                series = readout.setdefault(phase, {})
                series.setdefault("1st digit CE", {})[step] = (ce[0] + ce[3]) / 2
                series.setdefault("2nd digit CE", {})[step] = (ce[1] + ce[4]) / 2
                if g := GAP.search(text):
                    series.setdefault("shuffle gap", {})[step] = float(g[1])
    as_lists = lambda d: {k: sorted(v.items()) for k, v in d.items()}  # noqa: E731
    return as_lists(curves), as_lists(probes), {k: as_lists(v) for k, v in readout.items()}


def plot(log_path: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves, probes, readout = parse(log_path.read_text())
    phases = list(curves)
    rows = 3 if readout else 2
    fig, axes = plt.subplots(rows, len(phases), figsize=(4.2 * len(phases), 3 * rows), squeeze=False)
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
        if rows == 3:
            ax = axes[2, i]
            for name, series in readout.get(phase, {}).items():
                steps, values = zip(*series)
                ax.plot(steps, values, marker=".", label=name)
            if readout.get(phase):
                ax.axhline(2.303, color="grey", lw=0.8, ls=":")  # ln 10: a digit guessed uniformly
                ax.legend(fontsize=7)
            ax.set_title(f"{phase} probe: digit CE (nats), image-shuffle gap", fontsize=9)
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
