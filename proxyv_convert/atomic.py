"""Atomic output folders: build in a temporary folder next to the destination, then rename it into place.

Nothing half-written is ever left where a user expects a model, and an existing folder is replaced (with
`overwrite`) only once its replacement is complete.

Temporary files and folders are created exclusively under unpredictable names (a planted file or symlink is never
written through), and a command that writes into a model folder holds the folder's lock (`folder_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ProxyVError

LOCK_FILE = ".proxyv.lock"  # in a folder a command writes into (see folder_lock); push ignores dot files
STALE_AFTER_S = 60.0  # a temporary folder this old without a lock file belongs to no running command

_locked: set[tuple[int, int]] = set()  # (device, inode) of the folders this process holds the lock of


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
    """Yield a new temporary folder (empty but for its lock file); on success it becomes `out`, on any failure (or
    Ctrl-C) it is removed.

    Missing parent folders are created, and removed again on failure. Temporary folders that killed commands left
    beside `out` are removed first (see `remove_stale_siblings`).
    """
    out = Path(out).absolute()
    check_output(out, overwrite=overwrite)
    created = _make_parents(out.parent)
    tmp = None
    try:
        with contextlib.ExitStack() as locks:
            remove_stale_siblings(out)
            tmp = _fresh_sibling(out, "tmp")
            # its lock tells a later run that this folder is not stale while we live; it moves into `out` with it
            fd = _lock(tmp)
            locks.callback(_unlock, fd, tmp / LOCK_FILE, out / LOCK_FILE)
            yield tmp
            check_output(out, overwrite=overwrite)  # someone may have created `out` meanwhile
            # a folder being replaced must not be one another command is writing into
            with folder_lock(out) if out.is_dir() else contextlib.nullcontext():
                _move_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def remove_stale_siblings(out: Path) -> None:
    """Remove the temporary folders (`.OUT.proxyv-tmp-*`) and replaced folders (`.OUT.proxyv-old-*`) that killed
    commands left beside `out`: those whose lock no live process holds. A replaced folder is kept while `out` is
    missing (a command killed between its two renames): it is then the only copy of the old model."""
    out = Path(out).absolute()
    kinds = ["tmp", "old"] if out.is_dir() else ["tmp"]
    for kind in kinds:
        for path in out.parent.glob(f".{glob.escape(out.name)}.proxyv-{kind}-*"):
            if path.is_dir() and not path.is_symlink():
                _remove_if_stale(path)


def _remove_if_stale(folder: Path) -> None:
    """Remove `folder` if it belongs to no live process: its lock file is locked by nobody (we hold it while we
    remove the folder) or, without a lock file (older versions), it was last changed more than STALE_AFTER_S ago."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(folder, ignore_errors=True)
        return
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked: its command is still running
        os.close(fd)
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path, *, create: bool = False) -> Iterator[None]:
    """Hold the advisory lock of `folder` (flock on its `.proxyv.lock`) while a command writes into it.

    Another command that wants to write into the folder gets a ProxyVError naming this process instead of mixing its
    files with ours. Nested use within one process (the stages of `proxyv run`) shares the outer lock. The kernel
    releases the lock of a killed process; the lock file is removed on release. With `create`, a missing folder (and
    its missing parents) is created, and removed on release if nothing else was put in it.
    """
    folder = Path(folder)
    created = _make_parents(folder) if create else []
    try:
        try:
            info = folder.stat()
        except OSError:
            raise ProxyVError(f"{folder} does not exist; check the path") from None
        key = (info.st_dev, info.st_ino)
        if key in _locked:
            yield
            return
        fd = _lock(folder)
        _locked.add(key)
        try:
            yield
        finally:
            _locked.discard(key)
            _unlock(fd, folder / LOCK_FILE)
    finally:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()


def _lock(folder: Path) -> int:
    path = folder / LOCK_FILE
    while True:
        try:  # O_NOFOLLOW: a symlink planted at the lock file's name is refused, not followed
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ProxyVError(f"{path} is a symbolic link, not a proxyv lock file; remove it") from None
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ProxyVError(f"{folder} is not writable; make it writable or choose another folder") from None
            raise ProxyVError(f"cannot create {path} ({e.strerror}); remove whatever is in its place") from None
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or opened.st_nlink > 1:  # never write into a linked or special file
            os.close(fd)
            raise ProxyVError(f"{path} is not a proxyv lock file (a link or a special file); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ProxyVError(f"{folder} is in use by another proxyv command{pid}; wait for it to finish") from None
        # the previous holder may have removed the file between our open and our lock: then lock the new one
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(path, follow_symlinks=False)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)


def _unlock(fd: int, *paths: Path) -> None:
    """Remove the lock file (at whichever of `paths` it is now, unless another one is there by now) while still
    holding it, then release it."""
    try:
        held = os.fstat(fd)
        for path in paths:
            with contextlib.suppress(OSError):
                current = os.stat(path, follow_symlinks=False)
                if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                    os.unlink(path)
                    break
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Raise ProxyVError unless files can be created in `folder` or, while it does not exist, in the nearest folder
    above it (where it would be created): run before any long work whose results go there."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ProxyVError(f"cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ProxyVError(f"{existing} is not writable; make it writable or choose another folder")


def file_mode(mode: int = 0o666) -> int:
    """`mode` less the process's umask: what open() or mkdir() would have given a new file or folder."""
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield the path of a new, empty file beside `target` to write; on success it replaces `target`, on failure it
    is removed.

    The file is created exclusively (O_CREAT|O_EXCL) under an unpredictable name, so a file or symlink planted beside
    the target is never written through; `os.replace` replaces a symlink at `target` itself rather than its target.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600 files: give it the mode open() would have
        os.close(fd)
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """Replace the file at `path` with `text` atomically (written beside it, then renamed over it; see `replacing`)."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", opener=_no_follow) as f:
        f.write(text)
    return path


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _make_parents(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    for path in missing:
        path.mkdir()
    return missing


def _fresh_sibling(out: Path, kind: str) -> Path:
    """Create a hidden, empty folder next to `out` (same filesystem, so renames are atomic)."""
    path = out.with_name(f".{out.name}.proxyv-{kind}-{secrets.token_hex(8)}")
    path.mkdir()  # exclusive (fails on any existing name, a symlink too); honours the umask, unlike tempfile.mkdtemp
    return path


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.proxyv-old-{secrets.token_hex(8)}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)
