"""This process's peak resident memory (Linux's VmHWM, resettable), for the export, quantize and bench reports."""
from __future__ import annotations

import resource
from pathlib import Path


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
