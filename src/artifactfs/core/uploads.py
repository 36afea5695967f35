"""Write-back uploads of a remote store, and backups of its index to the bucket.

Owns the `Uploader`: the background task that works through the persistent upload queue
(`blobs WHERE uploaded = 0` in the index, written with the commit that first references a
block, so it survives kill -9), copies each block from the local cache to the bucket with
bounded concurrency in worker threads (boto3 never runs on the trio thread), marks the rows
uploaded, backs off (capped exponential) while the object store is away and resumes by itself
when it returns, and drains the queue at unmount. Also owns the index backups under
`<prefix>/index/` and their retrieval for `init --restore-from-bucket`.

It must not write SQL (it calls named queries of `Index`), must not decide what the cache may
evict (blobs/cached.py does: only blocks it has uploaded), and must not hold an index unit
across an await.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.journal import JournalReader
from artifactfs.blobs.s3 import S3Backend
from artifactfs.errors import Corrupt, NoSpace, NotFound, StorageError
from artifactfs.index.db import Index

log = logging.getLogger(__name__)

BACKUP_RE = re.compile(r"index-(\d{20})\.sqlite3\.gz")
# Pinned cache blocks younger than this are left alone by reconcile: their commit may be on
# its way. Older ones the index calls uploaded are unpinned; unrecorded ones older than
# ORPHAN_AGE are uploaded anyway (a file open for a long time commits its blocks at close).
RECONCILE_MIN_AGE = 60.0
ORPHAN_AGE = 600.0


class Uploader:
    """Runs in a nursery (`run`) for as long as the store is open by this process.

    `concurrency`: uploads at once (worker threads, one `CapacityLimiter`). `batch`: queue
    rows taken per round; their rows are marked in one index unit. `backoff_max`: the longest
    pause between rounds while the object store fails. `backup_interval`: seconds between
    index backups (None: only when `backup()` is called).
    """

    def __init__(
        self,
        index: Index,
        backend: CachedBackend,
        *,
        concurrency: int = 4,
        batch: int = 64,
        poll_interval: float = 1.0,
        backoff_max: float = 30.0,
        reconcile_interval: float = 60.0,
        backup_interval: float | None = 3600.0,
    ) -> None:
        self.index = index
        self.backend = backend
        self.journal = JournalReader.beside(index.path)
        self.limiter = trio.CapacityLimiter(concurrency)
        self.batch = batch
        self.poll_interval = poll_interval
        self.backoff_max = backoff_max
        self.reconcile_interval = reconcile_interval
        self.backup_interval = backup_interval
        self._wake = trio.Event()
        self._progress = trio.Event()
        # Blocks that cannot be uploaded from here (neither cached, journalled nor in the
        # bucket, or corrupt in the cache): logged once and skipped until restart.
        self.lost: set[bytes] = set()
        self.uploaded_blobs = 0
        self.uploaded_bytes = 0
        self.failures = 0
        self.store_away = False
        self.last_error: str | None = None
        # A journalled block could not be put into the cache for lack of room (NoSpace):
        # the next rounds upload pinned blocks first, which frees the room.
        self._cache_full = False

    def kick(self) -> None:
        """Look at the queue now (new commits; the daemon may call it after each flush)."""
        self._wake.set()

    # -- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Upload forever: never returns; cancel its nursery to stop it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reconciler)
            if self.backup_interval is not None:
                nursery.start_soon(self._backups, self.backup_interval)
            backoff = 0.0
            while True:
                rows = []
                if self._cache_full:
                    # The oldest rows may all be journalled blocks the mover cannot put into
                    # a cache full of pinned ones that lie further down the queue: take those
                    # first, or neither side ever moves.
                    rows = await self._pinned_rows()
                if not rows:
                    rows = [r for r in self.index.upload_queue(self.batch + len(self.lost))
                            if r[0] not in self.lost][: self.batch]  # fmt: skip
                if not rows:
                    await self._idle(self.poll_interval)
                    continue
                done, failed = await self._round(rows)
                if done:
                    with self.index.txn():
                        self.index.mark_uploaded(done)
                    self._signal_progress()
                if failed:
                    backoff = min(max(backoff * 2, 0.5), self.backoff_max)
                    if not self.store_away:
                        log.warning(
                            "object store unreachable (%s): %d blocks wait in the local cache; "
                            "retrying with backoff up to %.0f s",
                            self.last_error, self.index.upload_queue_stats()[0],
                            self.backoff_max,
                        )  # fmt: skip
                    self.store_away = True
                    await self._idle(backoff)
                else:
                    if self.store_away:
                        log.info("object store reachable again: uploads resumed")
                    self.store_away = False
                    backoff = 0.0

    async def _idle(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = trio.Event()

    async def _pinned_rows(self) -> list[tuple[bytes, int]]:
        """Queued blocks the cache holds pinned, up to a batch (empty when there are none,
        which ends the cache-full mode)."""
        pinned = await trio.to_thread.run_sync(self.backend.pinned)
        candidates = [d for d, _ in pinned if d not in self.lost]
        states = self.index.upload_states(candidates[: self.batch * 4])
        rows = [(d, 0) for d in candidates[: self.batch * 4] if states.get(d) is False]
        if not rows:
            self._cache_full = False
        return rows[: self.batch]

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _round(self, rows: list[tuple[bytes, int]]) -> tuple[list[bytes], int]:
        """Upload `rows` concurrently; returns (digests now in the bucket, failures)."""
        done: list[bytes] = []
        missing: list[bytes] = []
        failed = 0

        async def one(digest: bytes) -> None:
            nonlocal failed
            async with self.limiter:
                if failed:
                    return  # the store is failing: the rest of the round waits for the backoff
                # Abandoned on cancel: a PUT hanging on an unreachable store must not hold
                # up an unmount or `sync --timeout`; its row stays queued for next time.
                outcome = await trio.to_thread.run_sync(
                    self._upload, digest, abandon_on_cancel=True
                )
            if outcome == "ok":
                done.append(digest)
            elif outcome == "missing":
                missing.append(digest)
            elif outcome == "failed":
                failed += 1

        async with trio.open_nursery() as nursery:
            for digest, _ in rows:
                nursery.start_soon(one, digest)
        for digest in missing:
            if await self._not_cached(digest):
                done.append(digest)
        return done, failed

    def _upload(self, digest: bytes) -> str:
        """Worker thread: one block to the bucket."""
        try:
            # One try here: while the store is away the loop backs off between rounds.
            n = self.backend.upload(digest, attempts=1)
        except NotFound:
            return "missing"
        except Corrupt as exc:
            self.lost.add(digest)
            log.error("not uploading block %s: %s", digest.hex(), exc.message)
            return "lost"
        except StorageError as exc:
            self.failures += 1
            self.last_error = exc.message
            return "failed"
        self.uploaded_blobs += 1
        self.uploaded_bytes += n
        return "ok"

    async def _not_cached(self, digest: bytes) -> bool:
        """A queued block that is not in the cache: journalled and not yet stored by the
        mover (store it now; uploaded next round), already in the bucket (an upload whose
        row was not marked before a crash, then evicted), or lost. True if in the bucket."""
        data = await trio.to_thread.run_sync(self.journal.get, digest, limiter=self.limiter)
        if data is not None:
            try:
                await trio.to_thread.run_sync(
                    functools.partial(self.backend.put, digest, data, wait=False),
                    limiter=self.limiter,
                )
            except NoSpace:
                self._cache_full = True  # see run(): pinned blocks go first for a while
            except StorageError as exc:
                log.warning("cannot cache journalled block %s: %s", digest.hex(), exc.message)
            return False
        if self.backend.is_cached(digest):
            # The mover stored it (and its journal segment went) since `_upload` looked: it is
            # uploaded from the cache next round.
            return False
        try:
            there = await trio.to_thread.run_sync(
                self.backend.remote.has, digest, limiter=self.limiter
            )
        except StorageError:
            return False  # try again next round
        if not there:
            self.lost.add(digest)
            log.error(
                "block %s is queued for upload but is neither in the local cache nor in "
                "the bucket: files using it will fail to read", digest.hex(),
            )  # fmt: skip
        return there

    # -- reconcile: unpin what the bucket already has -----------------------------------------

    async def _reconciler(self) -> None:
        while True:
            try:
                await self.reconcile()
            except StorageError as exc:
                log.info("cache reconcile postponed: %s", exc.message)
            await trio.sleep(self.reconcile_interval)

    async def reconcile(self, min_age: float = RECONCILE_MIN_AGE) -> int:
        """Unpin cached blocks the index says are uploaded (a crash between upload and unpin,
        or a block put again after eviction), and upload old unrecorded ones so they cannot
        fill the cache for ever. Returns how many blocks it unpinned."""
        pinned = await trio.to_thread.run_sync(self.backend.pinned)
        old = {d: age for d, age in pinned if age >= min_age}
        if not old:
            return 0
        states = self.index.upload_states(old)
        unpinned = 0
        for digest, age in old.items():
            state = states.get(digest)
            if state is True:
                await trio.to_thread.run_sync(self.backend.mark_clean, digest)
                unpinned += 1
            elif state is None and age >= ORPHAN_AGE:
                await trio.to_thread.run_sync(self.backend.upload, digest, limiter=self.limiter)
                unpinned += 1
        return unpinned

    # -- drain, backups ---------------------------------------------------------------------------

    def pending(self) -> tuple[int, int]:
        """(blocks not yet uploaded, their bytes)."""
        return self.index.upload_queue_stats()

    async def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or `timeout` seconds pass (False). `run`
        must be running (in the same process) for the queue to move."""
        self.kick()
        with trio.move_on_after(timeout):
            while True:
                n, _ = self.index.upload_queue_stats()
                if n == 0:
                    return True
                if n <= len(self.lost):
                    log.error("%d blocks cannot be uploaded (see above)", n)
                    return False
                with trio.move_on_after(0.2):
                    await self._progress.wait()
        n, size = self.index.upload_queue_stats()
        log.warning("upload queue not drained after %.0f s: %d blocks (%d bytes) left in the "
                    "local cache; they upload at the next start", timeout, n, size)  # fmt: skip
        return False

    async def backup(self, keep: int = 5) -> str | None:
        """Back the index up to the bucket now; None (logged) if the store is away."""
        try:
            return await backup_index(self.index, self.backend.remote, keep=keep)
        except StorageError as exc:
            log.warning("index backup failed: %s", exc.message)
            return None

    async def _backups(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.backup()


def backup_name(time_ns: int) -> str:
    return f"index-{time_ns:020d}.sqlite3.gz"


async def backup_index(index: Index, remote: S3Backend, *, keep: int = 5) -> str:
    """Upload a consistent, gzip-compressed snapshot of the index to `<prefix>/index/` and
    drop all but the newest `keep` backups. Runs in a worker thread (its own SQLite
    connection); returns the object's name."""
    return await trio.to_thread.run_sync(_backup_index, index, remote, keep)


def _backup_index(index: Index, remote: S3Backend, keep: int) -> str:
    name = backup_name(time.time_ns())
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=index.path.parent) as tmp:
        snap = Path(tmp) / "index.sqlite3"
        index.snapshot_to(snap)
        data = gzip.compress(snap.read_bytes(), compresslevel=6)
    remote.put_named(name, data)
    old = [n for n in remote.list_named() if BACKUP_RE.fullmatch(n)][:-keep]
    if old:
        remote.delete_named(old)
    log.info("index backed up to %s (%d bytes)", remote.index_key(name), len(data))
    return name


def fetch_latest_backup(remote: S3Backend, dest: Path) -> str:
    """Write the newest index backup in the bucket, decompressed, to `dest`; returns its
    name. Raises `NotFound` if there is none."""
    names = [n for n in remote.list_named() if BACKUP_RE.fullmatch(n)]
    if not names:
        raise NotFound(f"no index backup in {remote.location.describe()}index/")
    name = names[-1]
    data = gzip.decompress(remote.get_named(name))
    tmp = dest.with_name(dest.name + ".restore")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return name


async def wait_for_queue(
    index: Index,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
    interval: float = 0.25,
) -> bool:
    """Wait until another process (a mount) has drained the queue; True if it did."""
    with trio.move_on_after(timeout):
        while True:
            n, size = index.upload_queue_stats()
            if progress is not None:
                progress(n, size)
            if n == 0:
                return True
            await trio.sleep(interval)
    return False
