"""Blobs as files on a local disk: `<root>/sha256/<hex[0:2]>/<hex[2:4]>/<hex>`.

This module owns the on-disk layout of the blob tree under `root` (which is `<store>/blobs`), the
atomic durable write of one blob (modelled on restic's local backend `Save`), a bounded cache of
read-only file descriptors, and the clean-up of temp files a crash left behind.

It must not know about files, inodes, checkpoints or SQL, must not decide when a blob is garbage
(the caller says `delete`), and must not run on the trio thread: every method does blocking I/O
and is meant to be called from worker threads. All methods are thread-safe, and several processes
may put into the same tree at once.

Failure contract: ENOSPC/EDQUOT raise `NoSpace` (permanent, never retried); any other `OSError`
raises `StorageError` with a one-line message; a failed `put` never leaves a temp file behind and
never leaves a partial blob under its final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from artifactfs.blobs.backend import digest_hex
from artifactfs.errors import Corrupt, InvalidArgument, NoSpace, NotFound, StorageError

TEMP_PREFIX = ".tmp-"
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
# A blob at least this large has its writeback started as soon as it is written (without
# waiting for it), so the syncfs of the next fsync finds its data on the way to the disk
# instead of starting it all then. Measured on 64 MiB written and fsync'ed through a mount:
# the fsync 44 -> 6 ms, the whole write 429 -> 528 MB/s. Small blobs (journalled small files
# the mover stores in batches) are left to the kernel's writeback, which batches them.
EARLY_WRITEBACK_MIN = 256 * 1024
_HEX_NAME = re.compile(r"[0-9a-f]{64}")
# Errors that mean "the medium is full": permanent for the caller, so never retried.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# fsync errors that mean "this filesystem cannot sync", not "the sync failed" (restic ignores them
# too); anything else from fsync is a real failure and is raised.
_SYNC_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EINVAL})
# Puts of the same digest in this process serialise on one of these, so exactly one of them
# writes and returns True; different digests rarely share a stripe.
_PUT_STRIPES = 256
# Blob files being read ahead at most at once (a few readers' next PREFETCH_BLOCKS each).
_READAHEAD_MAX = 16
_READAHEAD_RECENT = 256
# Blobs are immutable: make them read-only so nothing rewrites one by accident.
_BLOB_MODE = 0o444
_DIR_MODE = 0o755

log = logging.getLogger(__name__)


class _CachedFd:
    """One cached read-only descriptor. `users` counts readers between acquire and release; an
    evicted entry is closed by whoever drops `users` to zero, so a descriptor is never closed
    (and its number reused by another open) under a running `pread`."""

    __slots__ = ("evicted", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class LocalBackend:
    """A `BlobBackend` on a local filesystem.

    `durable`: fsync each blob before its rename and its directory after (turn off only for
    tests and scratch stores). `verify_reads`: re-hash the result of every `get` and raise
    `Corrupt` on mismatch (`read` returns part of a blob and cannot be checked).
    `max_open_files`: how many read-only descriptors stay cached; a descriptor in use by a
    reader when it is evicted stays open until that read ends, so the process may briefly hold
    up to `max_open_files` + the number of concurrent readers.

    Digests must be 32 bytes; anything else raises `InvalidArgument`.
    """

    def __init__(
        self,
        root: Path,
        *,
        durable: bool = True,
        verify_reads: bool = False,
        max_open_files: int = 256,
    ) -> None:
        if max_open_files < 1:
            raise InvalidArgument(f"max_open_files must be at least 1, not {max_open_files}")
        self.root = Path(root)
        self.durable = durable
        self.verify_reads = verify_reads
        self.max_open_files = max_open_files
        self._tree = str(self.root / "sha256")
        # Guards _fds, _dirs and the usage counters. Never held across disk I/O that can block
        # for long (writes, fsync, open); only across close/fstat and dictionary work.
        self._lock = threading.Lock()
        self._fds: OrderedDict[bytes, _CachedFd] = OrderedDict()
        # Leaf directories known to exist, so a put does not call mkdir each time.
        self._dirs: set[str] = set()
        self._put_locks = [threading.Lock() for _ in range(_PUT_STRIPES)]
        self._temp_counter = itertools.count()
        # Running estimate of bytes used: the last recount_usage() total plus the sizes this
        # object has since put minus those it has deleted (see usage()).
        self._used = 0
        self._adjusted = 0
        self._unsynced = 0  # puts not yet made durable by sync() (durable=False only)
        # Read-ahead of blob files (prefetch): made on first use, gone at close().
        self._readahead: ThreadPoolExecutor | None = None
        self._reading_ahead: set[bytes] = set()
        # The last blobs read ahead: a reader names each next block at every read request.
        self._read_ahead_recently: OrderedDict[bytes, None] = OrderedDict()

    # -- paths --------------------------------------------------------------------------------

    def _hex(self, digest: bytes) -> str:
        if len(digest) != 32:
            raise InvalidArgument(f"blob digest must be 32 bytes, not {len(digest)}")
        return digest_hex(digest)

    def path_of(self, digest: bytes) -> Path:
        """Where the blob for `digest` lives (whether or not it is stored)."""
        return Path(self._file(self._hex(digest)))

    def _leaf(self, hexd: str) -> str:
        return os.path.join(self._tree, hexd[0:2], hexd[2:4])

    def _file(self, hexd: str) -> str:
        return os.path.join(self._tree, hexd[0:2], hexd[2:4], hexd)

    def _temp_name(self, hexd: str) -> str:
        # pid + thread id + counter + random: unique across threads, processes and forks, so no
        # two writers ever share a temp file and removing ours on failure never hits another's.
        return (
            f"{TEMP_PREFIX}{hexd}-{os.getpid()}-{threading.get_ident()}"
            f"-{next(self._temp_counter)}-{os.urandom(4).hex()}"
        )

    # -- write --------------------------------------------------------------------------------

    def put(self, digest: bytes, data: bytes | memoryview) -> bool:
        """Store `data` under `digest`: temp file in the target directory → write → check the
        length → fsync → rename → fsync the directory. Returns False if already present.

        Within one process, exactly one of several concurrent puts of a digest returns True.
        Across processes, two may both write and return True; the rename is atomic and the
        contents are identical, so the blob is intact either way.
        """
        hexd = self._hex(digest)
        final = self._file(hexd)
        view = memoryview(data).cast("B")
        with self._put_locks[digest[0]]:
            if self._exists(final, hexd):
                # A dedup hit: the blob is in use again. Its mtime says so to gc, which only
                # deletes blobs older than its grace period (`delete_if_older`).
                with contextlib.suppress(OSError):
                    os.utime(final)
                return False
            try:
                self._write_new(hexd, final, view)
            except OSError as exc:
                if exc.errno in _FULL_ERRNOS:
                    raise NoSpace(f"no space left on device for blob {hexd}") from exc
                raise StorageError(f"cannot store blob {hexd}: {_describe(exc)}") from exc
        with self._lock:
            self._used += len(view)
            self._adjusted += len(view)
            self._unsynced += 1
        return True

    def _write_new(self, hexd: str, final: str, view: memoryview) -> None:
        leaf = self._leaf(hexd)
        self._ensure_dir(leaf)
        tmp = os.path.join(leaf, self._temp_name(hexd))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, _BLOB_MODE)
        except FileNotFoundError:
            # The directory was removed behind our cache (e.g. by an external clean-up).
            with self._lock:
                self._dirs.discard(leaf)
            self._ensure_dir(leaf)
            fd = os.open(tmp, flags, _BLOB_MODE)
        try:
            try:
                written = 0
                while written < len(view):
                    n = os.write(fd, view[written:])
                    if n <= 0:  # should not happen on a regular file; never loop forever
                        raise OSError(errno.EIO, "write made no progress")
                    written += n
                # Sanity check, as restic does: a short count here means data would be lost.
                if written != len(view):
                    raise OSError(errno.EIO, f"wrote {written} bytes instead of {len(view)}")
                if self.durable:
                    _fsync(fd)
                elif len(view) >= EARLY_WRITEBACK_MIN:
                    start_writeback(fd)
            finally:
                os.close(fd)
            # rename is atomic: readers see no blob or the whole blob, never a partial one.
            os.rename(tmp, final)
        except BaseException:
            # Every failure path, including KeyboardInterrupt, removes the temp file.
            _unlink_quietly(tmp)
            raise
        if self.durable:
            # Commit the rename itself; without this a crash can lose a blob the index already
            # references.
            fsync_dir(leaf)

    def sync(self) -> None:
        """Make every blob put so far durable.

        With `durable=False` a put is atomic (temp file + rename) but not yet on stable
        storage; this flushes them all with one syncfs(2) of the store's filesystem, which costs
        one journal commit instead of an fsync per blob and per directory.
        """
        if self.durable:
            return
        with self._lock:
            pending = self._unsynced
            self._unsynced = 0
        if not pending:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                with self._lock:
                    self._unsynced += pending
                raise StorageError(f"cannot sync the blob store: {os.strerror(err)}")
        finally:
            os.close(fd)

    def _ensure_dir(self, leaf: str) -> None:
        with self._lock:
            if leaf in self._dirs:
                return
        # Leaf first: in a store of any age its parents exist, so one mkdir is the usual cost
        # (a failed mkdir of an existing parent is a syscall per put in a fresh store).
        self._mkdir(leaf)
        with self._lock:
            self._dirs.add(leaf)

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            return  # another thread or process made it
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                raise
            self._mkdir(parent)
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                return
        if self.durable:
            # The new directory's entry must be durable before blobs inside it are.
            fsync_dir(os.path.dirname(path))

    # -- read ---------------------------------------------------------------------------------

    def get(self, digest: bytes) -> bytes:
        hexd = self._hex(digest)
        entry = self._acquire(digest, hexd)
        try:
            size = os.fstat(entry.fd).st_size
            data = _pread_all(entry.fd, size, 0)
        except OSError as exc:
            raise StorageError(f"cannot read blob {hexd}: {_describe(exc)}") from exc
        finally:
            self._release(entry)
        if self.verify_reads and hashlib.sha256(data).digest() != digest:
            raise Corrupt(f"blob {hexd} does not match its digest")
        return data

    def read(self, digest: bytes, offset: int, size: int) -> bytes:
        hexd = self._hex(digest)
        if offset < 0 or size < 0:
            raise InvalidArgument(f"bad blob range: offset {offset}, size {size}")
        entry = self._acquire(digest, hexd)
        try:
            return _pread_all(entry.fd, size, offset)
        except OSError as exc:
            raise StorageError(f"cannot read blob {hexd}: {_describe(exc)}") from exc
        finally:
            self._release(entry)

    def prefetch(self, digests: Iterable[bytes]) -> int:
        """Sequential read-ahead across blob files: open the next blocks of a file being read
        in order and have the kernel read them in (POSIX_FADV_WILLNEED), in a background
        thread, so that the reads that follow find them in the page cache. Each blob file is
        read ahead on its own by the kernel, but not the next one; cold, every block cost its
        directory lookups and disk reads one after the other. Returns how many it started;
        errors are only logged (the read reports them)."""
        started = 0
        for digest in digests:
            with self._lock:
                if (
                    digest in self._reading_ahead
                    or digest in self._read_ahead_recently
                    or len(self._reading_ahead) >= _READAHEAD_MAX
                ):
                    continue
                self._reading_ahead.add(digest)
                self._read_ahead_recently[digest] = None
                if len(self._read_ahead_recently) > _READAHEAD_RECENT:
                    self._read_ahead_recently.popitem(last=False)
                if self._readahead is None:
                    self._readahead = ThreadPoolExecutor(2, thread_name_prefix="readahead")
                pool = self._readahead
            try:
                pool.submit(self._read_ahead, digest)
            except RuntimeError:  # close() shut the pool down meanwhile
                with self._lock:
                    self._reading_ahead.discard(digest)
                break
            started += 1
        return started

    def _read_ahead(self, digest: bytes) -> None:
        try:
            entry = self._acquire(digest, self._hex(digest))
            try:
                os.posix_fadvise(entry.fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                self._release(entry)
        except Exception as exc:
            log.debug("read-ahead of blob %s failed: %s", digest_hex(digest), exc)
        finally:
            with self._lock:
                self._reading_ahead.discard(digest)

    def _acquire(self, digest: bytes, hexd: str) -> _CachedFd:
        with self._lock:
            entry = self._fds.get(digest)
            if entry is not None:
                self._fds.move_to_end(digest)
                entry.users += 1
                return entry
        path = self._file(hexd)
        for _ in range(3):
            # open outside the lock: a cold directory lookup can block on the disk.
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"blob {hexd} not found") from None
            except OSError as exc:
                raise StorageError(f"cannot open blob {hexd}: {_describe(exc)}") from exc
            with self._lock:
                # If the file was unlinked between our open and now, delete() may already have
                # swept the cache; caching this fd would let a deleted blob stay readable. (It
                # can also be a concurrent put in another process replacing the inode: retry.)
                try:
                    unlinked = os.fstat(fd).st_nlink == 0
                except OSError as exc:
                    os.close(fd)
                    raise StorageError(f"cannot stat blob {hexd}: {_describe(exc)}") from exc
                if unlinked:
                    os.close(fd)
                    continue
                entry = self._fds.get(digest)
                if entry is not None:  # another reader won the race; use its fd
                    os.close(fd)
                    self._fds.move_to_end(digest)
                else:
                    entry = _CachedFd(fd)
                    self._fds[digest] = entry
                    self._evict_locked()
                entry.users += 1
                return entry
        raise NotFound(f"blob {hexd} not found")

    def _release(self, entry: _CachedFd) -> None:
        with self._lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                os.close(entry.fd)

    def _evict_locked(self) -> None:
        while len(self._fds) > self.max_open_files:
            _, old = self._fds.popitem(last=False)
            self._drop_locked(old)

    @staticmethod
    def _drop_locked(entry: _CachedFd) -> None:
        entry.evicted = True
        if entry.users == 0:
            os.close(entry.fd)

    # -- existence, delete --------------------------------------------------------------------

    def has(self, digest: bytes) -> bool:
        hexd = self._hex(digest)
        return self._exists(self._file(hexd), hexd)

    def _exists(self, path: str, hexd: str) -> bool:
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot stat blob {hexd}: {_describe(exc)}") from exc
        return True

    def delete_if_older(self, digest: bytes, cutoff_ns: int) -> bool:
        """Delete the blob only if its mtime is older than `cutoff_ns` (gc). It is renamed
        aside before the check: a put that starts meanwhile (another process) finds it
        absent and writes a fresh copy, which stays; one that refreshed it before has made
        it young, and it is renamed back."""
        hexd = self._hex(digest)
        path = self._file(hexd)
        aside = f"{path}.gc-{os.getpid()}-{threading.get_ident()}"
        with self._put_locks[digest[0]]:  # puts of this process wait
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot delete blob {hexd}: {_describe(exc)}") from exc
            st = os.stat(aside)
            if st.st_mtime_ns >= cutoff_ns:
                os.rename(aside, path)  # over a fresh copy, if any: same content
                return False
            os.unlink(aside)
            with self._lock:
                entry = self._fds.pop(digest, None)
                if entry is not None:
                    self._drop_locked(entry)
                self._used = max(0, self._used - st.st_size)
                self._adjusted -= st.st_size
        return True

    def delete(self, digest: bytes) -> bool:
        """Remove the blob and drop its cached descriptor. Returns False if it was absent.

        Not fsynced even when durable: a delete lost in a crash only leaves an unreferenced
        blob, which garbage collection removes again.
        """
        hexd = self._hex(digest)
        path = self._file(hexd)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete blob {hexd}: {_describe(exc)}") from exc
        finally:
            # Unlink first, then sweep the cache: together with the nlink check in _acquire
            # this guarantees no descriptor of a deleted blob stays cached.
            with self._lock:
                entry = self._fds.pop(digest, None)
                if entry is not None:
                    self._drop_locked(entry)
        with self._lock:
            self._used = max(0, self._used - size)
            self._adjusted -= size
        return True

    # -- walking ------------------------------------------------------------------------------

    def _walk(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Every entry in every leaf directory, with the leaf's `ab/cd` prefix."""
        for d1 in _scandir(self._tree):
            if not d1.is_dir(follow_symlinks=False):
                continue
            for d2 in _scandir(d1.path):
                if not d2.is_dir(follow_symlinks=False):
                    continue
                prefix = d1.name + d2.name
                for entry in _scandir(d2.path):
                    yield prefix, entry

    def iterate(self) -> Iterator[tuple[bytes, int, float]]:
        """Every stored blob as (digest, size, mtime). Temp files and anything not named like a
        blob in its right directory are skipped; a blob deleted during the walk may or may not
        be listed."""
        for prefix, entry in self._walk():
            name = entry.name
            if not _HEX_NAME.fullmatch(name) or not name.startswith(prefix):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while we walked
            except OSError as exc:
                raise StorageError(f"cannot stat blob {name}: {_describe(exc)}") from exc
            yield bytes.fromhex(name), st.st_size, st.st_mtime

    def sweep_temp(self, older_than_seconds: float) -> int:
        """Remove `.tmp-*` files older than `older_than_seconds` (left by a crash mid-put) and
        return how many were removed. A live put's temp file is young, so pass an age well
        above the slowest put (an hour is safe); a put whose temp file is swept fails with
        `StorageError` and leaves no blob, it never corrupts one."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for _, entry in self._walk():
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # its put finished or another sweeper got it
            except OSError as exc:
                raise StorageError(f"cannot remove {entry.path}: {_describe(exc)}") from exc
            removed += 1
        return removed

    # -- usage, close -------------------------------------------------------------------------

    def recount_usage(self) -> int:
        """Walk the tree, set the used-bytes estimate to the exact total, and return it. Slow
        (one stat per blob): run it once at mount in a worker thread, not per statfs. Puts and
        deletes that race with the walk may be counted twice or missed."""
        with self._lock:
            before = self._adjusted
        total = sum(size for _, size, _ in self.iterate())
        with self._lock:
            self._used = max(0, total + self._adjusted - before)
            return self._used

    def usage(self) -> tuple[int, int]:
        """(used, free) in bytes.

        `used` is an estimate of the logical size of all blobs (sum of file sizes, not
        allocated blocks): the total from the last `recount_usage()` (0 if never called) plus
        what this object has since put, minus what it has deleted. Blobs written by other
        processes are not seen until the next recount. `free` is exact: what statvfs of `root`
        says an unprivileged user may still write (f_bavail × f_frsize).
        """
        # Before the first put `root` may not exist yet: ask the filesystem it will live on.
        target = self.root
        while not target.exists() and target.parent != target:
            target = target.parent
        try:
            st = os.statvfs(target)
        except OSError as exc:
            raise StorageError(f"cannot statvfs {self.root}: {_describe(exc)}") from exc
        with self._lock:
            used = self._used
        return used, st.f_bavail * st.f_frsize

    def close(self) -> None:
        """Close cached descriptors (those in use close when their read ends). The backend
        stays usable; later reads open descriptors again."""
        with self._lock:
            entries = list(self._fds.values())
            self._fds.clear()
            for entry in entries:
                self._drop_locked(entry)
            pool, self._readahead = self._readahead, None
            self._read_ahead_recently.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _describe(exc: OSError) -> str:
    """A one-line description of an OSError (strerror and the file, no traceback)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename:
        text += f" ({exc.filename})"
    return text.replace("\n", " ")


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes from `offset`, fewer only at end of file (pread may return short)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _SYNC_UNSUPPORTED:
            raise


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory `path` durable (a no-op where the file system cannot)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Have the kernel start writing `fd`'s dirty pages out, and return at once. A hint: where
    it fails the pages wait for the usual writeback, and `sync` still makes them durable."""
    _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _unlink_quietly(path: str) -> None:
    # Already gone, or we are in the middle of reporting a worse error.
    with contextlib.suppress(OSError):
        os.unlink(path)


def _scandir(path: str) -> list[os.DirEntry[str]]:
    """The entries of `path`, or none if it does not exist (yet)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list {path}: {_describe(exc)}") from exc
