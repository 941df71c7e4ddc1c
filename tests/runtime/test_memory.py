"""Peak-RSS summary lines: a ratio to the variant only where the variant outweighs the process (>= 1 GB)."""
from __future__ import annotations

import sys

import pytest

from runtime.memory import RATIO_MIN_VARIANT_BYTES, current_rss_bytes, peak_rss_bytes, peak_rss_context


def test_large_variant_gets_the_ratio():
    line = peak_rss_context(peak_bytes=14_700_000_000, variant_bytes=14_100_000_000, baseline_bytes=600_000_000)
    print(line)
    assert line == "1.04x the variant"


def test_small_variant_gets_the_process_baseline_not_a_ratio():
    # the shipped small model: a 4.8 MB variant under a 0.62 GB process peak used to print "(129.00x)"
    line = peak_rss_context(peak_bytes=620_000_000, variant_bytes=4_800_000, baseline_bytes=552_000_000)
    print(line)
    assert line == "process baseline 0.552 GB before this step; the variant is under 1 GB"
    assert "x the variant" not in peak_rss_context(1, RATIO_MIN_VARIANT_BYTES - 1, 1)
    assert "x the variant" in peak_rss_context(1, RATIO_MIN_VARIANT_BYTES, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmRSS / VmHWM come from Linux's /proc")
def test_current_rss_is_below_the_peak():
    now, peak = current_rss_bytes(), peak_rss_bytes()
    print(f"RSS now {now / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB")
    assert 0 < now <= peak


def test_trim_heap_is_harmless():
    from runtime.memory import trim_heap
    trim_heap()  # glibc: returns free heap pages; elsewhere a no-op
    assert current_rss_bytes() >= 0


def test_no_heap_hugepages_turns_numpys_advice_off_inside_and_restores_it():
    pytest.importorskip("numpy._core.multiarray", reason="numpy 1.x: its hugepage switch lives elsewhere")
    from numpy._core.multiarray import _get_madvise_hugepage, _set_madvise_hugepage

    from runtime.memory import no_heap_hugepages
    before = _get_madvise_hugepage()
    _set_madvise_hugepage(True)
    try:
        with no_heap_hugepages():
            assert _get_madvise_hugepage() is False
        assert _get_madvise_hugepage() is True
        with pytest.raises(RuntimeError), no_heap_hugepages():  # restored on an error too
            raise RuntimeError("inside")
        assert _get_madvise_hugepage() is True
    finally:
        _set_madvise_hugepage(before)
