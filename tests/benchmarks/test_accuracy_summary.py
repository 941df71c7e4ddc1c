"""COCO AP and MPII PCKh side by side per variant: the summary table, bench's columns and the plot."""
from __future__ import annotations

import json

import pytest

from benchmarks.accuracy_summary import accuracy_by_variant, main, markdown, read_reports
from benchmarks.bench import _attach_accuracy, markdown_table
from runtime.errors import InputError


def _reports(tmp_path):
    coco = {"metric": "AP", "reference": {"name": "reference", "AP": 70.0},
            "variants": [{"name": "fp16-template", "AP": 69.5, "delta_AP": -0.5},
                         {"name": "int4-template", "AP": 68.0, "delta_AP": -2.0,
                          "delta_AP_ci90": [-3.0, -1.25]}]}
    mpii = {"metric": "Mean", "reference": {"name": "reference", "Mean": 90.0, "Mean@0.1": 40.0,
                                            "Zero-shot mean": 60.0},
            "variants": [{"name": "int4-template", "Mean": 85.0, "Mean@0.1": 30.0, "Zero-shot mean": 50.0,
                          "delta_PCKh": -5.0, "delta_PCKh@0.1": -10.0}]}
    paths = [tmp_path / "coco.json", tmp_path / "mpii.json"]
    for p, r in zip(paths, (coco, mpii)):
        p.write_text(json.dumps(r))
    return paths, [coco, mpii]


def test_columns_and_rows_join_by_variant_name(tmp_path):
    _, reports = _reports(tmp_path)
    columns, rows = accuracy_by_variant(reports)
    assert columns == ["AP", "ΔAP", "ΔAP 90%", "PCKh", "ΔPCKh", "PCKh@0.1", "ΔPCKh@0.1", "PCKh zero-shot"]
    assert rows["int4-template"] == {"AP": 68.0, "ΔAP": -2.0, "ΔAP 90%": [-3.0, -1.25], "PCKh": 85.0,
                                     "ΔPCKh": -5.0, "PCKh@0.1": 30.0, "ΔPCKh@0.1": -10.0, "PCKh zero-shot": 50.0}
    assert rows["reference"]["ΔAP 90%"] is None and rows["fp16-template"]["ΔAP 90%"] is None
    assert rows["reference"]["ΔPCKh"] == 0.0 and "PCKh" not in rows["fp16-template"]
    table = markdown(columns, rows)
    assert "| int4-template | 68.00 | -2.00 | [-3.00, -1.25] | 85.00 | -5.00 | 30.00 | -10.00 | 50.00 |" in table
    assert "| fp16-template | 69.50 | -0.50 | – | – |" in table
    old = dict(reports[0], variants=[{k: v for k, v in r.items() if k != "delta_AP_ci90"}
                                     for r in reports[0]["variants"]])
    assert accuracy_by_variant([old])[0] == ["AP", "ΔAP"]  # reports from before the intervals


def test_bench_table_gets_both_benchmarks(tmp_path):
    paths, _ = _reports(tmp_path)
    results = [{"name": n, "backend": "onnxruntime", "ms_per_person": {"p50": 10.0, "p90": 11.0, "p99": 12.0},
                "persons_per_s": {"1": 100.0}, "peak_rss_mb": 50.0} for n in ("reference", "int4-template")]
    cols = _attach_accuracy(results, tuple(paths))
    assert results[1]["AP"] == 68.0 and results[1]["delta_AP"] == -2.0 and results[1]["PCKh"] == 85.0
    table = markdown_table(results, cols)
    assert "| AP | ΔAP | ΔAP 90% | PCKh | ΔPCKh |" in table
    assert "| 68.000 | -2.000 | [-3.00, -1.25] | 85.000 | -5.000 |" in table


def test_cli_writes_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the [bench] extra)")
    paths, _ = _reports(tmp_path)
    assert main([*map(str, paths), "--out", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")]) == 0
    assert "PCKh" in (tmp_path / "s.md").read_text() and (tmp_path / "s.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text("{}")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "no reference/variants" in capsys.readouterr().err
    with pytest.raises(InputError, match="missing.json"):
        read_reports([tmp_path / "missing.json"])
