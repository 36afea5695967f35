"""The Index: one SQLite connection, a transaction helper and named queries.

Owns every SQL statement the layers above need; nothing above this module writes SQL. The
connection lives on the trio thread (queries are point lookups of microseconds); long work such
as removing a big tree is batched by the caller into several transactions.

It must not know about FUSE, blobs' bytes, or who may see what.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from artifactfs.index import redo
from artifactfs.index.migrations import migrate
from artifactfs.index.redo import Statement

log = logging.getLogger(__name__)

# SQLite's own wait for a lock held by another connection (another mount of the same store).
BUSY_TIMEOUT_MS = 5000
# Group commit: the daemon commits at least this often, and after this many units.
GROUP_COMMIT_INTERVAL = 0.05
GROUP_COMMIT_MAX_UNITS = 2000
# A WAL past this size is restarted from its beginning (see Index.checkpoint): measured here,
# four tar extractions in a row with the group transaction always open grew it to 818 MB.
WAL_RESET_BYTES = 64 << 20
# ... and cut back to this size when it starts again (journal_size_limit). Nothing is kept:
# WAL frames (24 + 4096 bytes) are not page-aligned, so each frame written over an old one
# whose pages had left the page cache (the bench's drop_caches, memory pressure) read them
# from the disk first, inside COMMIT on the trio thread. Measured on `git clone` of 3,000
# files after a drop_caches (median of 4 per mount): COMMIT 7.4 ms on average, the clone
# 3.4 s; appending to a cut file: 2.4 s (the passthrough: 1.9 s).
WAL_KEEP_BYTES = 0
# The row cache (see Index._rows) is dropped whole when it grows past this many inodes.
ROW_CACHE_MAX = 50_000

INODE_COLUMNS = (
    "id, kind, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, btime_ns, "
    "namespace_id, sha256, stored"
)


@dataclass(slots=True)
class InodeRow:
    id: int
    kind: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    namespace_id: int | None
    sha256: bytes | None
    stored: int = 0


@dataclass(slots=True)
class NamespaceRow:
    id: int
    public_id: str
    scope_id: int
    kind: str
    owner: str
    name: str
    root_inode: int
    created_ns: int


@dataclass(slots=True)
class ScopeRow:
    id: int
    sandbox_id: int
    kind: str
    owner: str
    name: str
    inode: int
    created_ns: int
    expires_ns: int | None


@dataclass(slots=True)
class SandboxRow:
    id: int
    name: str
    inode: int
    created_ns: int


@dataclass(slots=True)
class CheckpointRow:
    id: int
    namespace_id: int
    name: str
    root: bytes
    created_ns: int
    creator: str
    files: int
    bytes: int
    manifest_bytes: int


@dataclass(slots=True)
class DirState:
    """A clean directory's manifest digest and subtree totals (see dir_manifests)."""

    digest: bytes
    files: int
    bytes: int


@dataclass(slots=True)
class CredentialRow:
    id: str
    sandbox: str
    user: str
    session: str
    grants: dict[str, str]
    issued_ns: int
    expires_ns: int
    revoked_ns: int | None
    issuer: str


CREDENTIAL_COLUMNS = (
    "id, sandbox, user, session, grants, issued_ns, expires_ns, revoked_ns, issuer"
)


def _credential(row: tuple[Any, ...]) -> CredentialRow:
    r = list(row)
    r[4] = cbor2.loads(r[4])
    return CredentialRow(*r)


@dataclass(slots=True)
class MountRow:
    id: int
    pid: int
    mountpoint: str
    started_ns: int
    seen_seq: int
    credential: str | None = None


