"""Block I/O between the trio thread and the blob backend.

Owns the worker-thread boundary for contents: hashing, zero detection, backend puts and reads
of full blocks run in worker threads under one named CapacityLimiter (small ones inline, see
INLINE_IO_MAX); what no request waits for (block stores, the mover, the whole-file hasher) in
the lower-priority threads of `core/background.py`. Owns the mount-wide budget of dirty
bytes held in memory, which gives writers backpressure, and the *pending* small blocks:
committed to the index, journalled (`blobs/journal.py`) but not yet put into the backend,
served from memory until the mover has stored them.

A backend that is out of space (`NoSpace`: a remote store's cache full of blocks not yet
uploaded for its `full_wait`, or a full disk) must not leave writers waiting for the budget
forever: once a store or the mover is refused, a writer over budget fails with `NoSpace`
(ENOSPC) at once, until a later store succeeds.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from artifactfs.blobs.backend import BlobBackend
from artifactfs.blobs.journal import Journal, sync_all
from artifactfs.core import background
from artifactfs.errors import NoSpace, NotFound, StorageError
from artifactfs.units import human

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20
# Reads up to this size run on the trio thread, and sealed blocks up to this size are digested
# there and journalled (stage_small) instead of stored on the commit path. Measured here: a
# trip to a worker thread costs 135 us idle and ~460 us under load, a small pread a few us,
# sha256 of 64 KiB ~40 us. Larger I/O and hashing go to worker threads.
INLINE_IO_MAX = 64 * 1024
# The mover waits this long after the first queued block before taking a batch, so that one
# worker-thread hop stores the blocks of many closes instead of one (each hop costs the trio
# thread 100+ us, and the worker's Python code competes with it for the GIL). Journalled
# blocks are in the journal and readable from memory meanwhile.
MOVER_LINGER = 0.05
# While files are being written, the mover waits for writers to pause this long before it
# stores anything (unless dirty blocks fill half the memory budget, or someone waits for the
# drain). Its put_many runs in a worker thread whose Python code between the syscalls of
# each blob file takes the GIL from the trio thread: measured here, moving tar's blocks while
# tar ran made the extraction 25-55% slower (14.5-18.2 s against 11.5-11.7 s with the moves
# after it), the trio thread blocking 5x as often. Journalled blocks are durable and served
# from memory meanwhile, so waiting costs only memory, which the budget bounds.
MOVER_QUIET = 0.25


class Sealable(Protocol):
    def seal_all(self) -> None: ...


class BlockIO:
    def __init__(
        self,
        backend: BlobBackend,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        threads: int = 4,
        dirty_budget: int = 128 << 20,
        journal: Journal | None = None,
    ) -> None:
        self.backend = backend
        # Where pending small blocks are kept until stored. None (tests of this layer, the
        # CLI's read-only session): in memory only, lost with the process.
        self.journal = journal
        self.block_size = block_size
        self.zero_block = bytes(block_size)
        # Named so that a profile or a trio task dump says who waits for what.
        self.limiter = trio.CapacityLimiter(threads)
        self.dirty_budget = dirty_budget
        self.dirty_bytes = 0
        # Replaced by a fresh Event at every release while writers wait, so they wake once
        # per release.
        self._released = trio.Event()
        self._waiting = 0  # writers waiting in `reserve` for a release
        # Small blocks journalled and waiting for the mover: digest -> bytes.
        self.pending: dict[bytes, bytes] = {}
        self._to_move: list[bytes] = []
        self._work = trio.Event()
        self._moving = 0
        self._drained = trio.Event()
        self._drained.set()
        # When a block was last sealed (trio clock), and who waits for the mover to finish:
        # the mover yields to writers until they pause (MOVER_QUIET), but not to them.
        self._last_write = -math.inf
        self._writes = 0  # blocks sealed so far: a mover batch stops when this moves
        self._hurry = 0
        self._nudge = trio.Event()  # set to end the mover's wait for a pause at once
        # Small blocks journalled by ANOTHER process (a mount or the API writing the same
        # store) are in its journal until its mover stores them: a miss in the backend
        # looks there (set by FileSystem; runs in whatever thread reads).
        self.others: Callable[[bytes], bytes | None] | None = None
        # Files holding dirty blocks: sealed (stored in the background) when over budget, so
        # a writer never waits for a release that no one is going to make.
        self._tracked: weakref.WeakSet[Sealable] = weakref.WeakSet()
        # The backend's last refusal for lack of space, None once a store succeeds again.
        # While set, a writer over budget fails instead of waiting: the budget is held by
        # blocks the backend will not take (the mover retries them; nothing is lost).
        self.no_space: NoSpace | None = None
        # Written by the mover's worker thread, read by `moved` on the trio thread.
        self._mover_refusal: NoSpace | None = None
        self._refusing = False  # a writer was refused (logged once per episode)

    # ---- the dirty-bytes budget ---------------------------------------------------------------

    async def reserve(self, n: int) -> None:
        """Account `n` more dirty bytes, waiting while the mount is over budget. Raises
        `NoSpace` instead of waiting while the backend refuses blocks for lack of space."""
        while self.dirty_bytes + n > self.dirty_budget and self.dirty_bytes > 0:
            if self.no_space is not None:
                self._refuse_writer(self.no_space)
            for f in list(self._tracked):
                f.seal_all()
            self._tracked.clear()
            self._waiting += 1
            try:
                await self._released.wait()
            finally:
                self._waiting -= 1
        self.dirty_bytes += n
        if self.dirty_bytes * 2 >= self.dirty_budget:
            self._nudge.set()  # half the budget is dirty: the mover stops waiting for a pause

    def _refuse_writer(self, why: NoSpace) -> None:
        if not self._refusing:
            self._refusing = True
            log.warning(
                "writes fail with ENOSPC (%s of written data wait for the block store): "
                "%s; they resume by themselves once it takes blocks again",
                human(self.dirty_bytes), why.message,
            )  # fmt: skip
        raise NoSpace(why.message)

    def _backend_full(self, why: NoSpace | None) -> None:
        """Trio thread: a store was refused for lack of space (`why`) or succeeded (None)."""
        if why is None:
            if self.no_space is not None and self._refusing:
                log.info("the block store takes blocks again: writes go on")
            self._refusing = False
        self.no_space = why
        if why is not None:
            self._wake()  # waiting writers fail now instead of waiting for a release

    def hold(self, n: int) -> None:
        """Account `n` more bytes held in memory for background work, without waiting:
        writers wait in `reserve` until they are released. (A block both being stored and
        waiting for its file's hasher counts twice: the budget errs on the safe side.)"""
        self.dirty_bytes += n

    def track(self, f: Sealable) -> None:
        self._tracked.add(f)

    def release(self, n: int) -> None:
        self.dirty_bytes -= n
        self._wake()

    def _wake(self) -> None:
        if self._waiting:  # every close releases twice; nobody waits, as a rule
            self._released.set()
            self._released = trio.Event()

    # ---- pending small blocks -----------------------------------------------------------------

    def stage_small(self, data: bytes, hashed: hashlib._Hash | None = None) -> bytes | None:
        """Digest a sealed small block and queue it for the mover, instead of storing it on
        the commit path. Takes over the block's reservation of `block_size` dirty bytes:
        only `len(data)` stays reserved until the mover has stored it. None for a hole.
        `hashed`: a SHA-256 fed exactly `data` already (its digest is taken now). Raises
        OSError, having changed nothing, if the journal cannot take it (a full disk): the
        caller stores the block instead."""
        if self.is_zero(data):
            self._wrote()
            self.release(self.block_size)
            return None
        digest = (hashed if hashed is not None else hashlib.sha256(data)).digest()
        known = digest in self.pending  # the same content is already on its way
        if not known and self.journal is not None:
            self.journal.append(digest, data)
        self._wrote()
        self.release(self.block_size - len(data))
        if known:
            self.release(len(data))
        else:
            self.queue_pending(digest, data)
        return digest

    def queue_pending(self, digest: bytes, data: bytes) -> None:
        self.pending[digest] = data
        self._to_move.append(digest)
        if self._drained.is_set():
            self._drained = trio.Event()
        self._work.set()

    async def next_batch(self, limit: int = 256) -> list[tuple[bytes, bytes]]:
        """Wait for pending blocks and take up to `limit` of them (the mover's side)."""
        while not self._to_move:
            self._work = trio.Event()
            await self._work.wait()
        await self._writers_pause()
        if len(self._to_move) < limit:
            await trio.sleep(MOVER_LINGER)
        digests, self._to_move = self._to_move[:limit], self._to_move[limit:]
        self._moving += len(digests)
        return [(d, self.pending[d]) for d in digests]

    @property
    def writes(self) -> int:
        """Blocks sealed so far."""
        return self._writes

    @property
    def last_write(self) -> float:
        """When the last block was sealed (trio clock; -inf before the first)."""
        return self._last_write

    def _wrote(self) -> None:
        """A block was sealed: the mover waits for the next pause (MOVER_QUIET)."""
        self._last_write = trio.current_time()
        self._writes += 1

    async def _writers_pause(self) -> None:
        """Wait until no block was sealed for MOVER_QUIET, unless dirty bytes fill half the
        budget (writers must not come to wait for room) or `drained` is awaited."""
        while not self._must_move():
            wait = self._last_write + MOVER_QUIET - trio.current_time()
            if wait <= 0:
                return
            with trio.move_on_after(wait):
                await self._nudge.wait()
            if self._nudge.is_set():
                self._nudge = trio.Event()

    async def move(self, batch: Sequence[tuple[bytes, bytes]]) -> int:
        """The mover's step: `put_many` in a background thread."""
        return await background.run(self.put_many, batch, limiter=self.limiter)

    def put_many(self, batch: Sequence[tuple[bytes, bytes]]) -> int:
        """Worker thread: store a batch of pending blocks (not yet synced: their journal
        segments stay until a later sync, see FileSystem.retire_journal). Stops early,
        returning how many it stored, when a writer seals a block meanwhile and nothing
        hurries the mover: the rest waits for the next pause (the counters are read without
        a lock; at worst one more block is stored)."""
        self._mover_refusal = None
        writes = self._writes
        done = 0
        try:
            for digest, data in batch:
                if self._writes != writes and not self._must_move():
                    break
                self.backend.put(digest, data)
                done += 1
        except NoSpace as exc:
            self._mover_refusal = exc  # told to writers by `moved`, on the trio thread
            raise
        return done

    def _must_move(self) -> bool:
        """The mover may not wait for writers: `drained` is awaited or half the budget is
        dirty."""
        return bool(self._hurry) or self.dirty_bytes * 2 >= self.dirty_budget

    def moved(self, batch: Sequence[tuple[bytes, bytes]], *, ok: bool, put: bool = True) -> None:
        """The mover is done with `batch`: forget it (ok) or queue it again. `put=False`:
        forgotten without a put (stored elsewhere), which says nothing about room."""
        self._moving -= len(batch)
        if ok and put:
            self._backend_full(None)
        elif self._mover_refusal is not None:
            self._backend_full(self._mover_refusal)
        for digest, data in batch:
            if ok:
                del self.pending[digest]
                self.release(len(data))
                if self.journal is not None:
                    self.journal.stored(digest)
            else:
                self._to_move.append(digest)
        if not self._to_move and not self._moving:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until every pending block is in the backend (the mover does not wait for
        writers to pause meanwhile)."""
        self._hurry += 1
        self._nudge.set()
        try:
            await self._drained.wait()
        finally:
            self._hurry -= 1

    # ---- contents -----------------------------------------------------------------------------

    def is_zero(self, data: bytes | bytearray | memoryview) -> bool:
        return len(data) <= self.block_size and data == self.zero_block[: len(data)]

    def _store(self, data: bytes) -> bytes | None:
        # All-zero blocks become holes: sparse files take no storage.
        if self.is_zero(data):
            return None
        digest = hashlib.sha256(data).digest()
        self.backend.put(digest, data)
        return digest

    async def store(self, data: bytes) -> bytes | None:
        """Hash and store one block; None for an all-zero block (a hole)."""
        self._wrote()
        try:
            digest = await background.run(self._store, data, limiter=self.limiter)
        except NoSpace as exc:
            self._backend_full(exc)
            raise
        if digest is not None:
            self._backend_full(None)
        return digest

    async def load(self, digest: bytes) -> bytes:
        return await trio.to_thread.run_sync(self._get, digest, limiter=self.limiter)

    def _get(self, digest: bytes) -> bytes:
        # Entries leave `pending` only after they are stored, so a miss here finds the blob.
        data = self.pending.get(digest)
        if data is not None:
            return data
        try:
            return self.backend.get(digest)
        except NotFound:
            return self._from_journal(digest)

    def _from_journal(self, digest: bytes) -> bytes:
        data = self.others(digest) if self.others is not None else None
        if data is None:
            try:  # the other process's mover may have stored it meanwhile
                return self.backend.get(digest)
            except NotFound:
                raise _missing(digest) from None
        return data

    def _read_many(self, pieces: Sequence[tuple[bytes, int, int]]) -> list[bytes]:
        out = []
        for digest, offset, size in pieces:
            data = self.pending.get(digest)
            if data is not None:
                out.append(data[offset : offset + size])
                continue
            try:
                out.append(self.backend.read(digest, offset, size))
            except NotFound:
                out.append(self._from_journal(digest)[offset : offset + size])
        return out

    async def read_many(self, pieces: Sequence[tuple[bytes, int, int]]) -> list[bytes]:
        """Read (digest, offset, size) pieces in one worker-thread hop (inline if small)."""
        if sum(p[2] for p in pieces) <= INLINE_IO_MAX:
            return self._read_many(pieces)
        return await trio.to_thread.run_sync(self._read_many, pieces, limiter=self.limiter)

    def hash_content(self, blocks: dict[int, bytes], size: int) -> bytes:
        """Worker thread: the SHA-256 of a file of `size` bytes with block map `blocks`
        (holes and short stored blocks read as zeros)."""
        h = hashlib.sha256()
        bs = self.block_size
        for idx in range((size + bs - 1) // bs):
            want = min(bs, size - idx * bs)
            digest = blocks.get(idx)
            chunk = self._get(digest)[:want] if digest is not None else b""
            h.update(chunk)
            if len(chunk) < want:
                h.update(bytes(want - len(chunk)))
        return h.digest()

    async def sync(self) -> None:
        """Everything stored so far, and every journalled block, onto stable storage."""
        await trio.to_thread.run_sync(self.syncer(), limiter=self.limiter)

    def syncer(self) -> Callable[[], None]:
        """Trio thread: the sync of `sync` as a call for a worker thread to make (the
        journal's segments are picked now, on the thread that owns them)."""
        fds = self.journal.sync_fds() if self.journal is not None else []

        def sync() -> None:
            try:
                self.backend.sync()
            finally:
                sync_all(fds)

        return sync

    async def hash_update(self, hasher: hashlib._Hash, chunks: Sequence[bytes]) -> None:
        """Feed `chunks` to `hasher`, in order, in one worker-thread hop."""
        await background.run(_update_all, hasher, chunks, limiter=self.limiter)


def _update_all(hasher: hashlib._Hash, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)


def _missing(digest: bytes) -> StorageError:
    return StorageError(f"block {digest.hex()} is missing from the blob store")
