"""The redo log (index/redo.py) without the layers above: what a process appended survives its
death and is applied exactly once, by the next connection that writes; nothing else is."""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifactfs.index import redo
from artifactfs.index.db import Index, InodeRow

D1 = bytes([1]) * 32
# Change-feed kinds (the `changes` table in index/schema.py): a name in a directory, an inode.
FEED_ENTRY, FEED_INODE = 0, 1


class Boom(Exception):
    pass


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, as this connection sees it (its open transaction too)."""
    out = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        rows = sqlite3.Connection.execute(conn, f"SELECT * FROM {name}").fetchall()
        if name == "meta":  # the epoch moves with every commit that matters
            rows = [r for r in rows if r[0] != "redo_epoch"]
        if name == "changes":  # a replay tells the mounts what it applied (tested below)
            continue
        if name == "sqlite_sequence":
            rows = [r for r in rows if r[0] != "changes"]
        out[name] = sorted(rows, key=repr)
    return out


def logs(path: Path) -> list[str]:
    d = redo.redo_dir(path)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def daemon_index(path: Path) -> Index:
    ix = Index(path, create=not path.exists())
    ix.group_commit = True
    ix.enable_redo()
    return ix


def crash(ix: Index) -> None:
    """What the death of the process leaves: its flock gone, its transaction not committed."""
    assert ix._redo is not None
    os.close(ix._redo.fd)
    sqlite3.Connection.close(ix.conn)


def new_file(ix: Index, parent: int, name: bytes) -> InodeRow:
    with ix.txn():
        row = ix.insert_inode(
            kind=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2, nlink=1, time_ns=7, namespace_id=None
        )
        ix.add_dentry(parent, name, row.id)
    return row


def linked_twice(path: Path) -> tuple[Index, InodeRow]:
    """A daemon's index that made a file, raised its link count and appended both."""
    ix = daemon_index(path)
    row = new_file(ix, 1, b"f")
    with ix.txn():
        ix.add_nlink(row.id, 1)
    ix.persist()
    return ix, row


def names(ix: Index) -> set[bytes]:
    return {bytes(r[0]) for r in ix.conn.execute("SELECT name FROM dentries")}


