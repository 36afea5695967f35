"""Following the store's change feed: what other processes changed behind this mount.

A restore run by the CLI, or another mount of the same store, changes the index behind this
mount and appends rows to the `changes` table (mounts publish theirs through TEMP triggers
while other mounts are registered, see `Index.publish_changes`). Every 50 ms this task reads
the new rows, drops the kernel's now-stale cached entries and attributes/pages, lets the core
reclaim inodes that lost their last name and that this mount does not use, and records how
far it got (`mounts.seen_seq`) so that a writer can wait until every mount shows its change.
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
LIMIT = 10000


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
        top = index.max_change_seq()
        if top <= seen:
            continue
        rows = index.changes_after(seen, LIMIT, skip_origin=mount_id)
        if rows:
            entries = list(
                dict.fromkeys((ino, name or b"") for _, k, ino, name in rows if k == CHANGE_ENTRY)
            )
            inodes = list(dict.fromkeys(ino for _, k, ino, _ in rows if k == CHANGE_INODE))
            orphans = [ino for _, k, ino, _ in rows if k == CHANGE_ORPHAN]
            await trio.to_thread.run_sync(_invalidate, entries, inodes)
            for ino in orphans:
                fs.reap_orphan(ino)
            log.debug("applied %d changes made by other processes", len(rows))
        # Past our own rows too; a full batch means there may be more after it.
        seen = rows[-1][0] if len(rows) == LIMIT else max(top, rows[-1][0] if rows else top)
        with index.txn():
            index.set_mount_seen(mount_id, seen)
        index.flush()
