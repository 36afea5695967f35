"""The mount's side of the change feed (`core/changefeed.py`): dropping the kernel's cached
entries, attributes and pages of what another process changed."""

from __future__ import annotations

import errno
import logging

import pyfuse3

from artifactfs.core import changefeed
from artifactfs.core.fs import FileSystem
from artifactfs.index.db import Index

log = logging.getLogger(__name__)


def _invalidate(entries: list[tuple[int, bytes]], inodes: list[int]) -> None:
    """Worker thread: the kernel may call back into this filesystem (a forget, a lookup)
    while it invalidates, so this must not run on the trio thread that serves requests."""
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("invalidating entry %r in %d: %s", name, parent, exc)
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("invalidating inode %d: %s", ino, exc)


async def follow_changes(index: Index, fs: FileSystem, mount_id: int, seen: int) -> None:
    await changefeed.follow_changes(index, fs, mount_id, seen, _invalidate)
