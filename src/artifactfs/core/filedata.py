"""The contents of one file while it is in use: block map, dirty buffers, background stores.

A `FileData` exists per inode while the file is open (or briefly for a truncate or a digest).
Writes land in per-block `bytearray`s; a block that fills up is sealed and stored in the
background (hash + put in a worker thread) while the writer goes on; `commit()` seals the rest,
waits for every store of this file, and records the new block map, size, times and whole-file
digest in ONE index transaction. So the index only ever points at blocks that are stored, and a
file is never torn: each block is the old or the new content.

Block sources, newest first: dirty (being written) > sealed (being stored) > staged (stored,
not yet committed) > committed (in the index) > hole (zeros).

Must not: talk to FUSE, hold a block in memory after it is committed, or commit a block map
that names an unstored block.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import trio

from artifactfs.core.blockio import INLINE_IO_MAX, BlockIO
from artifactfs.errors import FsError, NoSpace, StorageError

if TYPE_CHECKING:
    from artifactfs.index.db import Index

log = logging.getLogger(__name__)

# Chunks up to this size feed the whole-file digest on the trio thread (~10 us at 16 KiB);
# larger ones go to a worker thread.
INLINE_HASH_MAX = 16 * 1024
# Remote stores: blocks fetched ahead of a sequential reader.
PREFETCH_BLOCKS = 4
# Bytes of queued chunks the whole-file hasher takes per worker-thread hop (at most; always
# at least one chunk).
HASH_BATCH = 8 << 20


def _first_bytes(chunks: list[bytes], limit: int) -> int:
    """How many of the first `chunks` to take: as many as fit in `limit` bytes, at least one."""
    total = 0
    for n, chunk in enumerate(chunks):
        total += len(chunk)
        if total > limit:
            return max(n, 1)
    return len(chunks)


class QuickLock:
    """A trio lock whose uncontended acquire does not yield.

    `trio.Lock.acquire` always passes through the scheduler, even when the lock is free; every
    write and close takes this lock, and that pass (a task switch and an epoll poll) was a
    measurable part of a small-file close. A contended acquire waits as `trio.Lock` does.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class FileData:
    def __init__(
        self,
        io: BlockIO,
        index: Index,
        nursery: trio.Nursery,
        *,
        ino: int,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        committed: dict[int, bytes],
    ) -> None:
        self.io = io
        self.index = index
        self.nursery = nursery
        self.ino = ino
        self.bs = io.block_size
        self._read_end = 0  # where the last read ended: the next one at it is sequential
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.committed = committed
        self.dirty: dict[int, bytearray] = {}
        self.sealed: dict[int, tuple[int, bytes]] = {}
        self.staged: dict[int, tuple[bytes, int] | None] = {}
        self.versions: dict[int, int] = {}
        self.drop_from: int | None = None  # committed blocks >= this index are cut off
        self.changed = False  # contents, size or times differ from the index
        self.opens = 0  # open handles
        self.users = 0  # open handles + internal users (truncate, digest)
        self.lock = QuickLock()  # serialises writers, truncates and commits of this file
        self.pending = 0  # background stores in flight
        self._idle = trio.Event()
        self._idle.set()
        self.error: BaseException | None = None  # a failed background store, told at commit
        # Whole-file SHA-256, fed in order while the file is written from its start; None
        # once anything is written behind the hash position (then computed on demand).
        self.hasher: hashlib._Hash | None = hashlib.sha256() if size == 0 else None
        self.hash_pos = 0
        # Chunks of the content waiting for the whole-file hasher, in order, and the Event of
        # the task that feeds them to it (set while no such task runs). The queue always
        # belongs to the current hasher: replacing or dropping the hasher empties it.
        self._hash_queue: list[bytes] = []
        self._hash_tail = trio.Event()
        self._hash_tail.set()
        # A commit went without the digest while hashing still ran: the feeder records it
        # when its queue runs dry (see _hashed), so a close or fsync never waits for the hash.
        self._digest_due = False

    # ---- reading ------------------------------------------------------------------------------

    def _source(self, idx: int) -> bytes | bytearray | tuple[bytes, int] | None:
        """Where block `idx` is now: in-memory bytes, a stored (digest, _) or None (hole)."""
        buf = self.dirty.get(idx)
        if buf is not None:
            return buf
        sealed = self.sealed.get(idx)
        if sealed is not None:
            return sealed[1]
        if idx in self.staged:
            return self.staged[idx]
        digest = self.committed.get(idx)
        return None if digest is None else (digest, 0)

    async def read(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        bs = self.bs
        parts: list[bytes | None] = []
        fetch: list[tuple[bytes, int, int]] = []
        fetch_at: list[tuple[int, int]] = []  # (index into parts, wanted length)
        for idx in range(off // bs, (end - 1) // bs + 1):
            start = idx * bs
            s = max(off, start) - start
            e = min(end, start + bs) - start
            src = self._source(idx)
            if src is None:
                parts.append(bytes(e - s))
            elif isinstance(src, tuple):
                fetch_at.append((len(parts), e - s))
                parts.append(None)
                fetch.append((src[0], s, e - s))
            else:
                piece = bytes(src[s:e])
                parts.append(piece + bytes(e - s - len(piece)) if len(piece) < e - s else piece)
        if off == self._read_end:
            self._prefetch((end - 1) // bs + 1)
        self._read_end = end
        if fetch:
            got = await self.io.read_many(fetch)
            for (pos, want), data in zip(fetch_at, got, strict=True):
                # A stored block may end before the file does (the file grew since): zeros.
                parts[pos] = data + bytes(want - len(data)) if len(data) < want else data
        return b"".join(p for p in parts if p is not None)

    def _prefetch(self, first: int) -> None:
        """A sequential reader: have the backend bring the next blocks in, in the background
        (a remote store's cache fetches them, a local store has the kernel read them ahead)."""
        prefetch = getattr(self.io.backend, "prefetch", None)
        if prefetch is None:
            return
        digests = []
        for idx in range(first, first + PREFETCH_BLOCKS):
            if idx * self.bs >= self.size:
                break
            src = self._source(idx)
            if isinstance(src, tuple):
                digests.append(src[0])
        if digests:
            prefetch(digests)

    async def _current_block(self, idx: int) -> bytearray:
        src = self._source(idx)
        if src is None:
            return bytearray()
        if isinstance(src, tuple):
            return bytearray(await self.io.load(src[0]))
        return bytearray(src)

    # ---- writing ------------------------------------------------------------------------------

    async def write(self, off: int, data: bytes) -> int:
        async with self.lock:
            if self.hasher is not None and off < self.hash_pos:
                self._drop_hasher(None)
            bs = self.bs
            pos = 0
            n_total = len(data)
            try:
                while pos < n_total:
                    idx = (off + pos) // bs
                    s = off + pos - idx * bs
                    n = min(bs - s, n_total - pos)
                    buf = self.dirty.get(idx)
                    if buf is None and s == 0 and n == bs:
                        # A whole block replaced (the sequential-write case): seal the
                        # caller's bytes as they are, without staging them in a buffer.
                        await self.io.reserve(bs)
                        self.versions[idx] = self.versions.get(idx, 0) + 1
                        whole = data if n == n_total else data[pos : pos + n]
                        self._seal_data(idx, bytes(whole))
                        pos += n
                        continue
                    if buf is None:
                        await self.io.reserve(bs)
                        buf = await self._current_block(idx)
                        self._set_dirty(idx, buf)
                    if len(buf) < s:
                        buf.extend(bytes(s - len(buf)))
                    buf[s : s + n] = data[pos : pos + n]
                    pos += n
                    if s + n == bs:
                        # The block is complete: store it in the background while writing
                        # goes on.
                        self._seal(idx)
            except NoSpace:
                # Blocks written before the refusal are part of the file (a short write, as
                # on a disk that fills up); nothing written: the error.
                if pos == 0:
                    raise
            if off + pos > self.size:
                self.size = off + pos
            self._touch()
            return pos

    def _set_dirty(self, idx: int, buf: bytearray) -> None:
        self.dirty[idx] = buf
        self.versions[idx] = self.versions.get(idx, 0) + 1
        self.io.track(self)

    def _touch(self) -> None:
        now = time.time_ns()
        self.mtime_ns = self.ctime_ns = now
        self.changed = True

    def _seal(self, idx: int) -> None:
        self._seal_data(idx, bytes(self.dirty.pop(idx)))

    def _seal_data(self, idx: int, data: bytes) -> None:
        start = idx * self.bs
        first: hashlib._Hash | None = None
        if self.hasher is not None and idx == self.hash_pos == 0 and len(data) <= INLINE_IO_MAX:
            # The first block of a small file: the whole-file digest so far and the block's
            # digest are one hash of the same bytes (most closes are of such files).
            first = self.hasher = hashlib.sha256(data)
            self.hash_pos = len(data)
        elif self.hasher is not None and start <= self.hash_pos < start + len(data):
            chunk = data[self.hash_pos - start :]
            self.hash_pos = start + len(data)
            if len(chunk) <= INLINE_HASH_MAX and self._hash_tail.is_set():
                # A few microseconds: cheaper than a trip to a worker thread.
                self.hasher.update(chunk)
            else:
                self._queue_hash(chunk)
        if len(data) <= INLINE_IO_MAX:
            # Small: digest now, journal it, let the mover store it. A close then costs a
            # journal append instead of a blob file creation.
            try:
                digest = self.io.stage_small(data, first)
            except OSError as exc:
                log.warning("journal refused a block of inode %d (%s): storing it", self.ino, exc)
            else:
                self.staged[idx] = None if digest is None else (digest, len(data))
                return
        version = self.versions[idx]
        self.sealed[idx] = (version, data)
        if self.pending == 0:
            self._idle = trio.Event()
        self.pending += 1
        self.nursery.start_soon(self._store, idx, version, data)

    def seal_all(self) -> None:
        for idx in sorted(self.dirty):
            self._seal(idx)

    def _queue_hash(self, chunk: bytes) -> None:
        """Have the hasher fed `chunk` in the background, after the chunks queued before it.
        The chunk counts against the mount's dirty-bytes budget until it is hashed: when
        hashing falls behind the writes, writers wait instead of the daemon holding the
        unhashed rest of a large file in memory (an unbounded queue took 0.5 GiB of RSS
        during a 1 GiB write)."""
        self.io.hold(len(chunk))
        self._hash_queue.append(chunk)
        if self._hash_tail.is_set():
            self._hash_tail = trio.Event()
            self.nursery.start_soon(self._feed_hasher, self._hash_tail)

    def _drop_hasher(self, hasher: hashlib._Hash | None) -> None:
        """Replace the hasher (a new content from offset 0) or drop it (None: written behind
        the hash position, computed on demand); chunks queued for the old one are let go."""
        self.hasher = hasher
        self.io.release(sum(map(len, self._hash_queue)))
        self._hash_queue = []

    async def _feed_hasher(self, done: trio.Event) -> None:
        """Feed the queued chunks to the hasher, several per worker-thread hop: a hop per
        chunk waited behind the block stores queued at the limiter each time, and the
        hashing fell further behind the writes the longer they went on."""
        try:
            while self._hash_queue:
                take = _first_bytes(self._hash_queue, HASH_BATCH)
                chunks = self._hash_queue[:take]
                del self._hash_queue[:take]
                hasher = self.hasher
                try:
                    if hasher is not None:
                        await self.io.hash_update(hasher, chunks)
                finally:
                    self.io.release(sum(map(len, chunks)))
        finally:
            done.set()
        if done is self._hash_tail:
            self._hashed()

    @property
    def hashing(self) -> bool:
        """The whole-file digest is being computed as the file is written."""
        return self.hasher is not None and not self._hash_tail.is_set()

    async def wait_hashed(self) -> None:
        while not self._hash_tail.is_set():
            await self._hash_tail.wait()

    def _hashed(self) -> None:
        """The hasher's queue ran dry: record the digest a commit went without, if the index
        still holds exactly the content hashed (otherwise the next commit takes it)."""
        if not self._digest_due or self.hasher is None or self.hash_pos != self.size:
            return
        if not self.clean:
            return
        self._digest_due = False
        try:
            # The content is its size and block map: after a release, another handle may
            # have committed other content meanwhile (a `touch` of the times changes none).
            row = self.index.get_inode(self.ino)
            if row is None or row.sha256 is not None or row.size != self.size:
                return
            if self.index.block_map(self.ino) != self.committed:
                return
            with self.index.txn():
                self.index.set_sha256(self.ino, self.hasher.copy().digest())
        except Exception as exc:  # computed again on demand (file_digest)
            log.warning("digest of inode %d not recorded: %s", self.ino, exc)

    async def _store(self, idx: int, version: int, data: bytes) -> None:
        try:
            digest = await self.io.store(data)
        except BaseException as exc:
            # Keep the data sealed (still readable); commit reports the failure as EIO.
            log.error("storing block %d of inode %d failed: %s", idx, self.ino, exc)
            self.error = exc
            if not isinstance(exc, Exception):
                raise
        else:
            if self.versions.get(idx) == version:
                self.staged[idx] = None if digest is None else (digest, len(data))
            cur = self.sealed.get(idx)
            if cur is not None and cur[0] == version:
                del self.sealed[idx]
        finally:
            self.io.release(self.bs)
            self.pending -= 1
            if self.pending == 0:
                self._idle.set()

    # ---- truncate -----------------------------------------------------------------------------

    async def truncate(self, new_size: int) -> None:
        async with self.lock:
            bs = self.bs
            if new_size < self.size:
                keep = (new_size + bs - 1) // bs  # blocks that survive
                for idx in [i for i in self.dirty if i >= keep]:
                    del self.dirty[idx]
                    self.io.release(bs)
                for idx in [i for i in self.sealed if i >= keep]:
                    # Its store may still finish: the version bump makes it ignored.
                    self.versions[idx] = self.versions.get(idx, 0) + 1
                    del self.sealed[idx]
                for idx in [i for i in self.staged if i >= keep]:
                    del self.staged[idx]
                for idx in [i for i in self.committed if i >= keep]:
                    del self.committed[idx]
                self.drop_from = keep if self.drop_from is None else min(self.drop_from, keep)
                tail = new_size - (keep - 1) * bs if keep else 0
                if keep and tail < bs:
                    idx = keep - 1
                    src = self._source(idx)
                    if src is not None:
                        buf = await self._current_block(idx)
                        del buf[tail:]
                        if idx not in self.dirty:
                            await self.io.reserve(bs)
                        self._set_dirty(idx, buf)
                if new_size == 0:
                    self._drop_hasher(hashlib.sha256())
                    self.hash_pos = 0
                elif new_size < self.hash_pos:
                    self._drop_hasher(None)
            self.size = new_size
            self._touch()

    # ---- commit -------------------------------------------------------------------------------

    async def commit(self, *, durable: bool = False) -> None:
        """Make everything written so far visible in the index in one transaction."""
        if self.clean:
            # Nothing to do (a close of an unchanged file): no lock, no checkpoints.
            if durable:
                await self.io.sync()
                self.index.make_durable()
            return
        async with self.lock:
            self.seal_all()
            while self.pending:
                await self._idle.wait()
            if self.error is not None:
                exc, self.error = self.error, None
                if isinstance(exc, FsError):
                    raise exc
                raise StorageError(f"storing data of inode {self.ino} failed: {exc}")
            if durable:
                # Blocks first (this file's and any the mover stored), then the index that
                # points at them. A no-op when nothing was put since the last sync.
                await self.io.sync()
            if self.changed or self.staged or self.drop_from is not None:
                sha = None
                if self.hasher is not None and self.hash_pos == self.size:
                    if self._hash_tail.is_set():
                        sha = self.hasher.copy().digest()
                        self._digest_due = False
                    else:
                        # Hashing a large write takes as long as storing it: the digest is
                        # recorded once the last step is done (_hashed), meanwhile NULL.
                        self._digest_due = True
                staged = self.staged
                with self.index.txn():
                    if self.drop_from is not None:
                        self.index.drop_blocks_from(self.ino, self.drop_from)
                    # Blocks still waiting for the mover were journalled when sealed, before
                    # this commit reaches the redo log: a crash cannot lose what was closed.
                    if staged:
                        self.index.commit_blocks(self.ino, staged, time.time_ns())
                    self.index.update_file_state(
                        self.ino,
                        self.size,
                        self.mtime_ns,
                        self.ctime_ns,
                        sha,
                        self._stored_after(staged),
                    )
                for idx, v in staged.items():
                    if v is None:
                        self.committed.pop(idx, None)
                    else:
                        self.committed[idx] = v[0]
                self.staged = {}
                self.drop_from = None
                self.changed = False
        if durable:
            self.index.make_durable()

    def _stored_after(self, staged: dict[int, tuple[bytes, int] | None]) -> int:
        """Storage of the committed blocks once `staged` is applied."""
        idxs = set(self.committed)
        for idx, v in staged.items():
            if v is None:
                idxs.discard(idx)
            else:
                idxs.add(idx)
        return self._stored_of(idxs)

    def stored_bytes(self) -> int:
        """Bytes of storage the file's non-hole blocks take now (for st_blocks)."""
        if not (self.staged or self.sealed or self.committed):
            # A new small file being written (every getattr and setattr of tar asks): its
            # dirty blocks are all there is, and none is a hole.
            return self._stored_of(self.dirty)
        idxs = set(self.committed) | set(self.dirty) | set(self.sealed) | set(self.staged)
        return self._stored_of({i for i in idxs if self._source(i) is not None})

    def _stored_of(self, idxs: Collection[int]) -> int:
        return stored_estimate(len(idxs), self.size, self.bs, (self.size - 1) // self.bs in idxs)

    @property
    def clean(self) -> bool:
        """Nothing differs from the index and nothing is in flight."""
        return not (
            self.changed
            or self.dirty
            or self.sealed
            or self.pending
            or self.staged
            or self.drop_from is not None
            or self.error is not None
            or self.lock.locked()
        )


def stored_estimate(nblocks: int, size: int, bs: int, has_last: bool) -> int:
    """Storage of `nblocks` non-hole blocks of a file of `size`: full blocks, except that the
    last block of the file only takes what the file uses of it."""
    total = nblocks * bs
    if has_last and size % bs:
        total -= bs - size % bs
    return max(total, 0)
