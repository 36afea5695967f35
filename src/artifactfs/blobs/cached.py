"""The blob backend of a remote store: a bounded local block cache in front of a bucket.

Owns the cache directory `<store>/cache/sha256/ab/cd/<hex>` (a `LocalBackend` tree), its byte
budget and LRU eviction, the one bit of state each cached block carries (uploaded or not), the
verified fetch of a missing block from the bucket, sequential prefetch, and `upload(digest)`.

Writes are write-back: `put` lands in the cache only and the block is *pinned* (not yet in the
bucket); `upload` copies it to the bucket and unpins it. Only unpinned ("clean") blocks are
ever evicted, so the cache holds the only copy of a block until the bucket has it. Which
blocks to upload, and when, is not decided here: the index's `blobs.uploaded = 0` rows are the
persistent queue and `core/uploads.py` works through it.

The pinned bit lives on the file itself so it survives restarts and is shared by every process
using the cache: a pinned block has mode 0444 (as `LocalBackend` writes it), a clean one 0400
(`upload` clears the others-read bit; the store directory is 0700, so modes grant nothing).
A crash between the upload and the chmod only leaves a block pinned that need not be: the
uploader's reconcile pass unpins it. LRU order survives a restart approximately (the files'
mtimes: when each was put or fetched).

Object store away: puts keep landing in the cache until the budget is full of pinned blocks,
then wait (one log line) for uploads to free space and raise `NoSpace` after `full_wait`
seconds; reads of blocks that are only in the bucket raise `StorageError` after at most about
`fetch_timeout` seconds.

Everything here blocks (disk and network): call it from worker threads. Thread-safe. Several
processes may share a cache directory; each keeps its own budget accounting (the daemon is the
one that writes in bulk) and only ever evicts blocks that the file's mode says are clean.

Garbage collection (`delete_many_if_older`) removes a block from the cache, then from the
bucket in batches, and never one that is pinned or that a put refreshed since gc's cutoff: a
put that hits the cache refreshes the file's mtime, and one whose entry went stale (another
process deleted the file) stores the block again. `fsck --repair` (mounts stopped) deletes
orphans whatever their state (`delete_many`) and drops corrupt cached copies (`drop_cached`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from artifactfs.blobs.backend import digest_hex
from artifactfs.blobs.local import LocalBackend
from artifactfs.blobs.s3 import BUCKET_FREE, S3Backend
from artifactfs.errors import Corrupt, NoSpace, NotFound, StorageError
from artifactfs.units import human

log = logging.getLogger(__name__)

_CLEAN_MODE = 0o400
_PINNED_BIT = 0o004
_FETCH_STRIPES = 64
# The "cache full" warning: at most once per this many seconds (see _reserve).
FULL_LOG_QUIET = 60.0


@dataclass(slots=True)
class _Entry:
    size: int
    clean: bool
    since: float  # time.time() the block entered the cache (put or fetch)


def _is_clean(mode: int) -> bool:
    return not mode & _PINNED_BIT


class CachedBackend:
    """A `BlobBackend` over `remote` with a local write-back cache of `budget` bytes.

    `full_wait`: how long a put waits for uploads when the budget is full of pinned blocks
    before raising `NoSpace`. `fetch_timeout`: how long a read keeps retrying a bucket that
    does not answer before raising `StorageError`. `upload_attempts`/`backoff_max`: retries of
    one upload (capped exponential backoff) before `upload` gives up with `StorageError`.
    """

    def __init__(
        self,
        cache_dir: Path,
        remote: S3Backend,
        *,
        budget: int,
        full_wait: float = 60.0,
        fetch_timeout: float = 30.0,
        upload_attempts: int = 3,
        backoff_max: float = 8.0,
        prefetch_threads: int = 4,
    ) -> None:
        self.local = LocalBackend(cache_dir, durable=False, max_open_files=512)
        self.remote = remote
        self.budget = budget
        self.full_wait = full_wait
        self.fetch_timeout = fetch_timeout
        self.upload_attempts = upload_attempts
        self.backoff_max = backoff_max
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._used = 0
        self._full_logged = False
        self._full_quiet_until = 0.0
        self._fetch_locks = [threading.Lock() for _ in range(_FETCH_STRIPES)]
        self._prefetching: set[bytes] = set()
        self._prefetch_pool = ThreadPoolExecutor(
            max_workers=prefetch_threads, thread_name_prefix="artifactfs-prefetch"
        )
        self._prefetch_limit = prefetch_threads * 4
        # Figures for stats and tests.
        self.hits = 0
        self.misses = 0
        self.fetched_bytes = 0
        self.evicted = 0
        self._scan()

    # -- the cache's own state ------------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the entries from the cache directory: sizes, pinned bits, LRU by mtime."""
        found: list[tuple[float, bytes, _Entry]] = []
        for digest, size, mtime in self.local.iterate():
            try:
                mode = os.stat(self.local.path_of(digest)).st_mode
            except FileNotFoundError:
                continue
            found.append((mtime, digest, _Entry(size, _is_clean(mode), mtime)))
        found.sort(key=lambda x: x[0])
        with self._lock:
            for _, digest, entry in found:
                self._entries[digest] = entry
                self._used += entry.size

    def cached_blocks(self) -> list[tuple[bytes, int, float, bool]]:
        """Every block in the cache directory as it is now (all processes' puts), as
        (digest, size, mtime, uploaded): not uploaded means pinned, the only copy."""
        out: list[tuple[bytes, int, float, bool]] = []
        for digest, size, mtime in self.local.iterate():
            try:
                mode = os.stat(self.local.path_of(digest)).st_mode
            except FileNotFoundError:
                continue  # evicted or deleted while we walked
            out.append((digest, size, mtime, _is_clean(mode)))
        return out

    def cache_usage(self) -> tuple[int, int, int]:
        """(bytes cached, bytes pinned (not yet uploaded), budget)."""
        with self._lock:
            pinned = sum(e.size for e in self._entries.values() if not e.clean)
            return self._used, pinned, self.budget

    def cached_count(self) -> int:
        """Blocks in the cache."""
        with self._lock:
            return len(self._entries)

    def pinned(self) -> list[tuple[bytes, float]]:
        """Every pinned block this process knows of, with its age in seconds."""
        now = time.time()
        with self._lock:
            return [(d, now - e.since) for d, e in self._entries.items() if not e.clean]

    def is_cached(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._entries

    def _touch(self, digest: bytes) -> None:
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)

    def _evict_locked(self, need: int) -> list[bytes]:
        """Drop clean entries, least recently used first, until `need` more bytes fit.
        Returns the digests whose files the caller deletes (outside the lock)."""
        victims: list[bytes] = []
        if self._used + need <= self.budget:
            return victims
        for digest, entry in list(self._entries.items()):
            if self._used + need <= self.budget:
                break
            if entry.clean:
                del self._entries[digest]
                self._used -= entry.size
                victims.append(digest)
        return victims

    def _delete_files(self, victims: Iterable[bytes]) -> None:
        for digest in victims:
            path = self.local.path_of(digest)
            try:
                # Another process may have put it again (pinned) meanwhile: never drop that.
                if not _is_clean(os.stat(path).st_mode):
                    continue
                self.local.delete(digest)
                self.evicted += 1
            except (FileNotFoundError, NotFound):
                continue
            except (OSError, StorageError) as exc:
                log.warning("cannot evict cached block %s: %s", digest_hex(digest), exc)

    def _reserve(self, n: int, *, wait: bool) -> bool:
        """Make room for `n` bytes and account them. With `wait`, wait for uploads to unpin
        blocks when everything cached is pinned, and raise `NoSpace` after `full_wait`;
        without, return False at once if there is no room."""
        deadline = time.monotonic() + self.full_wait
        while True:
            with self._space:
                victims = self._evict_locked(n)
                fits = self._used + n <= self.budget or not self._entries
                if fits:
                    self._used += n
                    if self._full_logged:
                        log.info("block cache has room again: writes go on")
                        self._full_logged = False
                        self._full_quiet_until = time.monotonic() + FULL_LOG_QUIET
                if not fits and wait:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise NoSpace(
                            f"the block cache is full of blocks not yet uploaded "
                            f"({human(self.budget)}) and the object store did not take "
                            f"any for {self.full_wait:.0f} s"
                        )
                    # Once per episode, and not again within FULL_LOG_QUIET of the last one:
                    # a cache hovering at its budget fills and frees at every block.
                    if not self._full_logged and time.monotonic() >= self._full_quiet_until:
                        self._full_logged = True
                        pinned = sum(e.size for e in self._entries.values() if not e.clean)
                        log.warning(
                            "block cache full: %s not yet uploaded (budget %s); "
                            "writes wait up to %.0f s for the object store (%s)",
                            human(pinned), human(self.budget), self.full_wait,
                            self.remote.location.describe(),
                        )  # fmt: skip
                    self._space.wait(timeout=min(left, 1.0))
            self._delete_files(victims)
            if fits:
                return True
            if not wait:
                return False

    def _unreserve(self, n: int) -> None:
        with self._space:
            self._used -= n
            self._space.notify_all()

    # -- the BlobBackend protocol ---------------------------------------------------------------

    def put(self, digest: bytes, data: bytes | memoryview, *, wait: bool = True) -> bool:
        """Store the block in the cache, pinned (not uploaded). False if it was cached.

        Without `wait`, a cache full of pinned blocks raises `NoSpace` at once (the uploader:
        waiting would wait for itself)."""
        with self._lock:
            hit = digest in self._entries
            if hit:
                self._entries.move_to_end(digest)
        if hit:
            # A dedup hit: the block is in use again. Refresh its mtime, which gc checks right
            # before deleting (`delete_many_if_older`); if gc (another process) deleted it
            # meanwhile, forget the entry and store the block again.
            try:
                os.utime(self.local.path_of(digest))
                return False
            except FileNotFoundError:
                self._forget(digest)
        size = len(memoryview(data).cast("B"))
        if not self._reserve(size, wait=wait):
            raise NoSpace("the block cache is full of blocks not yet uploaded")
        try:
            written = self.local.put(digest, data)
        except BaseException:
            self._unreserve(size)
            raise
        with self._space:
            if digest in self._entries:  # a racing put of the same block won
                self._used -= size
                self._space.notify_all()
                return False
            clean = False
            if not written:  # already on disk (another process): keep its state
                with contextlib.suppress(OSError):
                    clean = _is_clean(os.stat(self.local.path_of(digest)).st_mode)
            self._entries[digest] = _Entry(size, clean, time.time())
        return written

    def get(self, digest: bytes) -> bytes:
        try:
            data = self.local.get(digest)
        except NotFound:
            return self._fetch(digest)
        self.hits += 1
        self._touch(digest)
        return data

    def read(self, digest: bytes, offset: int, size: int) -> bytes:
        try:
            data = self.local.read(digest, offset, size)
        except NotFound:
            return self._fetch(digest)[offset : offset + size]
        self.hits += 1
        self._touch(digest)
        return data

    def has(self, digest: bytes) -> bool:
        return self.local.has(digest) or self.remote.has(digest)

    def delete(self, digest: bytes) -> bool:
        """Remove the block from the cache and the bucket."""
        self._forget(digest)
        here = self.local.delete(digest)
        there = self.remote.delete(digest)
        return here or there

    def _forget(self, digest: bytes) -> None:
        with self._space:
            entry = self._entries.pop(digest, None)
            if entry is not None:
                self._used -= entry.size
                self._space.notify_all()

    def drop_cached(self, digest: bytes) -> bool:
        """Remove only the cached copy (fsck: a corrupt one the bucket holds intact; the next
        read fetches and verifies it again). False if it was not cached."""
        self._forget(digest)
        return self.local.delete(digest)

    def delete_many(self, digests: list[bytes]) -> None:
        """Remove the blocks from the cache and the bucket (batched DeleteObjects), whatever
        their state: for `fsck --repair`, which runs with the mounts stopped."""
        for digest in digests:
            self._forget(digest)
            self.local.delete(digest)
        self.remote.delete_many(digests)

    def delete_many_if_older(self, digests: list[bytes], cutoff_ns: int) -> list[bytes]:
        """gc's delete: remove each block from the cache and then, in batches, from the
        bucket, unless the cache holds it pinned (not yet uploaded: the only copy, which the
        uploader owns) or a put refreshed it since `cutoff_ns` (a writer uses it again).
        Returns the digests deleted.

        A put that starts meanwhile in another process finds the cached file gone (renamed
        aside by `LocalBackend.delete_if_older`) and writes a fresh pinned copy, which stays
        and is uploaded again once committed; so deleting the bucket object afterwards is
        safe."""
        gone: list[bytes] = []
        for digest in digests:
            try:
                mode = os.stat(self.local.path_of(digest)).st_mode
            except FileNotFoundError:
                mode = None  # only in the bucket
            if mode is not None:
                if not _is_clean(mode):
                    continue
                # False: young (renamed back), or absent by now (evicted: go on).
                if not self.local.delete_if_older(digest, cutoff_ns) and self.local.has(digest):
                    continue
            self._forget(digest)
            gone.append(digest)
        self.remote.delete_many(gone)
        return gone

    def iterate(self) -> Iterator[tuple[bytes, int, float]]:
        """Every block in the cache or the bucket, once."""
        seen: set[bytes] = set()
        for item in self.local.iterate():
            seen.add(item[0])
            yield item
        for item in self.remote.iterate():
            if item[0] not in seen:
                yield item

    def sync(self) -> None:
        """Make cached blocks durable (one syncfs): until uploaded they are the only copy."""
        self.local.sync()

    def usage(self) -> tuple[int, int]:
        """(bytes in the cache, free): a bucket has no meaningful limit."""
        with self._lock:
            return self._used, BUCKET_FREE

    def sweep_temp(self, older_than_seconds: float) -> int:
        return self.local.sweep_temp(older_than_seconds)

    def close(self) -> None:
        self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self.local.close()
        self.remote.close()

    # -- fetching from the bucket ---------------------------------------------------------------

    def _fetch(self, digest: bytes) -> bytes:
        """The whole block from the bucket, verified, and cached if there is room (whole
        GETs measured faster than parallel ranged ones here, and only a whole block can be
        verified). One fetch per digest at a time: a second reader waits and hits the cache."""
        with self._fetch_locks[digest[0] % _FETCH_STRIPES]:
            try:
                data = self.local.get(digest)
                self.hits += 1
                return data
            except NotFound:
                pass
            self.misses += 1
            data = self._fetch_remote(digest)
            if hashlib.sha256(data).digest() != digest:
                log.error(
                    "block %s in %s does not match its digest (%d bytes): not used",
                    digest_hex(digest), self.remote.location.describe(), len(data),
                )  # fmt: skip
                raise Corrupt(f"block {digest_hex(digest)} in the bucket is corrupt")
            self.fetched_bytes += len(data)
            self._insert_clean(digest, data)
            return data

    def _fetch_remote(self, digest: bytes) -> bytes:
        deadline = time.monotonic() + self.fetch_timeout
        delay = 0.2
        while True:
            try:
                return self.remote.get(digest)
            except NotFound:
                raise
            except StorageError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("cannot fetch block %s: %s", digest_hex(digest), exc.message)
                    raise StorageError(
                        f"block {digest_hex(digest)} is not cached and the object store "
                        f"did not answer for {self.fetch_timeout:.0f} s: {exc.message}"
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    def _insert_clean(self, digest: bytes, data: bytes) -> None:
        if not self._reserve(len(data), wait=False):
            return  # everything cached is pinned: serve this block uncached
        try:
            written = self.local.put(digest, data)
            if written:
                os.chmod(self.local.path_of(digest), _CLEAN_MODE)
        except (OSError, StorageError, NoSpace) as exc:
            self._unreserve(len(data))
            log.warning("cannot cache block %s: %s", digest_hex(digest), exc)
            return
        with self._space:
            if digest in self._entries or not written:
                self._used -= len(data)
                if not written and digest not in self._entries:
                    self._entries[digest] = _Entry(len(data), True, time.time())
                    self._used += len(data)
                return
            self._entries[digest] = _Entry(len(data), True, time.time())

    def prefetch(self, digests: Iterable[bytes]) -> int:
        """Fetch these blocks into the cache in the background (sequential read-ahead: the
        caller names the next blocks of a file being read in order). Blocks already cached or
        being fetched are skipped, and so is everything past a small bound of outstanding
        fetches. Returns how many fetches it started. Errors are only logged: the read that
        needs the block will fetch it again and report them."""
        started = 0
        for digest in digests:
            with self._lock:
                if digest in self._entries or digest in self._prefetching:
                    continue
                if len(self._prefetching) >= self._prefetch_limit:
                    break
                self._prefetching.add(digest)
            try:
                self._prefetch_pool.submit(self._prefetch_one, digest)
            except RuntimeError:  # closed
                with self._lock:
                    self._prefetching.discard(digest)
                break
            started += 1
        return started

    def _prefetch_one(self, digest: bytes) -> None:
        try:
            if not self.local.has(digest):
                self._fetch(digest)
        except Exception as exc:
            log.debug("prefetch of %s failed: %s", digest_hex(digest), exc)
        finally:
            with self._lock:
                self._prefetching.discard(digest)

    # -- uploads --------------------------------------------------------------------------------

    def upload(self, digest: bytes, attempts: int | None = None) -> int:
        """Copy the cached block to the bucket (up to `attempts`, default `upload_attempts`,
        tries with capped exponential backoff), then unpin it. Returns its size. Raises
        `NotFound` if it is not in the cache, `Corrupt` if the cached copy does not match its
        digest, `StorageError` if the bucket kept failing."""
        data = self.local.get(digest)
        if hashlib.sha256(data).digest() != digest:
            log.error("cached block %s does not match its digest: not uploaded", digest_hex(digest))
            raise Corrupt(f"cached block {digest_hex(digest)} is corrupt")
        delay = 0.25
        tries = attempts or self.upload_attempts
        for attempt in range(1, tries + 1):
            try:
                self.remote.put_object(digest, data)
                break
            except StorageError:
                if attempt == tries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
        self.mark_clean(digest)
        return len(data)

    def mark_clean(self, digest: bytes) -> None:
        """Record that the bucket has this block: it may now be evicted."""
        with contextlib.suppress(FileNotFoundError):
            os.chmod(self.local.path_of(digest), _CLEAN_MODE)
        with self._space:
            entry = self._entries.get(digest)
            if entry is not None:
                entry.clean = True
            self._space.notify_all()
