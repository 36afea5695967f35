"""The journal of small blocks: committed to a block map, not yet stored in the backend.

A close of a small file does not wait for its block to be put (a blob file costs a directory
lookup or two, a temp file and a rename: ~1 ms); the daemon's mover stores such blocks in
batches once writers pause. Until then their bytes live in memory and here, so that what was
closed survives `kill -9`: the block is appended to the daemon's journal *before* the redo log
record of the commit that names it (`index/redo.py`), each with one write(2).

Files: `<store>/journal/<pid>-<random>-<n>.jnl`, *segments*, each flocked by its daemon for
as long as it lives (`ownedfiles`). Records: u32 length, the 32-byte SHA-256, the bytes. The
digest is the check: a record whose bytes do not hash to it (a machine crash mid-append) ends
the segment. A segment is deleted once every block in it is stored and a sync of the backend
has made those puts durable (`Journal.retirable`/`drop`, driven by the daemon's
checkpointer). A segment whose flock is free belongs to a daemon that died: the next one to
start adopts it (stores its blocks, then deletes it), and meanwhile every process reads its
blocks from it (`JournalReader`).

Before, these bytes were rows of the index (`pending_blobs`): an INSERT of ~30 us and ~3 WAL
frames per small file at its commit, and a DELETE slice on the trio thread after the mover,
for bytes that also went into the redo log and then the blob file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from artifactfs.blobs.local import fsync_dir
from artifactfs.ownedfiles import (
    create_locked,
    lock_if_free,
    owned_files,
    remove_cut_creations,
)

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
SUFFIX = ".jnl"
_HEADER = struct.Struct("<I32s")


def journal_dir(store: Path) -> Path:
    return store / JOURNAL_DIR


def record(digest: bytes, data: bytes) -> bytes:
    return _HEADER.pack(len(data), digest) + data


def _records(buf: bytes, *, verify: bool) -> Iterator[tuple[int, bytes, int]]:
    """(offset of the bytes, digest, length) of each whole record of a segment's contents,
    up to the first one cut short (or, with `verify`, whose bytes do not hash to its
    digest)."""
    pos = 0
    while pos + _HEADER.size <= len(buf):
        length, digest = _HEADER.unpack_from(buf, pos)
        start = pos + _HEADER.size
        if start + length > len(buf):
            return
        if verify and hashlib.sha256(buf[start : start + length]).digest() != digest:
            log.warning("journal segment ends in a damaged record at byte %d (ignored)", pos)
            return
        yield start, digest, length
        pos = start + length


def _read_all(fd: int, offset: int = 0) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_segment(fd: int) -> list[tuple[bytes, bytes]]:
    """(digest, bytes) of every sound record of a segment, in order."""
    buf = _read_all(fd)
    return [(d, buf[s : s + n]) for s, d, n in _records(buf, verify=True)]


def write_segment(directory: Path, blocks: list[tuple[bytes, bytes]]) -> Path:
    """A segment holding `blocks`, durable, owned by nobody (so the next daemon to start
    adopts it): how a migration moves journalled blocks out of the index."""
    directory.mkdir(mode=0o700, exist_ok=True)
    fd, path = create_locked(directory, f"{os.getpid()}-{secrets.token_hex(4)}-0{SUFFIX}")
    try:
        os.write(fd, b"".join(record(d, b) for d, b in blocks))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    return path


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    size: int = 0
    waiting: set[bytes] = field(default_factory=set)  # appended here, not stored yet


class Journal:
    """This daemon's segments: appends on the trio thread (one write per block), which block
    waits in which segment, and which segments may go."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        remove_cut_creations(directory)
        self.directory = directory
        self._stem = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._made = 0
        self.current: Segment | None = None
        self.sealed: list[Segment] = []  # no appends any more; deleted once all stored
        self._where: dict[bytes, Segment] = {}

    def owns(self, path: str) -> bool:
        return os.path.basename(path).startswith(self._stem + "-")

    def append(self, digest: bytes, data: bytes) -> None:
        """Journal one block (trio thread, one write(2); before the commit naming it is
        persisted). On failure nothing of it stays in the segment."""
        seg = self.current
        if seg is None:
            fd, path = create_locked(self.directory, f"{self._stem}-{self._made}{SUFFIX}")
            self._made += 1
            seg = self.current = Segment(path, fd)
        rec = record(digest, data)
        try:
            done = os.write(seg.fd, rec)
            if done < len(rec):  # a regular file writes short only when it fills up
                raise OSError(errno.ENOSPC, "journal write cut short")
        except OSError:
            os.ftruncate(seg.fd, seg.size)
            raise
        seg.size += len(rec)
        self._add(seg, digest)

    def _add(self, seg: Segment, digest: bytes) -> None:
        old = self._where.get(digest)
        if old is not None:
            old.waiting.discard(digest)
        seg.waiting.add(digest)
        self._where[digest] = seg

    def adopt(self, path: Path, fd: int, blocks: list[tuple[bytes, bytes]]) -> None:
        """Take over the segment of a daemon that died (we hold its flock now): it goes once
        its blocks are stored, as our own do."""
        seg = Segment(path, fd, os.fstat(fd).st_size)
        self.sealed.append(seg)
        for digest, _ in blocks:
            if digest not in self._where:
                self._add(seg, digest)

    def stored(self, digest: bytes) -> None:
        """The mover stored `digest` (not yet synced)."""
        seg = self._where.pop(digest, None)
        if seg is not None:
            seg.waiting.discard(digest)

    def retirable(self) -> list[Segment]:
        """Segments all of whose blocks are stored, the current one sealed first (the next
        append starts a new one): to be dropped after a sync of the backend."""
        cur = self.current
        if cur is not None and cur.size:
            self.sealed.append(cur)
            self.current = None
        return [s for s in self.sealed if not s.waiting]

    def drop(self, segments: list[Segment]) -> list[Segment]:
        """Let go of segments whose blocks are stored and synced: the ones to delete with
        `remove_segments` (in a worker thread: the last close of a segment of 100 MB frees
        its pages and took ~6 ms)."""
        gone = [s for s in segments if not s.waiting and s in self.sealed]
        for seg in gone:
            self.sealed.remove(seg)
        return gone

    def sync_fds(self) -> list[int]:
        """Duplicates of the segments' fds, for a worker thread to fdatasync and close (a
        segment dropped meanwhile closes only its own fd)."""
        segs = [*self.sealed, *([self.current] if self.current is not None else [])]
        return [os.dup(s.fd) for s in segs if s.size]

    def close(self) -> None:
        """Let go of every segment (their flocks with them). A clean stop retired them all
        before (`FileSystem.shutdown`); what is left, the next daemon to start adopts: a
        segment is never deleted here, without the sync that must come first."""
        self.retirable()
        for seg in self.sealed:
            os.close(seg.fd)
        self.sealed = []
        self._where = {}


