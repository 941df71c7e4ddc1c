"""Paths named inside files someone else wrote (manifests, shard indexes, ONNX external data) stay inside their
directory: relative, no `..`, and no symlink that leads out. Bundles and checkpoints are shared artefacts; a
crafted `"../../etc/passwd"` or `"/data/other.bin"` must fail with one line, never be read (or hashed, or mapped).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import BundleError


class UnsafePathError(BundleError, ValueError):
    """A file names a path outside its own directory."""


def relative_name(name: str, what: str, root: str | Path, error: type[Exception] = UnsafePathError) -> str:
    """`name` itself, provided it is a relative path without a `..` part (checked by its text only: annotation files
    use it for image names, whose folders are often symlinks into a dataset store)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{what}: path {name!r} is not a file name; expected a relative path inside {root}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise error(f"{what}: path {name!r} is absolute; expected a path relative to {root}")
    if ".." in posix.parts or ".." in windows.parts:
        raise error(f"{what}: path {name!r} contains '..'; expected a path inside {root}")
    return name


def inside(root: str | Path, name: str, what: str) -> Path:
    """`root / name`, provided `name` is relative, has no `..` part and resolves (symlinks followed) under root."""
    relative_name(name, what, root)
    base = Path(root).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{what}: path {name!r} resolves to {target}, outside {base} (a symlink out?)")
    return base / name
