"""Following the store's change feed: what other processes changed behind this one.

A restore run by the CLI, or another mount (or API store) of the same store, changes the
index and appends rows to the `changes` table (mounts publish theirs through TEMP triggers
while other mounts are registered, see `Index.publish_changes`). Every 50 ms the follower
reads the new rows, hands changed names and inodes to `invalidate` (a mount drops the
kernel's caches there; the API has none), lets the core reclaim inodes that lost their last
name and that this process does not use, and records how far it got (`mounts.seen_seq`) so
that a writer can wait until every mount shows its change. Every second it also applies the
redo logs of daemons of the store that died (`Index.apply_dead_logs`): their closes were
never committed, and a mount that only reads would not begin a transaction that applies
them; the replay puts what they changed into the feed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from artifactfs.core.fs import FileSystem
from artifactfs.core.restore import CHANGE_ENTRY, CHANGE_INODE, CHANGE_ORPHAN
from artifactfs.index.db import Index

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05
LIMIT = 10000
# Every this many polls (one second), look for redo logs of daemons that died (closes they
# never committed): applying them puts their changes into the feed for every mount.
DEAD_LOG_POLLS = 20

# invalidate(entries as (directory, name), inodes): runs in a worker thread.
Invalidate = Callable[[list[tuple[int, bytes]], list[int]], None]


async def follow_changes(
    index: Index, fs: FileSystem, mount_id: int, seen: int, invalidate: Invalidate | None = None
) -> None:
    polls = 0
    while True:
        await trio.sleep(POLL_INTERVAL)
        polls += 1
        if polls % DEAD_LOG_POLLS == 0 and index.apply_dead_logs():
            log.info("applied the redo log of a daemon of this store that died")
        top = index.max_change_seq()
        if top <= seen:
            continue
        rows = index.changes_after(seen, LIMIT, skip_origin=mount_id)
        if rows:
            if invalidate is not None:
                entries = list(
                    dict.fromkeys(
                        (ino, name or b"") for _, k, ino, name in rows if k == CHANGE_ENTRY
                    )
                )
                inodes = list(dict.fromkeys(ino for _, k, ino, _ in rows if k == CHANGE_INODE))
                await trio.to_thread.run_sync(invalidate, entries, inodes)
            for _, k, ino, _ in rows:
                if k == CHANGE_ORPHAN:
                    fs.reap_orphan(ino)
            log.debug("applied %d changes made by other processes", len(rows))
        # Past our own rows too; a full batch means there may be more after it.
        seen = rows[-1][0] if len(rows) == LIMIT else max(top, rows[-1][0] if rows else top)
        with index.txn():
            index.set_mount_seen(mount_id, seen)
        index.flush()
