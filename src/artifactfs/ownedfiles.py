"""Files a live process owns through an flock, found free once it has died.

The redo log (`index/redo.py`) and the small-block journal (`blobs/journal.py`) keep what a
daemon promised in files of its own: each is flocked by its owner for as long as the owner
lives, so a free lock means the owner is gone and its file is to be recovered. A file is
created under a `*.new` name and renamed only once it is locked, so that a scan never finds a
live file free; a `*.new` left by a process that died in between holds nothing and is removed
once it is `CREATION_GRACE` seconds old and unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

CREATION_GRACE = 60.0
_NEW = ".new"


def create_locked(directory: Path, name: str) -> tuple[int, Path]:
    """Create `directory/name` (which must be new), flocked: (fd opened for appending, path)."""
    path = directory / name
    creating = directory / (name + _NEW)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(creating, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when we die
        os.rename(creating, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(creating)
        raise
    return fd, path


def remove_cut_creations(directory: Path, *, older_than: float = CREATION_GRACE) -> int:
    """Remove the `*.new` files of processes that died while creating one (between its
    creation and its rename: nothing was written yet). One is taken for cut short only once
    it is older than `older_than` seconds and unlocked, since its creator takes the lock just
    after creating it. Returns how many were removed."""
    removed = 0
    try:
        entries = [e for e in os.scandir(directory) if e.name.endswith(_NEW)]
    except FileNotFoundError:
        return 0
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        except BlockingIOError:  # its creator is alive and about to rename it
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d file(s) in %s whose creation a crash cut short", removed, directory)
    return removed


def owned_files(directory: Path, suffix: str, own: Path | None = None) -> list[os.DirEntry[str]]:
    """The files named `*suffix` in `directory`, `own` left out."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    mine = None if own is None else str(own)
    return [e for e in entries if e.name.endswith(suffix) and e.path != mine]


def lock_if_free(path: str) -> int | None:
    """An fd of `path` holding its flock, if its owner is gone; None if it is alive (or the
    file went meanwhile)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # another process just finished with it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # its owner is alive
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:  # removed between the scan and the flock
        os.close(fd)
        return None
    return fd


def is_locked(path: str) -> bool:
    """Whether a live process holds `path`'s flock (False if the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