def test_what_a_killed_process_persisted_is_applied_by_the_next_open(tmp_path: Path) -> None:
    """A real process appends, then dies without any cleanup (os._exit): the next Index on
    the store applies its closes, not what came after the last one, and removes the log."""
    path = tmp_path / "index.sqlite3"
    Index(path, create=True).close()
    script = textwrap.dedent(
        f"""
        import os, stat, sys
        from pathlib import Path
        from artifactfs.index.db import Index
        ix = Index(Path({str(path)!r}))
        ix.group_commit = True
        ix.enable_redo()
        def add(name, data):
            with ix.txn():
                row = ix.insert_inode(kind=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2,
                                      nlink=1, time_ns=7, namespace_id=None)
                ix.add_dentry(1, name, row.id)
                ix.set_blocks(row.id, [(0, {D1!r})])
                ix.update_file_state(row.id, len(data), 9, 9, None, len(data))
        add(b"closed", b"x" * 5000)
        ix.persist()
        add(b"also-closed", b"y")
        ix.set_xattr(1, b"user.k", b"v")
        ix.persist()
        add(b"never-closed", b"z")
        sys.stdout.write(str(len(os.listdir({str(redo.redo_dir(path))!r}))))
        sys.stdout.flush()
        os._exit(0)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1"
    assert logs(path) == [next(iter(logs(path)))]  # left behind by the dead process

    ix = Index(path)
    try:
        assert names(ix) == {b"closed", b"also-closed"}
        row = ix.lookup_child_inode(1, b"closed")
        assert row is not None and row.size == 5000 and row.mtime_ns == 9
        assert ix.block_map(row.id) == {0: D1}
        assert ix.get_xattr(1, b"user.k") == b"v"
        assert logs(path) == []
    finally:
        ix.close()
    again = Index(path)  # nothing applied twice
    try:
        assert names(again) == {b"closed", b"also-closed"}
    finally:
        again.close()


def test_a_unit_that_rolled_back_is_not_in_the_log(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    ix = daemon_index(path)
    new_file(ix, 1, b"kept")
    with pytest.raises(Boom), ix.txn():
        row = ix.insert_inode(
            kind=5, mode=0o100644, uid=1, gid=2, nlink=1, time_ns=7, namespace_id=None
        )
        ix.add_dentry(1, b"rolled-back", row.id)
        ix.add_nlink(1, 5)
        raise Boom()
    new_file(ix, 1, b"after")
    ix.persist()
    want = dump(ix.conn)
    crash(ix)
    back = Index(path)
    try:
        assert dump(back.conn) == want
        assert names(back) == {b"kept", b"after"}
    finally:
        back.close()


def test_records_committed_before_the_crash_are_not_applied_again(tmp_path: Path) -> None:
    """The owner committed, then died before cutting its log: the epoch moved, so the
    records are stale (applying `nlink = nlink + 1` again would count twice)."""
    path = tmp_path / "index.sqlite3"
    ix, row = linked_twice(path)
    assert ix._redo is not None
    log_path = ix._redo.path
    stale = log_path.read_bytes()
    assert stale
    ix.flush()
    assert log_path.stat().st_size == 0
    log_path.write_bytes(stale)  # as if the process died between COMMIT and the truncate
    crash(ix)
    back = Index(path)
    try:
        got = back.get_inode(row.id)
        assert got is not None and got.nlink == 2
        assert logs(path) == []
    finally:
        back.close()


def test_the_log_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    """Another connection never applies a log whose owner still holds its lock, even when
    the epoch matches (here the owner's COMMIT did not move it, to make that case)."""
    path = tmp_path / "index.sqlite3"
    Index(path, create=True).close()
    other = Index(path)  # opened first: it would wait for the owner's commit otherwise
    owner, row = linked_twice(path)
    sqlite3.Connection.execute(owner.conn, "COMMIT")
    try:
        with other.txn():
            got = other.get_inode(row.id)
        assert got is not None and got.nlink == 2
        assert len(logs(path)) == 1
    finally:
        other.close()
        crash(owner)


def test_a_damaged_record_ends_the_replay(tmp_path: Path) -> None:
    """A record cut short (the machine died mid-append) and what follows are ignored."""
    path = tmp_path / "index.sqlite3"
    ix = daemon_index(path)
    new_file(ix, 1, b"first")
    ix.persist()
    assert ix._redo is not None
    first_end = ix._redo.size
    new_file(ix, 1, b"second")
    ix.persist()
    os.truncate(ix._redo.path, ix._redo.size - 3)
    crash(ix)
    back = Index(path)
    try:
        assert names(back) == {b"first"}
        assert first_end > 0
    finally:
        back.close()


def test_a_log_that_does_not_apply_is_set_aside(tmp_path: Path) -> None:
    """Never a store that cannot open: a log whose statements fail is kept aside as .failed
    (for a human), its transaction part undone, and the store goes on."""
    path = tmp_path / "index.sqlite3"
    ix = daemon_index(path)
    new_file(ix, 1, b"good")
    ix.persist()
    assert ix._redo is not None
    epoch = ix._epoch
    with open(ix._redo.path, "ab") as f:
        f.write(redo._encode(epoch, [(False, "INSERT INTO no_such_table VALUES (?)", (1,))]))
    crash(ix)
    back = Index(path)
    try:
        assert names(back) == set()
        assert [n.endswith(".failed") for n in logs(path)] == [True]
        new_file(back, 1, b"later")
        assert names(back) == {b"later"}
    finally:
        back.close()


def test_a_log_that_cannot_be_written_makes_persist_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.sqlite3"
    ix = daemon_index(path)
    try:

        def full(self: redo.RedoLog, epoch: int, statements: list[redo.Statement]) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(redo.RedoLog, "append", full)
        new_file(ix, 1, b"f")
        ix.persist()
        assert not ix.conn.in_transaction
        other = sqlite3.connect(path)
        try:
            assert other.execute(
                "SELECT count(*) FROM dentries WHERE name = ?", (b"f",)
            ).fetchone() == (1,)
        finally:
            other.close()
    finally:
        monkeypatch.undo()
        ix.close()


def test_a_group_transaction_sqlite_rolled_back_is_applied_again(tmp_path: Path) -> None:
    """If SQLite itself drops the open transaction (an I/O error, a full disk), what the log
    holds of it is run again, so a close that was answered is not lost."""
    path = tmp_path / "index.sqlite3"
    ix = daemon_index(path)
    try:
        new_file(ix, 1, b"closed")
        ix.persist()
        new_file(ix, 1, b"not-closed")
        with pytest.raises(Boom), ix.txn():
            ix.add_nlink(1, 1)
            # What SQLite does when a statement hits an I/O error or a full disk.
            sqlite3.Connection.execute(ix.conn, "ROLLBACK")
            raise Boom()
        assert ix.conn.in_transaction
        assert names(ix) == {b"closed"}
        ix.flush()
    finally:
        ix.close()
    back = Index(path)
    try:
        assert names(back) == {b"closed"}
    finally:
        back.close()


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["file", "link", "xattr", "unlink", "state", "failing", "persist", "flush"]
        ),
        st.integers(0, 7),
    ),
    max_size=30,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_a_crash_leaves_exactly_what_was_persisted(tmp_path: Path, ops: list[Any]) -> None:
    """Random changes, units that fail, appends and commits, then the process dies: the store
    opened again holds, table by table, exactly what this connection saw at its last append
    or commit."""
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.sqlite3"
    ix = daemon_index(path)
    files: list[int] = []
    at_last_persist = dump(ix.conn)
    for op, v in ops:
        if op == "file":
            files.append(new_file(ix, 1, b"f%d" % len(files)).id)
        elif op == "persist":
            ix.persist()
            at_last_persist = dump(ix.conn)
        elif op == "flush":
            ix.flush()
            at_last_persist = dump(ix.conn)
        elif not files:
            continue
        else:
            ino = files[v % len(files)]
            try:
                with ix.txn():
                    if op == "link":
                        ix.add_dentry(1, b"l%d-%d" % (ino, v), ino)
                        ix.add_nlink(ino, 1, ctime_ns=v)
                    elif op == "xattr":
                        ix.set_xattr(ino, b"user.a", b"%d" % v)
                    elif op == "unlink":
                        for (name,) in ix.conn.execute(
                            "SELECT name FROM dentries WHERE inode = ? LIMIT 1", (ino,)
                        ).fetchall():
                            ix.remove_dentry(1, bytes(name))
                            ix.add_nlink(ino, -1, ctime_ns=v)
                    elif op == "state":
                        ix.set_blocks(ino, [(0, D1)])
                        ix.record_blobs([(D1, v)], v)
                        ix.update_file_state(ino, v, v, v, None, v)
                    else:
                        ix.touch_inode(ino, mtime_ns=v, ctime_ns=v)
                        ix.add_nlink(1, 1)
                        raise Boom()
            except (Boom, sqlite3.IntegrityError):  # a name taken twice fails in SQLite
                pass
    crash(ix)
    back = Index(path)
    try:
        assert dump(back.conn) == at_last_persist
        assert logs(path) == []
    finally:
        back.close()


