"""Following the store's change feed: what another process changed behind this mount.

A restore run by the CLI (or any process other than this daemon) rewrites the index
directly and appends rows to the `changes` table. Every 50 ms this task reads the new rows,
drops the kernel's now-stale cached entries and attributes/pages, lets the core reclaim inodes
that lost their last name and that this mount does not use, and records how far it got
(`mounts.seen_seq`) so that the writer can wait until every mount shows its change.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import trio

from artifactfs.core.fs import FileSystem
from artifactfs.core.restore import CHANGE_ENTRY, CHANGE_INODE, CHANGE_ORPHAN
from artifactfs.index.db import Index

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05


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
    while True:
        await trio.sleep(POLL_INTERVAL)
        rows = index.changes_after(seen)
        if not rows:
            continue
        entries = [(ino, name or b"") for _, kind, ino, name in rows if kind == CHANGE_ENTRY]
        inodes = [ino for _, kind, ino, _ in rows if kind == CHANGE_INODE]
        orphans = [ino for _, kind, ino, _ in rows if kind == CHANGE_ORPHAN]
        await trio.to_thread.run_sync(_invalidate, entries, inodes)
        for ino in orphans:
            fs.reap_orphan(ino)
        seen = rows[-1][0]
        with index.txn():
            index.set_mount_seen(mount_id, seen)
        index.flush()
        log.info("applied %d changes made by other processes", len(rows))
