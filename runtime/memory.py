"""This process's peak resident memory (Linux's VmHWM, resettable), for the export, quantize and bench reports."""
from __future__ import annotations

import functools
import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def peak_rss_bytes() -> int:
    """Peak RSS so far (since the start or the last `reset_peak_rss`): VmHWM where /proc has it, else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux/BSD report KiB


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux: "5" to /proc/self/clear_refs); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_rss_bytes() -> int:
    """Resident memory now (VmRSS); 0 where /proc has no status file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# Below this a variant is smaller than the interpreter and its libraries (torch alone is ~0.4 GB resident): the
# peak is the process, not the variant, and "peak / variant" (129x for the shipped small model) says nothing.
RATIO_MIN_VARIANT_BYTES = 10**9


def peak_rss_context(peak_bytes: int, variant_bytes: int, baseline_bytes: int) -> str:
    """What a peak RSS is relative to, for a summary line: the variant's size where the variant is >= 1 GB
    ("1.04x the variant"), otherwise the process's resident memory before the step began."""
    if variant_bytes >= RATIO_MIN_VARIANT_BYTES:
        return f"{peak_bytes / variant_bytes:.2f}x the variant"
    return f"process baseline {baseline_bytes / 1e9:.3f} GB before this step; the variant is under 1 GB"


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op). onnxruntime's freed
    session buffers otherwise stay in this process's RSS (quantize's peak RSS steps, issue #24)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once (a CDLL per call also left a reference cycle behind for the GC each time)."""
    import ctypes
    import ctypes.util
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
HEAP_MMAP_THRESHOLD = 4 << 20


@contextmanager
def no_heap_hugepages() -> Iterator[None]:
    """Keep freed large arrays from staying resident as transparent huge pages, for a long numeric step (quantize).

    numpy advises MADV_HUGEPAGE on every array of 4 MB or more. glibc serves arrays under its mmap threshold —
    which it raises to 32 MB after the first large free — from its heap, so those heap ranges become huge-page
    ranges, and khugepaged (max_ptes_none 511) refills them as whole 2 MB pages while they are mostly free: the
    process's peak grew ~0.4 GB per quantized 7B layer though every group started from the same RSS (issue #24).
    Inside: numpy stops advising (restored after), and arrays of 4 MB or more are mmapped, so a freed one leaves
    at once (glibc's threshold stays fixed for the process: mallopt cannot hand it back to the dynamic rule)."""
    prev = _set_numpy_hugepage(False)
    _mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if prev is not None:
            _set_numpy_hugepage(prev)


def _set_numpy_hugepage(enabled: bool) -> bool | None:
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy 1.x
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return None
    return bool(_set_madvise_hugepage(enabled))


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(_libc().mallopt(param, value))
    except (OSError, AttributeError):
        return False