def test_a_new_connection_reads_what_a_live_process_closed(tmp_path: Path) -> None:
    """What a daemon closed before a CLI command opened the store is visible to that
    command's reads: opening waits for the daemon's next commit, without taking a lock."""
    path = tmp_path / "index.sqlite3"
    owner = daemon_index(path)
    try:
        new_file(owner, 1, b"closed")
        owner.persist()
        seen: list[set[bytes]] = []

        def open_and_read() -> None:
            other = Index(path)
            try:
                seen.append(names(other))
            finally:
                other.close()

        reader = threading.Thread(target=open_and_read)
        reader.start()
        reader.join(0.3)
        assert reader.is_alive()  # waiting for the commit
        owner.flush()
        reader.join(5)
        assert seen == [{b"closed"}]
    finally:
        owner.close()
    assert logs(path) == []


def test_a_log_replayed_by_a_live_process_is_applied_once_if_that_one_dies_too(
    tmp_path: Path,
) -> None:
    """B is running when A dies; B applies A's log at its next BEGIN, then appends its own
    change and dies before its next commit. A's statements must not come back twice (from
    A's log and again from B's, which recorded them as it replayed them)."""
    path = tmp_path / "index.sqlite3"
    Index(path, create=True).close()
    b = daemon_index(path)
    a, row = linked_twice(path)
    crash(a)
    with b.txn():
        b.add_nlink(row.id, 1)
    b.persist()
    crash(b)
    c = Index(path)
    try:
        got = c.get_inode(row.id)
        assert got is not None and got.nlink == 3
        assert names(c) == {b"f"}
        assert c.count_inodes() == 1  # the file, once
        assert logs(path) == []
    finally:
        c.close()