def remove_segments(segments: list[Segment]) -> None:
    """Any thread: delete segments `Journal.drop` let go of."""
    for seg in segments:
        try:
            os.unlink(seg.path)
        finally:
            os.close(seg.fd)


def sync_all(fds: list[int]) -> None:
    """Worker thread: fdatasync and close `fds` (from `Journal.sync_fds`)."""
    try:
        for fd in fds:
            os.fdatasync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def dead_segments(directory: Path, journal: Journal | None) -> list[tuple[Path, int]]:
    """Segments whose daemon died, each with an fd that holds its flock now."""
    found = []
    for entry in owned_files(directory, SUFFIX):
        if journal is not None and journal.owns(entry.path):
            continue
        fd = lock_if_free(entry.path)
        if fd is not None:
            found.append((Path(entry.path), fd))
    return found


@dataclass(eq=False)
class _Scanned:
    ino: int
    size: int
    places: dict[bytes, tuple[int, int]]  # digest -> (offset, length)


class JournalReader:
    """Any process: blocks other processes journalled and have not stored yet, read from
    their segments (live or dead). Segments only grow until they are deleted, so each is
    scanned once and then only its new tail. Any thread (one at a time)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: dict[str, _Scanned] = {}
        self._lock = threading.Lock()

    @classmethod
    def beside(cls, index_path: Path) -> JournalReader:
        """The reader of the store whose index is `index_path` (both in the store directory)."""
        return cls(journal_dir(index_path.parent))

    def _scan(self) -> list[tuple[str, _Scanned]]:
        out = []
        present = set()
        for entry in owned_files(self.directory, SUFFIX):
            present.add(entry.path)
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            seen = self._seen.get(entry.path)
            if seen is None or seen.ino != st.st_ino or seen.size > st.st_size:
                seen = self._seen[entry.path] = _Scanned(st.st_ino, 0, {})
            if st.st_size > seen.size:
                self._extend(entry.path, seen)
            out.append((entry.path, seen))
        for gone in self._seen.keys() - present:
            del self._seen[gone]
        return out

    def _extend(self, path: str, seen: _Scanned) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            buf = _read_all(fd, seen.size)
        finally:
            os.close(fd)
        end = 0
        for start, digest, length in _records(buf, verify=False):
            seen.places[digest] = (seen.size + start, length)
            end = start + length
        seen.size += end

    def get(self, digest: bytes) -> bytes | None:
        """The bytes of `digest` if a segment holds them (checked against the digest)."""
        with self._lock:
            return self._get(digest)

    def _get(self, digest: bytes) -> bytes | None:
        for path, seen in self._scan():
            place = seen.places.get(digest)
            if place is None:
                continue
            try:
                with open(path, "rb") as fh:
                    data = os.pread(fh.fileno(), place[1], place[0])
            except FileNotFoundError:  # stored and retired meanwhile: the caller looks again
                continue
            if hashlib.sha256(data).digest() == digest:
                return data
        return None

    def digests(self) -> set[bytes]:
        with self._lock:
            return {d for _, seen in self._scan() for d in seen.places}

    def totals(self) -> tuple[int, int]:
        """(blocks, bytes) in every segment (stored ones not yet retired included)."""
        with self._lock:
            sizes = {d: n for _, seen in self._scan() for d, (_, n) in seen.places.items()}
        return len(sizes), sum(sizes.values())
