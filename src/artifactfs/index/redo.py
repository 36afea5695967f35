"""The redo log: what a daemon promised to keep, before SQLite has committed it.

A close must survive `kill -9` of the daemon, and a SQLite COMMIT per close was the largest
single cost of a small file (about a tenth of the trio thread's time in `tar -xf`). So under
group commit the daemon keeps one write transaction open for up to `GROUP_COMMIT_INTERVAL`
seconds, records every statement that changes the database (SQL text and parameters), and at
a close appends the statements run since the previous append to its redo log with ONE
write(2). What is in the page cache survives the death of the process, as a committed WAL
frame does; fsync() still commits and syncs for real (`Index.make_durable`).

A log only ever holds statements of the open transaction of its owner, which holds the write
lock all that time, so they apply exactly to the state committed before it. Every commit by a
connection with a log (or one that replayed one) writes a fresh random `redo_epoch` in `meta`
in the same transaction; a record carries the epoch it was written under and is replayed only
if the database still has that epoch. Then:
  - the owner died with an open transaction: nobody else could commit since, the epochs
    match, and the next writer on this store (`Index._begin`, a remount, the CLI) runs the
    statements again in order, inside its own transaction, and deletes the log once that
    commits;
  - the owner died after a COMMIT but before truncating its log: the epoch moved, the
    records are stale and the log is deleted;
  - the owner is alive: it holds an flock on its log, and nobody else touches it.

Record layout: u32 payload length, u32 CRC-32 of (epoch + payload), u64 epoch, then the
payload: a list of (many, sql, params) (`many`: params is a list of parameter rows) in
`marshal` format version 4. Not CBOR as elsewhere: cbor2 took 15 us to encode a close's
record against marshal's 2.4 us, and these records are private, short-lived and read back
only by this code, after their CRC matched, from a directory only the store's owner can
write. A record cut short (a crash of the machine mid-append) fails its CRC and ends the
replay: it was never acknowledged, fsync() commits instead of appending.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import marshal
import os
import secrets
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from artifactfs.ownedfiles import (
    create_locked,
    is_locked,
    lock_if_free,
    owned_files,
    remove_cut_creations,
)

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIQ")
_EPOCH = struct.Struct("<Q")
_MARSHAL_VERSION = 4  # readable by every Python since 3.4

# A recorded statement: (many, sql, params); params is one row, or a list of rows if many.
Statement = tuple[bool, str, Any]


def redo_dir(index_path: Path) -> Path:
    return index_path.parent / (index_path.name + "-redo")


def new_epoch() -> int:
    """A fresh epoch: random, so that a log never matches another database's epoch (an index
    restored from a backup over a store that still has old logs, say)."""
    return secrets.randbits(63)


def _plain(value: Any) -> Any:
    """`value` as a type marshal writes (an IntEnum as its int, and so on)."""
    if value is None or type(value) in (int, float, str, bytes):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"a statement parameter of type {type(value).__name__} cannot be logged")


def _row(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: _plain(v) for k, v in params.items()}
    return tuple(_plain(v) for v in params)


def _encode(epoch: int, statements: list[Statement]) -> bytes:
    try:
        payload = marshal.dumps(statements, _MARSHAL_VERSION)
    except ValueError:  # a parameter of a subclass (an enum): the slow way
        payload = marshal.dumps(
            [(m, s, [_row(r) for r in p] if m else _row(p)) for m, s, p in statements],
            _MARSHAL_VERSION,
        )
    crc = zlib.crc32(payload, zlib.crc32(_EPOCH.pack(epoch)))
    return _HEADER.pack(len(payload), crc, epoch) + payload


def read_records(fd: int) -> Iterator[tuple[int, list[Statement]]]:
    """(epoch, statements) of every whole record, in order, up to the first damaged one."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    data = b"".join(chunks)
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc, epoch = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(_EPOCH.pack(epoch))) != crc:
            log.warning("redo log ends in a damaged record at byte %d (ignored)", pos)
            return
        yield epoch, [(bool(m), str(s), p) for m, s, p in marshal.loads(payload)]
        pos += _HEADER.size + length


class RedoLog:
    """This process's log: created, flocked for as long as it lives, removed at close."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        remove_cut_creations(directory)
        # Named *.log only once locked: a scan for dead logs (every BEGIN, and each mount's
        # follower every second) must never find this one free and remove it.
        self.fd, self.path = create_locked(directory, f"{os.getpid()}-{secrets.token_hex(4)}.log")
        self.size = 0

    def append(self, epoch: int, statements: list[Statement]) -> None:
        """One record with one write(2). On failure the log is cut back to where it was, so
        a later record is never hidden behind a torn one."""
        record = _encode(epoch, statements)
        try:
            done = os.write(self.fd, record)
            while done < len(record):  # a regular file writes short only when it fills up
                n = os.write(self.fd, record[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "redo log write made no progress")
                done += n
        except OSError:
            os.ftruncate(self.fd, self.size)
            raise
        self.size += len(record)

    def reset(self) -> None:
        """Everything in the log is committed: start it over."""
        if self.size:
            os.ftruncate(self.fd, 0)
            self.size = 0

    def close(self) -> None:
        """A clean stop (everything committed): the log goes away."""
        os.unlink(self.path)
        os.close(self.fd)


class DeadLog:
    """The log of a process that died: we hold its flock while we replay it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def records(self, epoch: int) -> list[list[Statement]]:
        """The statement lists still to replay: records written under `epoch`."""
        return [stmts for e, stmts in read_records(self.fd) if e == epoch]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)

    def release(self) -> None:
        """Not replayed after all (our transaction rolled back): leave it for the next one."""
        os.close(self.fd)


def _other_logs(directory: Path, own: RedoLog | None) -> list[os.DirEntry[str]]:
    return owned_files(directory, ".log", None if own is None else own.path)


def dead_logs(directory: Path, own: RedoLog | None) -> list[DeadLog]:
    """Logs in `directory` whose owner is gone (their flock is free), now locked by us."""
    found = []
    for entry in _other_logs(directory, own):
        fd = lock_if_free(entry.path)
        if fd is not None:
            found.append(DeadLog(Path(entry.path), fd))
    return found


def any_dead(directory: Path, own: RedoLog | None) -> bool:
    """Whether a log in `directory` belongs to a process that died (its flock is free). Locks
    nothing: whoever applies it finds it again (`dead_logs`) under the write lock."""
    found = dead_logs(directory, own)
    for dead in found:
        dead.release()
    return bool(found)


def unsynced_bytes(path: Path) -> int:
    """What a live log holds (0 once its owner committed, or it is gone)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def live_unsynced(directory: Path, own: RedoLog | None) -> list[Path]:
    """Logs of live processes that hold records (closes their owner has not committed yet)."""
    return [
        Path(e.path)
        for e in _other_logs(directory, own)
        if unsynced_bytes(Path(e.path)) and is_locked(e.path)
    ]