@pytest.mark.parametrize("applier", ["a live mount", "a new connection"])
def test_what_a_replay_applies_is_in_the_change_feed_for_every_mount(
    tmp_path: Path, applier: str
) -> None:
    """A dies with closes only in its log. Every mount may hold the old names, attributes
    and pages of what A changed in its kernel cache, the one that applies the log included:
    the replay records them in the feed as nobody's (origin NULL), never as the applier's
    own, which its follower would skip."""
    path = tmp_path / "index.sqlite3"
    Index(path, create=True).close()
    b = daemon_index(path)
    with b.txn():
        b_id = b.register_mount(os.getpid(), "/mnt/b", b.max_change_seq())
        # A's registration outlives it, as a killed daemon's does until the next mount.
        b.register_mount(2**22 + 1, "/mnt/a", 0)
    b.publish_changes(b_id)
    b.flush()
    a, row = linked_twice(path)
    crash(a)
    if applier == "a live mount":
        with b.txn():  # its next BEGIN applies A's log
            pass
        feed = b.changes_after(0, skip_origin=b_id)
    else:
        c = Index(path)
        try:
            feed = c.changes_after(0)
        finally:
            c.close()
    got = {(kind, ino, name) for _, kind, ino, name in feed}
    assert (FEED_ENTRY, 1, b"f") in got  # the name A made
    assert (FEED_INODE, row.id, None) in got  # the link count A raised

    def nobodys() -> int:
        count = b.conn.execute("SELECT count(*) FROM changes WHERE origin IS NULL").fetchone()
        return int(count[0])

    # The replay's triggers are gone: B's own changes are tagged with its origin again.
    before = nobodys()
    with b.txn():
        b.add_nlink(row.id, 1)
    assert nobodys() == before
    assert b.changes_after(0, skip_origin=b_id) == feed
    b.close()


def test_apply_dead_logs_applies_them_without_waiting_for_a_write(tmp_path: Path) -> None:
    """A mount that only reads begins no transaction of its own: its change-feed follower
    calls apply_dead_logs, which replays and commits what a dead daemon closed."""
    path = tmp_path / "index.sqlite3"
    Index(path, create=True).close()
    b = daemon_index(path)
    assert b.apply_dead_logs() is False  # nothing to apply: no transaction either
    assert not b.conn.in_transaction
    a, row = linked_twice(path)
    crash(a)
    assert b.apply_dead_logs() is True
    assert not b.conn.in_transaction  # committed: other processes read it now
    assert logs(path) == [next(p.name for p in redo.redo_dir(path).iterdir())]  # b's own
    reader = Index(path)
    try:
        got = reader.get_inode(row.id)
        assert got is not None and got.nlink == 2 and names(reader) == {b"f"}
    finally:
        reader.close()
    assert b.apply_dead_logs() is False
    b.close()


def test_a_log_being_created_is_never_taken_for_a_dead_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new log is locked before it is named *.log: a scan for dead logs (any BEGIN, a
    follower) made just before the creator takes its lock finds nothing to take."""
    path = tmp_path / "index.sqlite3"
    Index(path, create=True).close()
    d = redo.redo_dir(path)
    real_flock = fcntl.flock
    seen: list[str] = []

    def flock(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX:  # the creator's lock: scan first, as a rival would
            for dead in redo.dead_logs(d, None):
                seen.append(dead.path.name)
                dead.release()
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    made = redo.RedoLog(d)
    monkeypatch.undo()
    assert seen == []
    assert redo.dead_logs(d, None) == []  # and it is locked now
    assert made.path.exists() and made.path.suffix == ".log"
    made.close()


def test_a_creation_cut_short_is_removed_by_the_next_log(tmp_path: Path) -> None:
    """A process that died between creating its log and renaming it left an empty *.new:
    the next process that makes a log removes it, unless it is recent or still locked
    (its creator may be just about to lock and rename it)."""
    d = tmp_path / "redo"
    d.mkdir()
    old = d / "111-deadbeef.new"
    recent = d / "222-cafebabe.new"
    held = d / "333-feedface.new"
    for f in (old, recent, held):
        f.touch()
    for f in (old, held):
        os.utime(f, (1, 1))  # long ago
    holder = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        made = redo.RedoLog(d)
        assert not old.exists()
        assert recent.exists() and held.exists()
        made.close()
    finally:
        os.close(holder)