@dataclass(slots=True)
class EventRow:
    seq: int
    time_ns: int
    type: str
    sandbox: str | None
    payload: dict[str, Any]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (registrations of dead daemons are stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# Every mutable column of a row, as update_inode and the deferred write-back write them.
_UPDATE_INODE = (
    "UPDATE inodes SET mode = ?, uid = ?, gid = ?, nlink = ?, size = ?, rdev = ?, "
    "atime_ns = ?, mtime_ns = ?, ctime_ns = ?, namespace_id = ?, sha256 = ? WHERE id = ?"
)
# The same and `stored`, which only the deferred write-back and update_file_state write.
_SETTLE_INODE = (
    "UPDATE inodes SET mode = ?, uid = ?, gid = ?, nlink = ?, size = ?, rdev = ?, "
    "atime_ns = ?, mtime_ns = ?, ctime_ns = ?, namespace_id = ?, sha256 = ?, stored = ? "
    "WHERE id = ?"
)


_PUT_BLOCK = "INSERT OR REPLACE INTO blocks (inode, idx, digest) VALUES (?, ?, ?)"
_ADD_BLOB = (
    "INSERT OR IGNORE INTO blobs (digest, size, created_ns, uploaded) VALUES (?, ?, ?, ?)"
)

# What the change feed records (kind 0: name in directory, kind 1: inode), per table event.
_FEED_EVENTS = (
    ("dentry_insert", "AFTER INSERT ON main.dentries", ["0, NEW.parent, NEW.name"]),
    ("dentry_delete", "AFTER DELETE ON main.dentries", ["0, OLD.parent, OLD.name"]),
    (
        "dentry_update",
        "AFTER UPDATE ON main.dentries",
        ["0, OLD.parent, OLD.name", "0, NEW.parent, NEW.name"],
    ),
    ("inode_update", "AFTER UPDATE ON main.inodes", ["1, NEW.id, NULL"]),
    ("xattr_insert", "AFTER INSERT ON main.xattrs", ["1, NEW.inode, NULL"]),
    ("xattr_delete", "AFTER DELETE ON main.xattrs", ["1, OLD.inode, NULL"]),
)

# First words of the statements a redo log records (every other one only reads, or is
# transaction control).
_CHANGES = frozenset({"INSERT", "UPDATE", "DELETE"})


class IndexConnection(sqlite3.Connection):
    """The Index's own connection. Rows whose write-back `Index.defer_inode` put off reach
    the table before any statement that names `inodes` runs, so no statement (a join in a
    listing, a trigger, fsck's checks) ever sees the table older than the row cache.

    While a unit runs (`undo` is a dict), the first change of each deferred row records
    how it was before the unit: (cached row, deferred row), for `Index.txn` to put back if
    the unit rolls back (its SAVEPOINT undoes what the table got, not what was deferred).

    `xattr_free` holds inodes known to have no extended attributes (made by this connection
    since the row cache was last dropped; served under the same rule as the row cache). Any
    statement that may add an attribute empties it, so it can never claim a wrong absence.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferred: dict[int, tuple[Any, ...]] = {}  # inode -> its row as it must be
        self.undo: dict[int, tuple[tuple[Any, ...] | None, tuple[Any, ...] | None]] | None
        self.undo = None
        self.xattr_free: set[int] = set()
        # With a redo log (index/redo.py): every statement of the open transaction that
        # changes the database, in order, for `Index.persist` to append.
        self.redo: list[Statement] | None = None

    def _before(self, sql: str) -> None:
        if self.deferred and "inodes" in sql:
            self.settle()
        if self.xattr_free and "xattrs" in sql and not sql.startswith(("SELECT", "DELETE")):
            self.xattr_free.clear()

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self._before(sql)
        if self.redo is not None and sql[:6] in _CHANGES:
            self.redo.append((False, sql, parameters))
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        self._before(sql)
        if self.redo is not None and sql[:6] in _CHANGES:
            parameters = list(parameters)  # may be a generator: kept, then run
            self.redo.append((True, sql, parameters))
        return super().executemany(sql, parameters)

    def run(self, statements: Iterable[Statement]) -> None:
        """Run recorded statements again, in order (a redo log's replay)."""
        for many, sql, params in statements:
            if many:
                self.executemany(sql, params)
            else:
                self.execute(sql, params)

    def settle(self) -> None:
        """Write every deferred row (one statement for all of them)."""
        rows = self.deferred
        if not rows:
            return
        params = [
            (r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[12], r[13], r[14], r[0])
            for r in rows.values()
        ]
        if self.redo is not None:
            self.redo.append((True, _SETTLE_INODE, params))
        super().executemany(_SETTLE_INODE, params)
        if self.undo is not None:
            for ino, row in rows.items():
                self.undo.setdefault(ino, (row, row))
        self.deferred = {}


def _in_groups(digests: list[bytes], size: int = 500) -> Iterator[tuple[list[bytes], str]]:
    """`digests` in groups of `size`, each with its `?, ?, ...` for an `IN (...)` (one
    statement per group instead of one per digest, well under SQLite's variable limit)."""
    for i in range(0, len(digests), size):
        part = digests[i : i + size]
        yield part, ", ".join("?" * len(part))


def _inode(row: tuple[Any, ...]) -> InodeRow:
    return InodeRow(*row)


_I_COLUMNS = ", ".join("i." + c.strip() for c in INODE_COLUMNS.split(","))
CHECKPOINT_COLUMNS = (
    "id, namespace_id, name, root, created_ns, creator, files, bytes, manifest_bytes"
)


def _checkpoint(row: tuple[Any, ...]) -> CheckpointRow:
    r = list(row)
    r[3] = bytes(r[3])
    return CheckpointRow(*r)


class _Unit:
    """`Index.txn()`'s context manager. A class and not @contextmanager: every request runs
    one unit or more, and entering and leaving a generator-based manager took 1.5 us here
    against 0.4 us for this."""

    __slots__ = ("_index",)

    def __init__(self, index: Index) -> None:
        self._index = index

    def __enter__(self) -> sqlite3.Connection:
        return self._index._enter_unit()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._index._exit_unit(kind is not None)


class Index:
    """The metadata index of one store."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        if not create and not path.exists():
            raise FileNotFoundError(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see txn()).
        self.conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=IndexConnection
        )
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit survives a crash of the process; fsync() asks for FULL (durable()).
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = OFF")
        self.conn.execute("PRAGMA cache_size = -65536")
        self.conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
        self._depth = 0
        self._unit = _Unit(self)
        self._unit_grouped = False  # the open unit is a SAVEPOINT of a group transaction
        self._unit_mark: int | None = None  # its start in conn.redo
        # Row cache of `inodes`: id -> the row exactly as in the database. Served only inside
        # a write transaction of this connection (nobody else can write then), kept across
        # our own commits, and dropped at every BEGIN after which `PRAGMA data_version` says
        # another connection (a CLI restore or checkpoint, another daemon) committed, and at
        # every rollback. Every statement here that writes `inodes` updates or drops the
        # entries it touches; tests compare the cache with the table (row_cache_mismatches).
        self._rows: dict[int, tuple[Any, ...]] = {}
        self._rows_version: int | None = None
        self._writing = False  # this connection holds a write transaction begun by _begin
        self.group_commit = False
        self._grouped = 0
        self._ckpt_conn: sqlite3.Connection | None = None
        self.wal_reset_bytes = WAL_RESET_BYTES
        self._page_size = 4096  # read when the checkpoint connection opens
        # Set by checkpoint() (a worker thread), taken by flush() (the trio thread).
        self._wal_reset_due = False
        # The redo log (index/redo.py): ours, if enable_redo() was called; the epoch the open
        # transaction started from; how many of conn.redo's statements are in our log; the
        # logs of dead daemons replayed in the open transaction; whether its commit must move
        # the epoch.
        self._redo_dir = redo.redo_dir(path)
        self._redo: redo.RedoLog | None = None
        self._epoch = 0
        self._logged = 0
        self._replayed: list[redo.DeadLog] = []
        self._bump = False
        self.start_version = migrate(self.conn)
        found = redo.dead_logs(self._redo_dir, None)
        if found:
            # A daemon died with closes only in its log: apply them before anyone reads.
            for d in found:
                d.release()
            self._begin()
            self._commit()
        self._catch_up()

    def close(self) -> None:
        self.flush()
        if self._redo is not None:
            self._redo.close()
            self._redo = None
            self.conn.redo = None
        if self._ckpt_conn is not None:
            self._ckpt_conn.close()
        self.conn.close()

    def _catch_up(self, timeout: float = 5.0) -> None:
        """Wait (50 ms at most, normally) until live daemons have committed what their redo
        logs hold, so this connection reads everything that was closed before it opened (a
        CLI checkpoint right after a write). A commit of such a log moves the epoch or
        empties the log; no lock is taken, so a busy daemon cannot starve us."""
        live = redo.live_unsynced(self._redo_dir, self._redo)
        if not live:
            return
        epoch = self.get_meta("redo_epoch")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.002)
            if self.get_meta("redo_epoch") != epoch:
                return
            if not any(map(redo.unsynced_bytes, live)):
                return
        log.warning("a mount has not committed for %.0f s: reading without its last closes",
                    timeout)

    def apply_dead_logs(self) -> bool:
        """Apply (and commit) what daemons that died left in their redo logs, if any; True
        if there were some. Otherwise that happens at this connection's next BEGIN, which
        a mount that only reads may not make for a long time."""
        if not redo.any_dead(self._redo_dir, self._redo):
            return False
        self.flush()  # the group transaction, if one is open: the next BEGIN replays
        with self.txn():
            pass
        self.flush()
        return True

    def enable_redo(self) -> None:
        """Closes append to a redo log instead of committing (the daemon; index/redo.py)."""
        assert self.group_commit, "a redo log needs group commit"
        self.flush()
        self._redo = redo.RedoLog(self._redo_dir)
        self.conn.redo = []

    # ---- WAL checkpoints ----------------------------------------------------------------------

    def defer_checkpoints(self) -> None:
        """Stop SQLite from checkpointing inside commits on this connection.

        An automatic checkpoint runs in whichever commit crosses the WAL threshold and fsyncs
        the database and the WAL: tens of milliseconds on the trio thread. The daemon turns it
        off and calls `checkpoint()` from a worker thread instead.
        """
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames into the database (PASSIVE: never waits for writers).

        Runs on its own connection so it can run in a worker thread while the trio thread
        goes on using the main one. Returns (WAL frames, frames checkpointed).

        SQLite starts the WAL again from its beginning only when a write transaction begins
        while every frame is checkpointed. Under group commit the next transaction begins
        right after each commit, before a worker can checkpoint that commit's frames, so
        during a long burst of writes the WAL would only grow. Once it is past
        `wal_reset_bytes` and caught up, the next `flush()` checkpoints the few frames
        committed since, itself, between its commit and the next begin.
        """
        if self._ckpt_conn is None:
            self._ckpt_conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            self._ckpt_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._page_size = int(self._ckpt_conn.execute("PRAGMA page_size").fetchone()[0])
        _, frames, done = self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames == done and frames * self._page_size >= self.wal_reset_bytes:
            # Again at once, so that flush() is left only what commits during this one.
            self._ckpt_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._wal_reset_due = True
        return int(frames), int(done)

    def _reset_wal(self) -> None:
        """Right after a commit (no transaction open): checkpoint the rest of the WAL, so that
        the next write transaction starts it again from the beginning."""
        self._wal_reset_due = False
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the worker's next checkpoint asks again
            log.debug("WAL checkpoint after a commit failed: %s", exc)

    # ---- transactions -------------------------------------------------------------------------

    def txn(self) -> _Unit:
        """One atomic unit of work; nested uses join the outer one; rolled back on exception.

        Without group commit each unit is its own transaction. With group commit (the daemon)
        a unit is a SAVEPOINT inside a longer write transaction that `flush()` commits: on
        every close/fsync of a file and at least every `GROUP_COMMIT_INTERVAL` seconds, so a
        burst of metadata operations (tar, rm -r) pays one commit instead of one each.

        Callers must not await inside a unit (tests/test_layering.py checks): another task's
        unit would otherwise join it as a nested one. That is also why one `_Unit` object
        serves them all.
        """
        return self._unit

    def _enter_unit(self) -> sqlite3.Connection:
        conn = self.conn
        if self._depth:
            self._depth += 1
            return conn
        self._unit_grouped = self.group_commit
        if self._unit_grouped:
            if not conn.in_transaction:
                self._begin()
            conn.execute("SAVEPOINT unit")
            conn.undo = {}
            self._unit_mark = None if conn.redo is None else len(conn.redo)
        else:
            self._begin()
        self._depth = 1
        return conn

    def _exit_unit(self, failed: bool) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        self._depth = 0
        conn = self.conn
        if not self._unit_grouped:
            if failed:
                self._drop_rows()
                self._writing = False
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._release_replayed()
            else:
                self._commit()
            return
        undo, conn.undo = conn.undo, None
        if not failed:
            conn.execute("RELEASE unit")
            self._grouped += 1
            if self._grouped >= GROUP_COMMIT_MAX_UNITS:
                self.flush()
        elif conn.in_transaction:
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
            mark = self._unit_mark
            if conn.redo is not None and mark is not None:
                del conn.redo[mark:]
            # Deferred rows as they were before the unit; the cache keeps only them
            # (anything else it holds may show what the savepoint just undid).
            for ino, (_, before) in (undo or {}).items():
                if before is None:
                    conn.deferred.pop(ino, None)
                else:
                    conn.deferred[ino] = before
            self._rows.clear()
            self._rows.update(conn.deferred)
            conn.xattr_free.clear()
        else:  # the whole group transaction is gone (SQLite rolled it back)
            self._drop_rows()
            self._writing = False
            self._group_lost()

    @contextmanager
    def read_txn(self) -> Iterator[None]:
        """A consistent read-only snapshot for the duration of the block (for a second
        connection that builds a checkpoint while the daemon keeps writing)."""
        self.conn.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self.conn.execute("ROLLBACK")

    def flush(self) -> None:
        """Commit the group transaction, if one is open (a no-op without group commit)."""
        if self._depth == 0 and self.conn.in_transaction:
            self.conn.settle()
            self._commit()
            if self._wal_reset_due:
                self._reset_wal()
        self._grouped = 0

    def persist(self) -> None:
        """Make everything done so far survive a crash of this process (a close): append the
        statements run since the last append to the redo log, with one write; without a log,
        or if it cannot be written (a full disk), commit."""
        conn = self.conn
        if self._redo is None or conn.redo is None:
            self.flush()
            return
        if self._depth or not conn.in_transaction:
            return
        conn.settle()
        if len(conn.redo) > self._logged:
            try:
                self._redo.append(self._epoch, conn.redo[self._logged :])
            except OSError as exc:
                log.warning("redo log not written (%s): committing instead", exc)
                self.flush()
                return
            self._logged = len(conn.redo)

    def _begin(self) -> bool:
        """BEGIN IMMEDIATE; replay the redo logs of dead daemons. True if another connection
        committed since our previous BEGIN."""
        # IMMEDIATE takes the write lock up front, so a transaction never fails half-way with
        # SQLITE_BUSY on upgrade; busy_timeout covers the wait, and we retry past it.
        for attempt in range(50):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(min(0.01 * (attempt + 1), 0.2))
        else:
            self.conn.execute("BEGIN IMMEDIATE")
        # We hold the write lock now: the cache is valid for the whole transaction if no other
        # connection committed since the last BEGIN (data_version ignores our own commits).
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        others = bool(version != self._rows_version)
        if others:
            assert not self.conn.deferred, "rows deferred outside a write transaction"
            self._rows.clear()
            self.conn.xattr_free.clear()
            self._rows_version = version
            epoch = self.get_meta("redo_epoch")
            self._epoch = 0 if epoch is None else int(epoch)
        self._writing = True
        if self._replay_dead():
            # Committed at once, in a transaction of its own: what it applied is then in no
            # log any more. (Kept open, it would also go into our own log, and a crash of
            # ours would leave it in two logs, to be applied twice.)
            self._commit()
            return self._begin() or others
        return others

    def _replay_dead(self) -> bool:
        """Run again, in this transaction, what dead daemons appended to their redo logs
        under the epoch the database still has (index/redo.py); delete stale logs. True if
        anything was applied."""
        applied = False
        for dead in redo.dead_logs(self._redo_dir, self._redo):
            try:
                batches = dead.records(self._epoch)
            except (OSError, ValueError) as exc:
                log.error("redo log %s is unreadable (%s): set aside", dead.path, exc)
                self._set_aside(dead)
                continue
            if not batches:
                dead.remove()  # committed before its owner died
                continue
            mark = None if self.conn.redo is None else len(self.conn.redo)
            # What the dead process changed goes into the change feed as nobody's (origin
            # NULL), whoever applies it: every mount may have the old names, attributes and
            # pages in its kernel cache, this process's own included (its follower skips only
            # rows tagged with its own origin).
            self._feed_triggers("replay", "NULL", "1")
            try:
                self.conn.execute("SAVEPOINT replay")
                try:
                    for statements in batches:
                        self.conn.run(statements)
                except sqlite3.Error as exc:
                    self.conn.execute("ROLLBACK TO replay")
                    self.conn.execute("RELEASE replay")
                    if self.conn.redo is not None:
                        del self.conn.redo[mark:]
                    log.error("redo log %s does not apply (%s): set aside", dead.path, exc)
                    self._set_aside(dead)
                    continue
                self.conn.execute("RELEASE replay")
            finally:
                self._drop_feed_triggers("replay")
            n = sum(len(b) for b in batches)
            log.warning("applied %d statements a crashed daemon left in %s", n, dead.path.name)
            self._replayed.append(dead)
            self._bump = True
            self._rows.clear()
            self.conn.xattr_free.clear()
            applied = True
        return applied

    @staticmethod
    def _set_aside(dead: redo.DeadLog) -> None:
        try:
            os.replace(dead.path, dead.path.with_suffix(".failed"))
        finally:
            dead.release()

    def _release_replayed(self) -> None:
        """Our transaction rolled back: the logs it replayed are for the next one."""
        for dead in self._replayed:
            dead.release()
        self._replayed = []
        self._bump = False

    def _new_epoch(self) -> int | None:
        """Inside the transaction about to commit: a new epoch, if its commit makes records
        of the current one stale (ours, or a dead daemon's it replayed)."""
        if not (self._logged or self._bump):
            return None
        epoch = redo.new_epoch()
        # Not recorded: it is what tells a record's replay it is stale.
        sqlite3.Connection.execute(
            self.conn,
            "INSERT INTO meta (key, value) VALUES ('redo_epoch', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(epoch),),
        )
        return epoch

    def _committed(self, epoch: int | None) -> None:
        self._writing = False
        if epoch is not None:
            self._epoch = epoch
        if self.conn.redo is not None:
            self.conn.redo = []
        self._logged = 0
        if self._redo is not None:
            self._redo.reset()
        for dead in self._replayed:
            dead.remove()
        self._replayed = []
        self._bump = False

    def _group_lost(self) -> None:
        """SQLite rolled back the whole group transaction. What our log holds of it was
        promised to survive: run it again in a new transaction (the log already has it),
        unless another connection committed in between (then it no longer applies)."""
        self._release_replayed()
        conn = self.conn
        if conn.redo is None:
            return
        logged, conn.redo, self._logged = conn.redo[: self._logged], [], 0
        if not logged:
            return
        try:
            if self._begin():
                log.error("lost %d closed changes: the index rolled back and another "
                          "process wrote to it before they could be applied again", len(logged))
                assert self._redo is not None
                self._redo.reset()
                return
            conn.run(logged)
            self._logged = len(conn.redo)
        except sqlite3.Error:
            log.exception("cannot apply closed changes again after a rollback of the index")

    def _commit(self) -> None:
        epoch = self._new_epoch()
        for attempt in range(50):
            try:
                self.conn.execute("COMMIT")
                self._committed(epoch)
                return
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    time.sleep(min(0.01 * (attempt + 1), 0.2))
                    continue
                self._rollback_after_failed_commit()
                raise
            except sqlite3.Error:
                self._rollback_after_failed_commit()
                raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback_after_failed_commit()
            raise
        self._committed(epoch)

    def _rollback_after_failed_commit(self) -> None:
        # A failed COMMIT (constraint, disk full, I/O error) may leave the transaction open;
        # without this every later operation would fail until the daemon restarts.
        self._drop_rows()
        self._writing = False
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self._group_lost()

    def make_durable(self) -> None:
        """Commit and force everything to stable storage (fsync of the WAL)."""
        self.flush()
        self.conn.execute("PRAGMA synchronous = FULL")
        try:
            # An empty write transaction under FULL syncs the WAL up to and including it.
            self._begin()
            self.conn.execute("UPDATE meta SET value = value WHERE key = 'store_id'")
            self._commit()
        finally:
            if self.conn.in_transaction:
                self._drop_rows()
                self._writing = False
                self.conn.execute("ROLLBACK")
                self._release_replayed()
            self.conn.execute("PRAGMA synchronous = NORMAL")

    # ---- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---- inodes -------------------------------------------------------------------------------

    # ---- the row cache (see __init__) --------------------------------------------------------

    def _drop_rows(self) -> None:
        """Forget every cached row, deferred ones too: the transaction they belong to is gone
        (rolled back), or none is open (rows are deferred only inside one)."""
        self._rows.clear()
        self.conn.deferred = {}
        self.conn.xattr_free.clear()

    def _keep_row(self, row: tuple[Any, ...]) -> None:
        """Remember a row just read from the table. Rows read outside a transaction are as
        new as the last data_version check or newer, so the next BEGIN validates them too;
        a read-only snapshot (read_txn) may be older: not kept."""
        if self._writing or not self.conn.in_transaction:
            if len(self._rows) >= ROW_CACHE_MAX:
                self.conn.settle()
                self._rows.clear()
                self.conn.xattr_free.clear()
            self._rows[row[0]] = row

    def _patch_row(self, ino: int, changes: dict[int, Any]) -> None:
        """Apply to the cached row of `ino` (if any) what a statement just wrote."""
        cur = self._rows.get(ino)
        if cur is not None:
            new = list(cur)
            for i, v in changes.items():
                new[i] = v
            self._rows[ino] = tuple(new)

    def row_cache_mismatches(self) -> list[tuple[tuple[Any, ...], tuple[Any, ...] | None]]:
        """(cached row, table row) for every cached row that differs from the table (tests)."""
        out = []
        for ino, cached in self._rows.items():
            row = self.conn.execute(
                f"SELECT {INODE_COLUMNS} FROM inodes WHERE id = ?", (ino,)
            ).fetchone()
            if row is None or tuple(row) != cached:
                out.append((cached, None if row is None else tuple(row)))
        return out

    def get_inode(self, ino: int) -> InodeRow | None:
        if self._writing:
            cached = self._rows.get(ino)
            if cached is not None:
                return InodeRow(*cached)
        row = self.conn.execute(
            f"SELECT {INODE_COLUMNS} FROM inodes WHERE id = ?", (ino,)
        ).fetchone()
        if row is None:
            return None
        self._keep_row(row)
        return _inode(row)

    def insert_inode(
        self,
        *,
        kind: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        time_ns: int,
        namespace_id: int | None,
        size: int = 0,
        rdev: int = 0,
        ino: int | None = None,
        sha256: bytes | None = None,
    ) -> InodeRow:
        # In column order after `id`: the same values make the row and the returned object.
        t = time_ns
        kind = int(kind)  # a NodeKind: a plain int for the redo log's marshal
        values = (kind, mode, uid, gid, nlink, size, rdev, t, t, t, t, namespace_id, sha256)
        cur = self.conn.execute(
            "INSERT INTO inodes (id, kind, mode, uid, gid, nlink, size, rdev, atime_ns, "
            "mtime_ns, ctime_ns, btime_ns, namespace_id, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ino, *values),
        )
        new_id = ino if ino is not None else cur.lastrowid
        assert new_id is not None
        self._keep_row((new_id, *values, 0))
        if self._writing:
            self.conn.xattr_free.add(new_id)
        return InodeRow(new_id, *values)

    def defer_inode(self, row: InodeRow) -> None:
        """`update_inode(row)` as a unit of its own, written back later under group commit.

        The row cache takes the new row at once (every read of this connection sees it) and
        the table gets it before the next unit, the next commit, or any statement naming
        `inodes` (IndexConnection), whichever comes first. tar's chown, chmod and utimes of
        one file then cost one UPDATE at its close instead of three units of three statements
        each. Durability is that of a unit: committed with the group transaction.
        """
        if not self._defer(
            row.id,
            {2: row.mode, 3: row.uid, 4: row.gid, 5: row.nlink, 6: row.size, 7: row.rdev,
             8: row.atime_ns, 9: row.mtime_ns, 10: row.ctime_ns, 12: row.namespace_id,
             13: row.sha256},
        ):
            with self.txn():
                self.update_inode(row)

    def _defer(self, ino: int, changes: dict[int, Any]) -> bool:
        """Apply `changes` (column index -> value) to the cached row of `ino` and defer its
        write-back; False (nothing done) where that is not possible: without group commit,
        or when the row is not cached (the caller then writes it now)."""
        if not self.group_commit:
            return False
        conn = self.conn
        if not conn.in_transaction:
            self._begin()  # rows are served from the cache, and deferred, only while writing
        cur = self._rows.get(ino)
        if cur is None or not self._writing:
            return False
        new = list(cur)
        for i, v in changes.items():
            new[i] = v
        row = tuple(new)
        if conn.undo is not None:
            conn.undo.setdefault(ino, (cur, conn.deferred.get(ino)))
        self._rows[ino] = row
        conn.deferred[ino] = row
        return True

    def update_inode(self, row: InodeRow) -> None:
        """Write back every mutable column of `row`."""
        self.conn.execute(
            _UPDATE_INODE,
            (
                row.mode,
                row.uid,
                row.gid,
                row.nlink,
                row.size,
                row.rdev,
                row.atime_ns,
                row.mtime_ns,
                row.ctime_ns,
                row.namespace_id,
                row.sha256,
                row.id,
            ),
        )
        cur = self._rows.get(row.id)
        if cur is not None:
            self._rows[row.id] = (
                cur[0], cur[1], row.mode, row.uid, row.gid, row.nlink, row.size, row.rdev,
                row.atime_ns, row.mtime_ns, row.ctime_ns, cur[11], row.namespace_id, row.sha256,
                cur[14],
            )

    def update_file_state(
        self,
        ino: int,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        sha256: bytes | None,
        stored: int,
    ) -> None:
        # Deferred (see defer_inode): a close's new size joins the owner, mode and times its
        # file got since the last write-back in one UPDATE.
        if self._defer(ino, {6: size, 9: mtime_ns, 10: ctime_ns, 13: sha256, 14: stored}):
            return
        self.conn.execute(
            "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ?, sha256 = ?, stored = ? "
            "WHERE id = ?",
            (size, mtime_ns, ctime_ns, sha256, stored, ino),
        )
        self._patch_row(ino, {6: size, 9: mtime_ns, 10: ctime_ns, 13: sha256, 14: stored})

    def set_sha256(self, ino: int, sha256: bytes) -> None:
        self.conn.execute("UPDATE inodes SET sha256 = ? WHERE id = ?", (sha256, ino))
        self._patch_row(ino, {13: sha256})

    def set_sha256_if_unchanged(self, ino: int, sha256: bytes, size: int, mtime_ns: int) -> None:
        """Keep a digest computed from a snapshot, unless the file changed since."""
        self.conn.execute(
            "UPDATE inodes SET sha256 = ? WHERE id = ? AND sha256 IS NULL AND size = ? "
            "AND mtime_ns = ?",
            (sha256, ino, size, mtime_ns),
        )
        self._rows.pop(ino, None)

    def block_stats(self, ino: int) -> tuple[int, int]:
        """(number of non-hole blocks of `ino`, highest block index or -1) for st_blocks."""
        n, top = self.conn.execute(
            "SELECT count(*), coalesce(max(idx), -1) FROM blocks WHERE inode = ?", (ino,)
        ).fetchone()
        return int(n), int(top)

    def touch_inode(self, ino: int, *, mtime_ns: int | None, ctime_ns: int) -> None:
        changes = {10: ctime_ns} if mtime_ns is None else {9: mtime_ns, 10: ctime_ns}
        if self._defer(ino, changes):  # a directory's times: once per burst of creates
            return
        if mtime_ns is None:
            self.conn.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (ctime_ns, ino))
        else:
            self.conn.execute(
                "UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE id = ?",
                (mtime_ns, ctime_ns, ino),
            )
        self._patch_row(ino, changes)

    def add_nlink(self, ino: int, delta: int, ctime_ns: int | None = None) -> None:
        cur = self._rows.get(ino)
        changes: dict[int, Any] = {}
        if cur is not None:
            changes[5] = cur[5] + delta
            if ctime_ns is not None:
                changes[10] = ctime_ns
            if self._defer(ino, changes):
                return
        if ctime_ns is None:
            self.conn.execute("UPDATE inodes SET nlink = nlink + ? WHERE id = ?", (delta, ino))
        else:
            self.conn.execute(
                "UPDATE inodes SET nlink = nlink + ?, ctime_ns = ? WHERE id = ?",
                (delta, ctime_ns, ino),
            )
        # Patches the row only if it is still cached (a BEGIN in _defer may have dropped it).
        self._patch_row(ino, changes)

    def delete_inode(self, ino: int) -> None:
        """Remove an inode and everything hanging off it (blocks, symlink, xattrs)."""
        self.conn.execute("DELETE FROM blocks WHERE inode = ?", (ino,))
        self.conn.execute("DELETE FROM symlinks WHERE inode = ?", (ino,))
        self.conn.execute("DELETE FROM xattrs WHERE inode = ?", (ino,))
        self.conn.execute("DELETE FROM inodes WHERE id = ?", (ino,))
        self._rows.pop(ino, None)

    def unlinked_inodes(self) -> list[int]:
        """Inodes with no names left (open-unlinked files of a previous run)."""
        return [r[0] for r in self.conn.execute("SELECT id FROM inodes WHERE nlink = 0")]

    def count_inodes(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM inodes").fetchone()[0])

    # ---- directory entries --------------------------------------------------------------------

    def lookup_child(self, parent: int, name: bytes) -> int | None:
        row = self.conn.execute(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return None if row is None else int(row[0])

    def lookup_child_inode(self, parent: int, name: bytes) -> InodeRow | None:
        # The name, then the row through the row cache: cheaper than a join when the row is
        # cached, and a miss (tar and cp probe every name they create) is one index probe.
        ino = self.lookup_child(parent, name)
        return None if ino is None else self.get_inode(ino)

    def list_children(
        self, parent: int, after: int = 0, limit: int = 1000
    ) -> list[tuple[int, bytes, InodeRow]]:
        """(dentry id, name, inode) of `parent`'s children with dentry id > `after`."""
        rows = self.conn.execute(
            f"SELECT d.id, d.name, {_I_COLUMNS} "
            "FROM dentries d JOIN inodes i ON i.id = d.inode "
            "WHERE d.parent = ? AND d.id > ? ORDER BY d.id LIMIT ?",
            (parent, after, limit),
        ).fetchall()
        return [(r[0], bytes(r[1]), _inode(r[2:])) for r in rows]

    def has_children(self, parent: int) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (parent,)
            ).fetchone()
            is not None
        )

    def add_dentry(self, parent: int, name: bytes, ino: int) -> None:
        self.conn.execute(
            "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
        )

    def add_new_dentry(self, parent: int, name: bytes, ino: int) -> bool:
        """Name `ino` in `parent` unless the name is taken (False): one statement where a
        look-up first would take two."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO dentries (parent, name, inode) VALUES (?, ?, ?)",
            (parent, name, ino),
        )
        return cur.rowcount == 1

    def remove_dentry(self, parent: int, name: bytes) -> None:
        self.conn.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))

    def move_dentry(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        self.conn.execute(
            "UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
            (new_parent, new_name, parent, name),
        )

    def set_dentry_inode(self, parent: int, name: bytes, ino: int) -> None:
        self.conn.execute(
            "UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?", (ino, parent, name)
        )

    def parent_of(self, ino: int) -> tuple[int, bytes] | None:
        """One (parent, name) of `ino` (the only one for a directory)."""
        row = self.conn.execute(
            "SELECT parent, name FROM dentries WHERE inode = ? LIMIT 1", (ino,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def count_dentries(self, ino: int) -> int:
        return int(
            self.conn.execute("SELECT count(*) FROM dentries WHERE inode = ?", (ino,)).fetchone()[0]
        )

    # ---- grid: sandboxes, scopes, namespaces --------------------------------------------------

    def insert_sandbox(self, name: str, ino: int, created_ns: int) -> int:
        cur = self.conn.execute(
            "INSERT INTO sandboxes (name, inode, created_ns) VALUES (?, ?, ?)",
            (name, ino, created_ns),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def sandbox_by_inode(self, ino: int) -> SandboxRow | None:
        row = self.conn.execute(
            "SELECT id, name, inode, created_ns FROM sandboxes WHERE inode = ?", (ino,)
        ).fetchone()
        return None if row is None else SandboxRow(*row)

    def sandbox_by_id(self, sandbox_id: int) -> SandboxRow | None:
        row = self.conn.execute(
            "SELECT id, name, inode, created_ns FROM sandboxes WHERE id = ?", (sandbox_id,)
        ).fetchone()
        return None if row is None else SandboxRow(*row)

    def rename_sandbox(self, sandbox_id: int, name: str) -> None:
        self.conn.execute("UPDATE sandboxes SET name = ? WHERE id = ?", (name, sandbox_id))

    def delete_sandbox(self, sandbox_id: int) -> None:
        self.conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def insert_scope(
        self, sandbox_id: int, kind: str, owner: str, name: str, ino: int, created_ns: int
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO scopes (sandbox_id, kind, owner, name, inode, created_ns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (sandbox_id, kind, owner, name, ino, created_ns),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def scope_by_inode(self, ino: int) -> ScopeRow | None:
        row = self.conn.execute(
            "SELECT id, sandbox_id, kind, owner, name, inode, created_ns, expires_ns "
            "FROM scopes WHERE inode = ?",
            (ino,),
        ).fetchone()
        return None if row is None else ScopeRow(*row)

    def scope_by_id(self, scope_id: int) -> ScopeRow | None:
        row = self.conn.execute(
            "SELECT id, sandbox_id, kind, owner, name, inode, created_ns, expires_ns "
            "FROM scopes WHERE id = ?",
            (scope_id,),
        ).fetchone()
        return None if row is None else ScopeRow(*row)

    def delete_scope(self, scope_id: int) -> None:
        self.conn.execute("DELETE FROM scopes WHERE id = ?", (scope_id,))

    def insert_namespace(
        self,
        public_id: str,
        scope_id: int,
        kind: str,
        owner: str,
        name: str,
        root_inode: int,
        created_ns: int,
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO namespaces (public_id, scope_id, kind, owner, name, root_inode, "
            "created_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (public_id, scope_id, kind, owner, name, root_inode, created_ns),
        )
        assert cur.lastrowid is not None
        self.conn.execute(
            "UPDATE inodes SET namespace_id = ? WHERE id = ?", (cur.lastrowid, root_inode)
        )
        self._rows.pop(root_inode, None)
        return cur.lastrowid

    def namespace_by_id(self, namespace_id: int) -> NamespaceRow | None:
        row = self.conn.execute(
            "SELECT id, public_id, scope_id, kind, owner, name, root_inode, created_ns "
            "FROM namespaces WHERE id = ?",
            (namespace_id,),
        ).fetchone()
        return None if row is None else NamespaceRow(*row)

    def namespace_by_root(self, ino: int) -> NamespaceRow | None:
        row = self.conn.execute(
            "SELECT id, public_id, scope_id, kind, owner, name, root_inode, created_ns "
            "FROM namespaces WHERE root_inode = ?",
            (ino,),
        ).fetchone()
        return None if row is None else NamespaceRow(*row)

    def set_namespace_root(self, namespace_id: int, ino: int) -> None:
        """Point a namespace at a new root inode (a restored blob)."""
        self.conn.execute(
            "UPDATE namespaces SET root_inode = ? WHERE id = ?", (ino, namespace_id)
        )
        self.conn.execute("UPDATE inodes SET namespace_id = ? WHERE id = ?", (namespace_id, ino))
        self._rows.pop(ino, None)

    def rename_namespace(self, namespace_id: int, name: str) -> None:
        self.conn.execute("UPDATE namespaces SET name = ? WHERE id = ?", (name, namespace_id))

    def delete_namespace(self, namespace_id: int) -> None:
        self.conn.execute("DELETE FROM namespaces WHERE id = ?", (namespace_id,))

    def count_namespaces(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM namespaces").fetchone()[0])

    # ---- block maps and blobs -----------------------------------------------------------------

    def block_map(self, ino: int) -> dict[int, bytes]:
        return {
            int(idx): bytes(d)
            for idx, d in self.conn.execute(
                "SELECT idx, digest FROM blocks WHERE inode = ?", (ino,)
            )
        }

    def set_blocks(self, ino: int, blocks: Iterable[tuple[int, bytes | None]]) -> None:
        """Point block `idx` of `ino` at `digest`, or make it a hole when digest is None."""
        for idx, digest in blocks:
            if digest is None:
                self.conn.execute("DELETE FROM blocks WHERE inode = ? AND idx = ?", (ino, idx))
            else:
                self.conn.execute(_PUT_BLOCK, (ino, idx, digest))

    def commit_blocks(
        self,
        ino: int,
        staged: dict[int, tuple[bytes, int] | None],
        time_ns: int,
    ) -> None:
        """A commit's new block map entries of `ino` (None: a hole), with the blobs they
        use.

        One close of a small file writes one entry: single statements then, which cost
        less than executemany with its iterator."""
        conn = self.conn
        if len(staged) == 1:
            ((idx, v),) = staged.items()
            if v is None:  # a hole
                self.set_blocks(ino, ((idx, None),))
                return
            digest, size = v
            conn.execute(_PUT_BLOCK, (ino, idx, digest))
            conn.execute(_ADD_BLOB, (digest, size, time_ns, self._uploaded))
            return
        self.set_blocks(ino, ((i, None if v is None else v[0]) for i, v in staged.items()))
        self.record_blobs((v for v in staged.values() if v is not None), time_ns)

    def drop_blocks_from(self, ino: int, first_idx: int) -> None:
        self.conn.execute("DELETE FROM blocks WHERE inode = ? AND idx >= ?", (ino, first_idx))

    def copy_blocks(self, src: int, dst: int) -> None:
        self.conn.execute(
            "INSERT INTO blocks (inode, idx, digest) SELECT ?, idx, digest FROM blocks "
            "WHERE inode = ?",
            (dst, src),
        )

    @property
    def _uploaded(self) -> int:
        # A remote store's new blobs are only in the local cache: uploaded = 0 queues them.
        return 0 if self.remote else 1

    def record_blobs(self, blobs: Iterable[tuple[bytes, int]], time_ns: int) -> None:
        up = self._uploaded
        self.conn.executemany(_ADD_BLOB, ((d, s, time_ns, up) for d, s in blobs))

    def known_blob(self, digest: bytes) -> bool:
        return (
            self.conn.execute("SELECT 1 FROM blobs WHERE digest = ?", (digest,)).fetchone()
            is not None
        )

    def stored_bytes(self) -> tuple[int, int]:
        """(number of blobs, their total size)."""
        n, total = self.conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
        ).fetchone()
        return int(n), int(total)

    def count_block_refs(self, digest: bytes) -> int:
        return int(
            self.conn.execute("SELECT count(*) FROM blocks WHERE digest = ?", (digest,)).fetchone()[
                0
            ]
        )

    # ---- symlinks -----------------------------------------------------------------------------

    def set_symlink(self, ino: int, target: bytes) -> None:
        self.conn.execute("INSERT INTO symlinks (inode, target) VALUES (?, ?)", (ino, target))

    def get_symlink(self, ino: int) -> bytes | None:
        row = self.conn.execute("SELECT target FROM symlinks WHERE inode = ?", (ino,)).fetchone()
        return None if row is None else bytes(row[0])

    # ---- extended attributes ------------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        # The kernel asks for security.capability before every write to a file; a file this
        # mount made has none, and that answer costs no query.
        if self._writing and ino in self.conn.xattr_free:
            return None
        row = self.conn.execute(
            "SELECT value FROM xattrs WHERE inode = ? AND name = ?", (ino, name)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
            (ino, name, value),
        )

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        cur = self.conn.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (ino, name))
        return cur.rowcount > 0

    def list_xattrs(self, ino: int) -> list[bytes]:
        if self._writing and ino in self.conn.xattr_free:
            return []  # `cp -a` and `rsync -X` ask every file, twice (size, then names)
        names = [
            bytes(r[0])
            for r in self.conn.execute(
                "SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (ino,)
            )
        ]
        if not names and self._writing:
            self.conn.xattr_free.add(ino)
        return names

    def xattr_total(self, ino: int) -> int:
        row = self.conn.execute(
            "SELECT coalesce(sum(length(name) + length(value)), 0) FROM xattrs WHERE inode = ?",
            (ino,),
        ).fetchone()
        return int(row[0])

    # ---- events -------------------------------------------------------------------------------

    def append_event(self, type_: str, payload: dict[str, Any], sandbox: str | None = None) -> int:
        cur = self.conn.execute(
            "INSERT INTO events (time_ns, type, sandbox, payload) VALUES (?, ?, ?, ?)",
            (time.time_ns(), type_, sandbox, cbor2.dumps(payload)),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def events(self, after: int = 0, type_prefix: str | None = None) -> list[EventRow]:
        sql = "SELECT seq, time_ns, type, sandbox, payload FROM events WHERE seq > ?"
        args: list[Any] = [after]
        if type_prefix:
            # substr, not LIKE: '_' and '%' in a prefix are literal characters.
            sql += " AND substr(type, 1, ?) = ?"
            args += [len(type_prefix), type_prefix]
        sql += " ORDER BY seq"
        return [
            EventRow(r[0], r[1], r[2], r[3], cbor2.loads(r[4]))
            for r in self.conn.execute(sql, args)
        ]

    # ---- checkpoints ---------------------------------------------------------------------------

    def insert_checkpoint(
        self,
        namespace_id: int,
        name: str,
        root: bytes,
        created_ns: int,
        creator: str,
        files: int,
        nbytes: int,
        manifest_bytes: int,
    ) -> CheckpointRow:
        cur = self.conn.execute(
            "INSERT INTO checkpoints (namespace_id, name, root, created_ns, creator, files, "
            "bytes, manifest_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace_id, name, root, created_ns, creator, files, nbytes, manifest_bytes),
        )
        assert cur.lastrowid is not None
        return CheckpointRow(
            cur.lastrowid, namespace_id, name, root, created_ns, creator, files, nbytes,
            manifest_bytes,
        )

    def checkpoints_of(self, namespace_id: int) -> list[CheckpointRow]:
        return [
            _checkpoint(r)
            for r in self.conn.execute(
                f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE namespace_id = ? "
                "ORDER BY created_ns, id",
                (namespace_id,),
            )
        ]

    def checkpoint_by_name(self, namespace_id: int, name: str) -> CheckpointRow | None:
        row = self.conn.execute(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE namespace_id = ? AND name = ?",
            (namespace_id, name),
        ).fetchone()
        return None if row is None else _checkpoint(row)

    def delete_checkpoint(self, checkpoint_id: int) -> None:
        self.conn.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint_id,))

    def delete_checkpoints_of(self, namespace_id: int) -> int:
        cur = self.conn.execute("DELETE FROM checkpoints WHERE namespace_id = ?", (namespace_id,))
        return cur.rowcount

    def checkpoint_roots(self) -> list[bytes]:
        """Every checkpoint's root manifest digest (gc and fsck walk from these)."""
        return [bytes(r[0]) for r in self.conn.execute("SELECT root FROM checkpoints")]

    # ---- structural sharing: clean and dirty directories ------------------------------------

    def dir_state(self, ino: int) -> DirState | None:
        """The recorded manifest of `ino` if it is clean, else None."""
        row = self.conn.execute(
            "SELECT digest, files, bytes FROM dir_manifests m WHERE inode = ? "
            "AND NOT EXISTS (SELECT 1 FROM dirty_dirs x WHERE x.inode = m.inode)",
            (ino,),
        ).fetchone()
        return None if row is None else DirState(bytes(row[0]), row[1], row[2])

    def dirty_seq(self, ino: int) -> int | None:
        row = self.conn.execute("SELECT seq FROM dirty_dirs WHERE inode = ?", (ino,)).fetchone()
        return None if row is None else int(row[0])

    def max_dirty_seq(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(seq), 0) FROM dirty_dirs").fetchone()[0])

    def child_dir_dirty_after(self, parent: int, seq: int) -> bool:
        """Whether a directory in `parent` changed after dirty seq `seq`."""
        row = self.conn.execute(
            "SELECT 1 FROM dentries d JOIN dirty_dirs x ON x.inode = d.inode "
            "WHERE d.parent = ? AND x.seq > ? LIMIT 1",
            (parent, seq),
        ).fetchone()
        return row is not None

    def set_clean(self, ino: int, digest: bytes, files: int, nbytes: int) -> None:
        self.conn.execute("DELETE FROM dirty_dirs WHERE inode = ?", (ino,))
        self.conn.execute(
            "INSERT OR REPLACE INTO dir_manifests (inode, digest, files, bytes) "
            "SELECT id, ?, ?, ? FROM inodes WHERE id = ?",
            (digest, files, nbytes, ino),
        )

    def start_building(self, pid: int) -> int:
        """Announce a checkpoint build (see the `building` table); drops rows of dead pids."""
        for row_id, other in self.conn.execute("SELECT id, pid FROM building").fetchall():
            if not pid_alive(other):
                self.conn.execute("DELETE FROM building WHERE id = ?", (row_id,))
        cur = self.conn.execute(
            "INSERT INTO building (pid, started_ns) VALUES (?, ?)", (pid, time.time_ns())
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def end_building(self, build_id: int) -> None:
        self.conn.execute("DELETE FROM building WHERE id = ?", (build_id,))

    def unhashed_files(self, namespace_id: int) -> list[int]:
        """Linked files of a namespace whose whole-content SHA-256 is not known yet."""
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM inodes WHERE namespace_id = ? AND sha256 IS NULL AND kind = 5 "
                "AND nlink > 0",
                (namespace_id,),
            )
        ]

    # ---- whole directories at once (manifests, restore, diff) -------------------------------

    def children(self, parent: int) -> list[tuple[bytes, InodeRow]]:
        """Every (name, inode) in `parent`, unordered."""
        rows = self.conn.execute(
            f"SELECT d.name, {_I_COLUMNS} FROM dentries d JOIN inodes i ON i.id = d.inode "
            "WHERE d.parent = ?",
            (parent,),
        ).fetchall()
        return [(bytes(r[0]), _inode(r[1:])) for r in rows]

    def children_blocks(self, parent: int) -> dict[int, list[tuple[int, bytes]]]:
        """Block maps of the files in `parent`, keyed by inode, in block order."""
        out: dict[int, list[tuple[int, bytes]]] = {}
        for ino, idx, digest in self.conn.execute(
            "SELECT b.inode, b.idx, b.digest FROM blocks b WHERE b.inode IN "
            "(SELECT d.inode FROM dentries d WHERE d.parent = ?) ORDER BY b.inode, b.idx",
            (parent,),
        ):
            out.setdefault(ino, []).append((idx, bytes(digest)))
        return out

    def children_xattrs(self, parent: int) -> dict[int, dict[bytes, bytes]]:
        out: dict[int, dict[bytes, bytes]] = {}
        for ino, name, value in self.conn.execute(
            "SELECT x.inode, x.name, x.value FROM xattrs x WHERE x.inode IN "
            "(SELECT d.inode FROM dentries d WHERE d.parent = ?)",
            (parent,),
        ):
            out.setdefault(ino, {})[bytes(name)] = bytes(value)
        return out

    def children_symlinks(self, parent: int) -> dict[int, bytes]:
        return {
            ino: bytes(target)
            for ino, target in self.conn.execute(
                "SELECT s.inode, s.target FROM symlinks s JOIN dentries d ON d.inode = s.inode "
                "WHERE d.parent = ?",
                (parent,),
            )
        }

    def xattrs_of(self, ino: int) -> dict[bytes, bytes]:
        return {
            bytes(n): bytes(v)
            for n, v in self.conn.execute(
                "SELECT name, value FROM xattrs WHERE inode = ?", (ino,)
            )
        }

    def blocks_of(self, ino: int) -> list[tuple[int, bytes]]:
        return [
            (int(i), bytes(d))
            for i, d in self.conn.execute(
                "SELECT idx, digest FROM blocks WHERE inode = ? ORDER BY idx", (ino,)
            )
        ]

    def write_inode_exact(self, row: InodeRow) -> None:
        """Write every column of `row` as given, times and btime included (restore)."""
        self.conn.execute(
            "UPDATE inodes SET mode = ?, uid = ?, gid = ?, size = ?, rdev = ?, atime_ns = ?, "
            "mtime_ns = ?, ctime_ns = ?, btime_ns = ?, sha256 = ?, stored = ? WHERE id = ?",
            (
                row.mode, row.uid, row.gid, row.size, row.rdev, row.atime_ns, row.mtime_ns,
                row.ctime_ns, row.btime_ns, row.sha256, row.stored, row.id,
            ),
        )
        self._rows.pop(row.id, None)

    def replace_xattrs(self, ino: int, xattrs: dict[bytes, bytes]) -> None:
        current = self.xattrs_of(ino)
        if current == xattrs:
            return
        self.conn.execute("DELETE FROM xattrs WHERE inode = ?", (ino,))
        self.conn.executemany(
            "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
            ((ino, n, v) for n, v in xattrs.items()),
        )

    # ---- the change feed and live mounts ------------------------------------------------------

    def append_changes(self, changes: Iterable[tuple[int, int, bytes | None]]) -> int:
        """Record (kind, ino, name) changes for other mounts; returns the last seq."""
        now = time.time_ns()
        self.conn.executemany(
            "INSERT INTO changes (time_ns, kind, ino, name) VALUES (?, ?, ?, ?)",
            ((now, k, i, n) for k, i, n in changes),
        )
        # Keep the feed short: a daemon that is minutes behind re-reads nothing it needs.
        self.conn.execute("DELETE FROM changes WHERE time_ns < ?", (now - 600 * 10**9,))
        return self.max_change_seq()

    def max_change_seq(self) -> int:
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return 0 if row is None else int(row[0])

    def changes_after(
        self, seq: int, limit: int = 10000, *, skip_origin: int | None = None
    ) -> list[tuple[int, int, int, bytes | None]]:
        """Change-feed rows after `seq`, without those `skip_origin` wrote itself."""
        return [
            (s, k, i, None if n is None else bytes(n))
            for s, k, i, n in self.conn.execute(
                "SELECT seq, kind, ino, name FROM changes WHERE seq > ? "
                "AND origin IS NOT ? ORDER BY seq LIMIT ?",
                (seq, skip_origin if skip_origin is not None else -1, limit),
            )
        ]

    def publish_changes(self, origin: int) -> None:
        """Make this connection record every change it makes in the feed, tagged `origin`,
        while other mounts of the store are registered (TEMP triggers: this connection
        only). The feed is what other daemons follow to drop their kernel caches."""
        origin = int(origin)
        self._feed_triggers(
            "pub", str(origin), f"EXISTS (SELECT 1 FROM main.mounts WHERE id != {origin})"
        )

    def _feed_triggers(self, prefix: str, origin: str, when: str) -> None:
        """(Re)create the TEMP triggers `<prefix>_*` that append this connection's changes
        of names, attributes and extended attributes to the feed, tagged `origin` (SQL)."""
        now_ns = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) * 1000000"
        insert = "INSERT INTO changes (time_ns, kind, ino, name, origin) VALUES"
        for name, event, rows in _FEED_EVENTS:
            values = ", ".join(f"({now_ns}, {r}, {origin})" for r in rows)
            self.conn.execute(f"DROP TRIGGER IF EXISTS temp.{prefix}_{name}")
            self.conn.execute(
                f"CREATE TEMP TRIGGER {prefix}_{name} {event} WHEN {when} "
                f"BEGIN {insert} {values}; END"
            )

    def _drop_feed_triggers(self, prefix: str) -> None:
        for name, _, _ in _FEED_EVENTS:
            self.conn.execute(f"DROP TRIGGER IF EXISTS temp.{prefix}_{name}")

    def register_mount(
        self, pid: int, mountpoint: str, seen_seq: int, credential: str | None = None
    ) -> int:
        cur = self.conn.execute(
            "INSERT INTO mounts (pid, mountpoint, started_ns, seen_seq, credential) "
            "VALUES (?, ?, ?, ?, ?)",
            (pid, mountpoint, time.time_ns(), seen_seq, credential),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def set_mount_seen(self, mount_id: int, seq: int) -> None:
        self.conn.execute("UPDATE mounts SET seen_seq = ? WHERE id = ?", (seq, mount_id))

    def unregister_mount(self, mount_id: int) -> None:
        self.conn.execute("DELETE FROM mounts WHERE id = ?", (mount_id,))

    def drop_dead_mounts(self) -> int:
        """Forget registrations of daemons that died without unregistering."""
        dead = [m.id for m in self.mounts() if not pid_alive(m.pid)]
        self.conn.executemany("DELETE FROM mounts WHERE id = ?", ((i,) for i in dead))
        return len(dead)

    def live_mounts(self) -> list[MountRow]:
        """Registered mounts whose daemon is alive."""
        return [m for m in self.mounts() if pid_alive(m.pid)]

    def mounts(self) -> list[MountRow]:
        return [
            MountRow(*r)
            for r in self.conn.execute(
                "SELECT id, pid, mountpoint, started_ns, seen_seq, credential FROM mounts "
                "ORDER BY id"
            )
        ]

    # ---- credentials ---------------------------------------------------------------------------

    def insert_credential(
        self,
        cred_id: str,
        sandbox: str,
        user: str,
        session: str,
        grants: dict[str, str],
        issued_ns: int,
        expires_ns: int,
        issuer: str,
    ) -> None:
        self.conn.execute(
            "INSERT INTO credentials (id, sandbox, user, session, grants, issued_ns, expires_ns, "
            "issuer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (cred_id, sandbox, user, session, cbor2.dumps(grants), issued_ns, expires_ns, issuer),
        )

    def credential(self, cred_id: str) -> CredentialRow | None:
        row = self.conn.execute(
            f"SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?", (cred_id,)
        ).fetchone()
        return None if row is None else _credential(row)

    def credentials(self) -> list[CredentialRow]:
        return [
            _credential(r)
            for r in self.conn.execute(
                f"SELECT {CREDENTIAL_COLUMNS} FROM credentials ORDER BY issued_ns, id"
            )
        ]

    def revoke_credential(self, cred_id: str, when_ns: int) -> bool:
        cur = self.conn.execute(
            "UPDATE credentials SET revoked_ns = ? WHERE id = ? AND revoked_ns IS NULL",
            (when_ns, cred_id),
        )
        return cur.rowcount > 0

    def extend_scope_expiry(self, scope_id: int, expires_ns: int) -> None:
        """A session scope lives as long as its longest credential."""
        self.conn.execute(
            "UPDATE scopes SET expires_ns = max(coalesce(expires_ns, 0), ?) WHERE id = ?",
            (expires_ns, scope_id),
        )

    def sandbox_by_name(self, name: str) -> SandboxRow | None:
        row = self.conn.execute(
            "SELECT id, name, inode, created_ns FROM sandboxes WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else SandboxRow(*row)

    def scope_by_name(self, sandbox_id: int, name: str) -> ScopeRow | None:
        row = self.conn.execute(
            "SELECT id, sandbox_id, kind, owner, name, inode, created_ns, expires_ns "
            "FROM scopes WHERE sandbox_id = ? AND name = ?",
            (sandbox_id, name),
        ).fetchone()
        return None if row is None else ScopeRow(*row)

    # ---- integrity (tests and fsck) -----------------------------------------------------------

    def link_count_mismatches(self) -> list[tuple[int, int, int]]:
        """(inode, stored nlink, expected nlink) for every live inode whose count is wrong."""
        rows = self.conn.execute(
            """
            SELECT i.id, i.nlink,
              CASE WHEN i.kind IN (0, 1, 2, 3, 4)
                THEN 2 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.id = d.inode
                          WHERE d.parent = i.id AND c.kind IN (1, 2, 3, 4))
                ELSE (SELECT count(*) FROM dentries d WHERE d.inode = i.id) END AS expected
            FROM inodes i WHERE i.nlink > 0
            """
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows if r[1] != r[2]]

    def dangling_dentries(self) -> list[tuple[int, bytes, int]]:
        rows = self.conn.execute(
            "SELECT d.parent, d.name, d.inode FROM dentries d LEFT JOIN inodes i ON i.id = d.inode "
            "LEFT JOIN inodes p ON p.id = d.parent WHERE i.id IS NULL OR p.id IS NULL"
        ).fetchall()
        return [(r[0], bytes(r[1]), r[2]) for r in rows]

    def unknown_block_digests(self) -> list[bytes]:
        return [
            bytes(r[0])
            for r in self.conn.execute(
                "SELECT DISTINCT b.digest FROM blocks b LEFT JOIN blobs o ON o.digest = b.digest "
                "WHERE o.digest IS NULL"
            )
        ]

    # ---- grid lookups (CLI) ----
    # Finding a namespace by what users type: its public id (xattr user.artifactfs.namespace).

    def namespace_by_public_id(self, public_id: str) -> NamespaceRow | None:
        row = self.conn.execute(
            "SELECT id, public_id, scope_id, kind, owner, name, root_inode, created_ns "
            "FROM namespaces WHERE public_id = ?",
            (public_id,),
        ).fetchone()
        return None if row is None else NamespaceRow(*row)

    # ---- operations (gc, fsck, stats, log) ----
    # Whole-store queries of the maintenance commands. gc and fsck read these inside one read
    # transaction (`read_txn`) on a connection of their own, so every list is one snapshot.

    def ops_block_digests(self) -> set[bytes]:
        """Every digest a live block map names (open-unlinked files included)."""
        return {bytes(r[0]) for r in self.conn.execute("SELECT DISTINCT digest FROM blocks")}

    def ops_blob_rows(self) -> dict[bytes, tuple[int, int]]:
        """digest -> (size, created_ns) of every row of `blobs`."""
        return {
            bytes(d): (int(s), int(c))
            for d, s, c in self.conn.execute("SELECT digest, size, created_ns FROM blobs")
        }

    def ops_clean_dir_digests(self) -> set[bytes]:
        """Manifest digests of clean directories: the next checkpoint reuses them unread."""
        return {
            bytes(r[0])
            for r in self.conn.execute(
                "SELECT digest FROM dir_manifests m "
                "WHERE NOT EXISTS (SELECT 1 FROM dirty_dirs x WHERE x.inode = m.inode)"
            )
        }

    def ops_checkpoints(self) -> list[CheckpointRow]:
        return [
            _checkpoint(r)
            for r in self.conn.execute(f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY id")
        ]

    def ops_building(self) -> list[tuple[int, int]]:
        """(pid, started_ns) of checkpoint builds announced and not yet recorded."""
        rows = self.conn.execute("SELECT pid, started_ns FROM building")
        return [(int(p), int(s)) for p, s in rows]

    def ops_referenced_or_young(self, digests: list[bytes], young_after_ns: int) -> set[bytes]:
        """Those of `digests` that a block map or a clean directory names now,
        or whose `blobs` row was written after `young_after_ns` (gc's re-check)."""
        out: set[bytes] = set()
        for part, marks in _in_groups(digests):
            sql = (
                f"SELECT digest FROM blocks WHERE digest IN ({marks}) "
                f"UNION SELECT digest FROM blobs WHERE digest IN ({marks}) AND created_ns > ? "
                f"UNION SELECT m.digest FROM dir_manifests m WHERE m.digest IN ({marks}) "
                "AND NOT EXISTS (SELECT 1 FROM dirty_dirs x WHERE x.inode = m.inode)"
            )
            args = [*part, *part, young_after_ns, *part]
            out.update(bytes(r[0]) for r in self.conn.execute(sql, args))
        return out

    def ops_delete_blob_rows(self, digests: Iterable[bytes]) -> None:
        self.conn.executemany("DELETE FROM blobs WHERE digest = ?", ((d,) for d in digests))

    def ops_expired_sessions(self, now_ns: int) -> list[tuple[ScopeRow, str]]:
        """Session scopes whose lifetime ended before `now_ns`, with their sandbox's name."""
        rows = self.conn.execute(
            "SELECT s.id, s.sandbox_id, s.kind, s.owner, s.name, s.inode, s.created_ns, "
            "s.expires_ns, b.name FROM scopes s JOIN sandboxes b ON b.id = s.sandbox_id "
            "WHERE s.kind = 'session' AND s.expires_ns IS NOT NULL AND s.expires_ns < ? "
            "ORDER BY b.name, s.name",
            (now_ns,),
        ).fetchall()
        return [(ScopeRow(*r[:8]), str(r[8])) for r in rows]

    # fsck

    def ops_orphan_rows(self) -> dict[str, list[int]]:
        """Inodes named by rows of blocks/xattrs/symlinks/dir_manifests/dirty_dirs that do
        not exist."""
        out: dict[str, list[int]] = {}
        for table in ("blocks", "xattrs", "symlinks", "dir_manifests", "dirty_dirs"):
            inos = [
                int(r[0])
                for r in self.conn.execute(
                    f"SELECT DISTINCT t.inode FROM {table} t "
                    "WHERE NOT EXISTS (SELECT 1 FROM inodes i WHERE i.id = t.inode)"
                )
            ]
            if inos:
                out[table] = inos
        return out

    def ops_delete_orphan_rows(self, table: str, inodes: Iterable[int]) -> None:
        if table not in ("blocks", "xattrs", "symlinks", "dir_manifests", "dirty_dirs"):
            raise ValueError(table)
        self.conn.executemany(
            f"DELETE FROM {table} WHERE inode = ? "
            "AND NOT EXISTS (SELECT 1 FROM inodes i WHERE i.id = ?)",
            ((i, i) for i in inodes),
        )

    def ops_set_nlink(self, ino: int, nlink: int) -> None:
        self.conn.execute("UPDATE inodes SET nlink = ? WHERE id = ?", (nlink, ino))
        self._rows.pop(ino, None)

    def ops_remove_dentry_exact(self, parent: int, name: bytes, ino: int) -> None:
        self.conn.execute(
            "DELETE FROM dentries WHERE parent = ? AND name = ? AND inode = ?", (parent, name, ino)
        )

    def ops_unnamed_live_inodes(self) -> list[tuple[int, int]]:
        """(inode, kind) of inodes other than the root with nlink > 0 and no name."""
        return [
            (int(i), int(k))
            for i, k in self.conn.execute(
                "SELECT i.id, i.kind FROM inodes i WHERE i.id != 1 AND i.nlink > 0 "
                "AND NOT EXISTS (SELECT 1 FROM dentries d WHERE d.inode = i.id)"
            )
        ]

    def ops_grid_rows_without_inode(self) -> list[tuple[str, str, int]]:
        """(table, name, missing inode) for sandboxes, scopes and namespaces whose inode is
        gone."""
        out: list[tuple[str, str, int]] = []
        for table, col, name in (
            ("sandboxes", "inode", "name"),
            ("scopes", "inode", "name"),
            ("namespaces", "root_inode", "name"),
        ):
            for n, ino in self.conn.execute(
                f"SELECT t.{name}, t.{col} FROM {table} t "
                f"WHERE NOT EXISTS (SELECT 1 FROM inodes i WHERE i.id = t.{col})"
            ):
                out.append((table, str(n), int(ino)))
        return out

    def ops_inodes_using(self, digests: Iterable[bytes]) -> dict[bytes, list[int]]:
        """digest -> the inodes whose block maps name it."""
        out: dict[bytes, list[int]] = {}
        for d in digests:
            inos = [
                int(r[0])
                for r in self.conn.execute(
                    "SELECT DISTINCT inode FROM blocks WHERE digest = ? ORDER BY inode", (d,)
                )
            ]
            if inos:
                out[d] = inos
        return out

    def ops_count_unlinked(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM inodes WHERE nlink = 0").fetchone()[0])

    # stats

    def ops_namespace_counts(self) -> list[tuple[str, str, str, int, int]]:
        """(sandbox, scope, scope kind, workspaces, blob namespaces) per scope."""
        return [
            (str(a), str(b), str(c), int(w), int(n))
            for a, b, c, w, n in self.conn.execute(
                "SELECT b.name, s.name, s.kind, "
                "coalesce(sum(n.kind = 'workspace'), 0), coalesce(sum(n.kind = 'blob'), 0) "
                "FROM scopes s JOIN sandboxes b ON b.id = s.sandbox_id "
                "LEFT JOIN namespaces n ON n.scope_id = s.id "
                "GROUP BY s.id ORDER BY b.name, s.name"
            )
        ]

    def ops_file_totals(self) -> tuple[int, int]:
        """(linked regular files, their logical bytes)."""
        n, total = self.conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM inodes WHERE kind = 5 AND nlink > 0"
        ).fetchone()
        return int(n), int(total)

    def ops_unique_block_totals(self) -> tuple[int, int]:
        """(distinct blocks live files use, their stored bytes)."""
        n, total = self.conn.execute(
            "SELECT count(*), coalesce(sum(o.size), 0) FROM "
            "(SELECT DISTINCT digest FROM blocks) b JOIN blobs o ON o.digest = b.digest"
        ).fetchone()
        return int(n), int(total)

    def ops_checkpoint_totals(self) -> tuple[int, int, int]:
        """(checkpoints, logical bytes they capture, manifest bytes they wrote)."""
        n, b, m = self.conn.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(manifest_bytes), 0) "
            "FROM checkpoints"
        ).fetchone()
        return int(n), int(b), int(m)

    # log

    def ops_events(
        self,
        *,
        after: int = 0,
        type_prefix: str | None = None,
        sandbox: str | None = None,
        since_ns: int | None = None,
        limit: int = 1000,
    ) -> list[EventRow]:
        """Events after seq `after`, oldest first, filtered (type by prefix: substr, so '_'
        and '%' are literal)."""
        sql = "SELECT seq, time_ns, type, sandbox, payload FROM events WHERE seq > ?"
        args: list[Any] = [after]
        if type_prefix:
            sql += " AND substr(type, 1, ?) = ?"
            args += [len(type_prefix), type_prefix]
        if sandbox is not None:
            sql += " AND sandbox = ?"
            args.append(sandbox)
        if since_ns is not None:
            sql += " AND time_ns >= ?"
            args.append(since_ns)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [
            EventRow(r[0], r[1], r[2], r[3], cbor2.loads(r[4]))
            for r in self.conn.execute(sql, args)
        ]

    # ---- end of operations (gc, fsck, stats, log) ----

    # ---- remote stores (uploads) ----
    # The upload queue of a remote store is `blobs WHERE uploaded = 0` (schema v3): rows are
    # written with the commit that first references a blob, so the queue survives kill -9.

    # Set by Store for a remote (S3) store: record_blobs then queues new blobs for upload.
    remote: bool = False

    def upload_queue(self, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` (digest, size) of blobs not yet uploaded, oldest first."""
        return [
            (bytes(d), int(s))
            for d, s in self.conn.execute(
                "SELECT digest, size FROM blobs WHERE uploaded = 0 ORDER BY created_ns LIMIT ?",
                (limit,),
            )
        ]

    def upload_queue_stats(self) -> tuple[int, int]:
        """(blobs not yet uploaded, their bytes)."""
        n, total = self.conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM blobs WHERE uploaded = 0"
        ).fetchone()
        return int(n), int(total)

    def mark_uploaded(self, digests: Iterable[bytes]) -> None:
        self.conn.executemany(
            "UPDATE blobs SET uploaded = 1 WHERE digest = ? AND uploaded = 0",
            ((d,) for d in digests),
        )

    def upload_states(self, digests: Iterable[bytes]) -> dict[bytes, bool]:
        """For each digest the index knows, whether it is uploaded (absent: not recorded)."""
        out: dict[bytes, bool] = {}
        for part, marks in _in_groups(list(digests)):
            sql = f"SELECT digest, uploaded FROM blobs WHERE digest IN ({marks})"
            out.update((bytes(d), bool(u)) for d, u in self.conn.execute(sql, part))
        return out

    def live_mount_pids(self) -> list[int]:
        """Pids of registered mounts whose process is alive (rows of dead ones are stale)."""
        return [m.pid for m in self.live_mounts()]

    def forget_host_state(self) -> None:
        """Drop what only meant something on the machine a backup was taken on (mounts,
        checkpoint builds in progress): a restored index starts with none."""
        self.conn.execute("DELETE FROM mounts")
        self.conn.execute("DELETE FROM building")

    def snapshot_to(self, dest: Path) -> None:
        """Write a consistent copy of the database to `dest` with SQLite's online backup, on
        a connection of its own (one read snapshot: what was committed when it started), so
        it may run in a worker thread while the daemon keeps writing on `conn`."""
        src = sqlite3.connect(self.path, check_same_thread=False)
        try:
            src.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()

    # ---- end of remote stores (uploads) ----
