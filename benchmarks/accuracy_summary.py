"""Accuracy across benchmarks, per variant: COCO-format AP and MPII PCKh side by side, so a reader sees at a glance
whether int8 / int4 cost more on the zero-shot keypoints than in-domain.

    python -m benchmarks.accuracy_summary EVAL.json [EVAL_MPII.json ...] [--out SUMMARY.md] [--plot PNG]

`bench --eval` takes the same reports and adds these columns to its latency table and plot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runtime.errors import InputError

from .ap_bootstrap import format_interval

# report metric → the columns it contributes: (column, key in the report row, delta key)
INTERVAL = "ΔAP 90%"  # ΔAP's paired-bootstrap interval (eval's delta_AP_ci90), drawn as error bars
COLUMNS = {
    "AP": (("AP", "AP", "delta_AP"), (INTERVAL, "delta_AP_ci90", None)),
    "Mean": (("PCKh", "Mean", "delta_PCKh"), ("PCKh@0.1", "Mean@0.1", "delta_PCKh@0.1"),
             ("PCKh zero-shot", "Zero-shot mean", None)),
}


def read_reports(paths) -> list[dict]:
    reports = []
    for p in paths:
        try:
            rep = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"eval report {str(p)!r} cannot be read: {exc}") from exc
        if not isinstance(rep, dict) or "reference" not in rep or "variants" not in rep:
            raise InputError(f"eval report {str(p)!r} has no reference/variants; expected `posellm-edge eval --out`")
        reports.append(rep)
    return reports


def accuracy_by_variant(reports: list[dict]) -> tuple[list[str], dict[str, dict]]:
    """Column names in order, and per variant name (`reference`, `fp16-template`, ...) its values."""
    columns: list[str] = []
    rows: dict[str, dict] = {}
    for rep in reports:
        metric = rep.get("metric", "AP")
        ref = rep["reference"]
        for col, key, delta in COLUMNS[metric]:
            if col == INTERVAL and not any(key in v for v in rep["variants"]):
                continue  # a report from before eval's intervals
            for c in (col, f"Δ{col}") if delta else (col,):
                if c not in columns:
                    columns.append(c)
            for row in [ref, *rep["variants"]]:
                out = rows.setdefault(row["name"], {})
                out[col] = row.get(key) if row is not ref or col != INTERVAL else None
                if delta:
                    out[f"Δ{col}"] = 0.0 if row is ref else row.get(delta)
    return columns, rows


def markdown(columns: list[str], rows: dict[str, dict]) -> str:
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(vals.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, list):
        return format_interval(v)
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def plot_accuracy(results: list[dict], out: Path, x_key=None) -> None:
    """One panel per accuracy column present (AP, PCKh, PCKh@0.1): variants against ms/person (bench) or side by
    side (no timings)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    cols = [c for c in ("AP", "PCKh", "PCKh@0.1") if any(r.get(c) is not None for r in results)] or ["AP"]
    fig, axes = plt.subplots(1, len(cols), figsize=(6.5 * len(cols), 4.5), squeeze=False)
    for ax, col in zip(axes[0], cols):
        pts = [r for r in results if r.get(col) is not None]
        if not pts and col == "AP":  # no eval report: the speeds alone, on a zero line
            pts = [dict(r, AP=0.0) for r in results]
        for i, r in enumerate(pts):
            x = x_key(r) if x_key else i
            dots = ax.scatter(x, r[col], s=45, label=r["name"], marker="s" if r["name"] == "reference" else "o")
            ci, delta = r.get(INTERVAL), r.get("ΔAP", r.get("delta_AP"))
            if col == "AP" and ci is not None and delta is not None:  # AP = reference + ΔAP, ΔAP in [lo, hi]
                ax.errorbar(x, r[col], yerr=[[delta - ci[0]], [ci[1] - delta]], color=dots.get_facecolor()[0],
                            capsize=3, lw=1)
        if x_key:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("ms / person (p50, log scale)")
        else:
            ax.set_xticks(range(len(pts)), [r["name"] for r in pts], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel({"AP": "COCO keypoint AP", "PCKh": "MPII PCKh@0.5 (Mean)",
                       "PCKh@0.1": "MPII PCKh@0.1 (Mean, read at 0.11)"}[col]
                      if any(r.get(col) is not None for r in results) else "AP (no eval report given)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        if col == "AP" and any(r.get(INTERVAL) for r in pts):
            ax.set_title("bars: ΔAP's 90% paired-bootstrap interval over images", fontsize=8)
    fig.suptitle("posellm-edge: accuracy vs speed" if x_key else "posellm-edge: accuracy per variant")
    fig.tight_layout()
    tmp = Path(out).with_name(Path(out).stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_summary", description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="`posellm-edge eval --out` reports (COCO and/or MPII)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    try:
        columns, rows = accuracy_by_variant(read_reports(args.reports))
    except InputError as exc:
        print(f"accuracy_summary: error: {exc}", file=sys.stderr)
        return 2
    table = markdown(columns, rows)
    print(table)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(table + "\n")
        os.replace(tmp, args.out)
    if args.plot:
        plot_accuracy([{"name": n, **v} for n, v in rows.items()], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
