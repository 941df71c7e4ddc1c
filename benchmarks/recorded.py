"""A benchmark's results file is written whatever happens: `status` ok or failed (with the error), scratch removed."""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runtime.results import write_json


@contextlib.contextmanager
def recorded(out: Path, res: dict[str, Any], work: Path | None = None) -> Iterator[dict[str, Any]]:
    res["status"] = "running"
    write_json(out, res)
    try:
        yield res
        res["status"] = "ok"
    except BaseException as e:
        res["status"] = "failed"
        res["error"] = f"{type(e).__name__}: {e}"[:3000]
        raise
    finally:
        write_json(out, res)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
