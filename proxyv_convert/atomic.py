"""Atomic output folders: build in a temporary folder next to the destination, then rename it into place.

Nothing half-written is ever left where a user expects a model, and an existing folder is replaced (with
`overwrite`) only once its replacement is complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import ProxyVError


def check_output(out: Path, *, overwrite: bool, source: Path | None = None) -> None:
    """Raise ProxyVError unless `out` can be (re)created: run before any work so that bad input costs nothing."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ProxyVError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        if not out.is_dir() or out.is_symlink():
            raise ProxyVError(f"{out} exists and is not a folder; remove it or choose another --out")
    if source is not None:
        _check_not_nested(out, Path(source))
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ProxyVError(f"cannot create {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ProxyVError(f"cannot create {out}: {ancestor} is not writable")


def _check_not_nested(out: Path, source: Path) -> None:
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents:
        raise ProxyVError(f"--out {out} is inside the source folder {source}; choose a folder outside it")
    if out in source.parents:
        raise ProxyVError(f"--out {out} contains the source folder {source}; choose another folder")


@contextlib.contextmanager
def atomic_output(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `out`, on any failure (or Ctrl-C) it is removed.

    Missing parent folders are created, and removed again on failure.
    """
    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    created = _make_parents(out.parent)
    tmp = None
    try:
        tmp = _fresh_sibling(out, "tmp")
        yield tmp
        check_output(out, overwrite=overwrite)  # someone may have created `out` meanwhile
        _move_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_text(path: Path, text: str) -> Path:
    """Replace the file at `path` with `text` atomically (written beside it, then renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _make_parents(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    for path in missing:
        path.mkdir()
    return missing


def _fresh_sibling(out: Path, kind: str) -> Path:
    """Create a hidden, empty folder next to `out` (same filesystem, so renames are atomic)."""
    path = out.with_name(f".{out.name}.proxyv-{kind}-{secrets.token_hex(4)}")
    path.mkdir()  # honours the umask, unlike tempfile.mkdtemp (0700)
    return path


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.proxyv-old-{secrets.token_hex(4)}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)
