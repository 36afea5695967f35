"""The SQLite index without the layers above: migrations, transactions, named queries, and the
invariant queries the core tests rely on."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifactfs.blobs.journal import JournalReader, journal_dir
from artifactfs.errors import StoreTooNew
from artifactfs.index import migrations
from artifactfs.index.db import Index, InodeRow
from artifactfs.index.migrations import MIGRATIONS, migrate, schema_version
from artifactfs.index.schema import SCHEMA_VERSION
from artifactfs.ownedfiles import is_locked

TABLES = {
    "meta",
    "inodes",
    "dentries",
    "sandboxes",
    "scopes",
    "namespaces",
    "blocks",
    "blobs",
    "symlinks",
    "xattrs",
    "events",
    # v2
    "checkpoints",
    "dir_manifests",
    "dirty_dirs",
    "building",
    "changes",
    "mounts",
    # v3
    "credentials",
}
D1, D2, D3 = (bytes([i]) * 32 for i in (1, 2, 3))


class Boom(Exception):
    pass


def tables(conn: sqlite3.Connection) -> set[str]:
    return {
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not r[0].startswith("sqlite_")
    }


def schema_text(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return sorted((r[0], r[1] or "") for r in conn.execute("SELECT name, sql FROM sqlite_master"))


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "index.sqlite3"


@pytest.fixture
def index(db_path: Path) -> Iterator[Index]:
    ix = Index(db_path, create=True)
    yield ix
    ix.close()


def new_inode(
    ix: Index, *, kind: int = 5, nlink: int = 1, mode: int = stat.S_IFREG | 0o644, size: int = 0
) -> InodeRow:
    with ix.txn():
        return ix.insert_inode(
            kind=kind, mode=mode, uid=1, gid=2, nlink=nlink, time_ns=7, namespace_id=None, size=size
        )


def root(ix: Index) -> InodeRow:
    with ix.txn():
        return ix.insert_inode(
            ino=1,
            kind=0,
            mode=stat.S_IFDIR | 0o755,
            uid=0,
            gid=0,
            nlink=2,
            time_ns=1,
            namespace_id=None,
        )


# ---- migrations -----------------------------------------------------------------------------


def test_migrations_cover_every_version() -> None:
    assert sorted(MIGRATIONS) == list(range(SCHEMA_VERSION))


def test_migrate_empty_database_to_current(db_path: Path) -> None:
    ix = Index(db_path, create=True)
    try:
        assert ix.start_version == 0
        assert schema_version(ix.conn) == SCHEMA_VERSION
        assert tables(ix.conn) == TABLES
    finally:
        ix.close()


def test_reopen_is_a_no_op(db_path: Path) -> None:
    Index(db_path, create=True).close()
    with raw(db_path) as c:
        before = schema_text(c)
    ix = Index(db_path)
    try:
        assert ix.start_version == SCHEMA_VERSION
        assert schema_version(ix.conn) == SCHEMA_VERSION
        assert schema_text(ix.conn) == before
    finally:
        ix.close()


def test_open_missing_without_create(db_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Index(db_path)
    assert not db_path.exists()


@pytest.mark.parametrize("start", sorted(MIGRATIONS))
def test_each_migration_step(db_path: Path, start: int) -> None:
    conn = raw(db_path)
    try:
        migrate(conn, target=start)
        assert schema_version(conn) == start
        assert migrate(conn, target=start + 1) == start
        assert schema_version(conn) == start + 1
    finally:
        conn.close()
    if start + 1 == SCHEMA_VERSION:
        ix = Index(db_path)
        try:
            assert tables(ix.conn) == TABLES
        finally:
            ix.close()


def test_newer_database_is_refused(db_path: Path) -> None:
    Index(db_path, create=True).close()
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreTooNew):
        Index(db_path)
    conn = raw(db_path)
    try:
        assert schema_version(conn) == SCHEMA_VERSION + 1
    finally:
        conn.close()


def test_failing_first_step_rolls_back(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise Boom("step failed")

    monkeypatch.setitem(migrations.MIGRATIONS, 0, failing)
    with pytest.raises(Boom):
        Index(db_path, create=True)
    conn = raw(db_path)
    try:
        assert schema_version(conn) == 0
        assert tables(conn) == set()
    finally:
        conn.close()


def test_failing_later_step_keeps_earlier_steps(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE inodes ADD COLUMN half_done INTEGER")
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise Boom("step failed")

    monkeypatch.setitem(migrations.MIGRATIONS, SCHEMA_VERSION, failing)
    conn = raw(db_path)
    try:
        with pytest.raises(Boom):
            migrate(conn, target=SCHEMA_VERSION + 1)
        assert schema_version(conn) == SCHEMA_VERSION
        assert tables(conn) == TABLES
        cols = [r[1] for r in conn.execute("PRAGMA table_info(inodes)")]
        assert "half_done" not in cols
        assert not conn.in_transaction
    finally:
        conn.close()


def test_wal_mode(index: Index, db_path: Path) -> None:
    assert index.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn = raw(db_path)
    try:  # WAL is a property of the file, seen by every connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


# ---- transactions ---------------------------------------------------------------------------


def test_txn_commits(index: Index, db_path: Path) -> None:
    with index.txn():
        index.set_meta("k", "v")
    conn = raw(db_path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'k'").fetchone() == ("v",)
    finally:
        conn.close()


def test_txn_rolls_back_on_exception(index: Index) -> None:
    with index.txn():
        index.set_meta("k", "old")
    with pytest.raises(Boom), index.txn():
        index.set_meta("k", "new")
        index.set_meta("other", "x")
        raise Boom()
    assert index.get_meta("k") == "old"
    assert index.get_meta("other") is None
    assert not index.conn.in_transaction
    with index.txn():  # usable again afterwards
        index.set_meta("k", "newer")
    assert index.get_meta("k") == "newer"


def test_nested_txn_joins_outer(index: Index, db_path: Path) -> None:
    other = raw(db_path)
    try:
        with index.txn():
            with index.txn():
                index.set_meta("inner", "1")
            # The inner block did not commit on its own.
            assert other.execute("SELECT 1 FROM meta WHERE key = 'inner'").fetchone() is None
            assert index.conn.in_transaction
            index.set_meta("outer", "1")
        rows = other.execute("SELECT key FROM meta ORDER BY key").fetchall()
        assert rows == [("inner",), ("outer",)]
    finally:
        other.close()


def test_nested_txn_failure_rolls_back_outer(index: Index) -> None:
    with pytest.raises(Boom), index.txn():
        index.set_meta("outer", "1")
        with index.txn():
            index.set_meta("inner", "1")
            raise Boom()
    assert index.get_meta("outer") is None
    assert index.get_meta("inner") is None
    assert not index.conn.in_transaction
    with index.txn():
        index.set_meta("after", "1")
    assert index.get_meta("after") == "1"


def _deferred_constraint(conn: sqlite3.Connection) -> None:
    """A table whose foreign key is checked only at COMMIT: a way to make COMMIT fail."""
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE c (pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)")


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
def test_failed_commit_rolls_back_and_index_stays_usable(index: Index, group: bool) -> None:
    """COMMIT itself can fail (here a deferred constraint; in the field SQLITE_FULL or IOERR,
    after which SQLite may leave the transaction open): the failed work must be rolled back so
    that the next operation can begin, or every later call fails ("cannot start a transaction
    within a transaction", or every later group commit failing again) until the daemon
    restarts."""
    conn = index.conn
    _deferred_constraint(conn)
    index.group_commit = group
    try:
        with pytest.raises(sqlite3.IntegrityError):
            with index.txn():
                index.set_meta("k", "v")
                conn.execute("INSERT INTO c VALUES (42)")  # violates the constraint at COMMIT
            index.flush()
        assert not conn.in_transaction
        assert index.get_meta("k") is None
        with index.txn():
            index.set_meta("after", "1")
        index.flush()
        assert index.get_meta("after") == "1"
        assert not conn.in_transaction
    finally:
        if conn.in_transaction:  # leave the fixture a connection it can close
            conn.execute("ROLLBACK")
        index.group_commit = False


# ---- group commit (the daemon's mode) -------------------------------------------------------


@pytest.fixture
def grouped(index: Index) -> Index:
    index.group_commit = True
    return index


def test_group_units_are_committed_by_flush(grouped: Index, db_path: Path) -> None:
    other = raw(db_path)
    try:
        with grouped.txn():
            grouped.set_meta("a", "1")
        with grouped.txn():
            grouped.set_meta("b", "2")
        assert grouped.get_meta("a") == "1"  # visible to its own connection at once
        assert other.execute("SELECT count(*) FROM meta WHERE key IN ('a', 'b')").fetchone() == (0,)
        grouped.flush()
        assert not grouped.conn.in_transaction
        assert other.execute("SELECT count(*) FROM meta WHERE key IN ('a', 'b')").fetchone() == (2,)
    finally:
        other.close()


def test_group_failed_unit_rolls_back_only_itself(grouped: Index) -> None:
    with grouped.txn():
        grouped.set_meta("kept", "1")
    with pytest.raises(Boom), grouped.txn():
        grouped.set_meta("lost", "1")
        with grouped.txn():  # nested: joins the unit
            grouped.set_meta("lost-too", "1")
        raise Boom()
    with grouped.txn():
        grouped.set_meta("after", "1")
    grouped.flush()
    assert grouped.get_meta("kept") == "1" and grouped.get_meta("after") == "1"
    assert grouped.get_meta("lost") is None and grouped.get_meta("lost-too") is None


def test_group_flushes_after_max_units(grouped: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    from artifactfs.index import db

    monkeypatch.setattr(db, "GROUP_COMMIT_MAX_UNITS", 3)
    for i in range(3):
        assert i == 0 or grouped.conn.in_transaction
        with grouped.txn():
            grouped.set_meta(f"k{i}", "1")
    assert not grouped.conn.in_transaction


def test_group_make_durable_and_close_commit(grouped: Index, db_path: Path) -> None:
    with grouped.txn():
        grouped.set_meta("durable", "1")
    grouped.make_durable()
    assert not grouped.conn.in_transaction
    with grouped.txn():
        grouped.set_meta("closed", "1")
    grouped.close()
    conn = raw(db_path)
    try:
        rows = conn.execute("SELECT key FROM meta WHERE key IN ('durable', 'closed')").fetchall()
        assert sorted(rows) == [("closed",), ("durable",)]
    finally:
        conn.close()
    grouped.conn = sqlite3.connect(db_path)  # let the fixture close something


def test_checkpoint_folds_the_wal(index: Index, db_path: Path) -> None:
    index.defer_checkpoints()
    with index.txn():
        for i in range(200):
            index.set_meta(f"k{i}", "x" * 100)
    frames, done = index.checkpoint()
    assert frames > 0 and done == frames
    conn = raw(db_path)
    try:
        assert conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone() == (200,)
    finally:
        conn.close()


def test_wal_starts_again_during_a_burst_of_group_commits(grouped: Index, db_path: Path) -> None:
    """The group transaction begins again right after each commit, as under a steady stream of
    writes; checkpoints run meanwhile from the worker's connection. Past `wal_reset_bytes`
    the WAL must start again from its beginning instead of growing with every commit."""
    grouped.defer_checkpoints()
    grouped.wal_reset_bytes = 256 << 10
    wal = db_path.with_name(db_path.name + "-wal")
    for i in range(300):
        with grouped.txn():
            grouped.set_meta(f"k{i % 10}", f"{i:08d}" * 1000)  # overflow pages
        grouped.flush()
        with grouped.txn():  # the next unit, at once
            grouped.set_meta("busy", str(i))
        grouped.checkpoint()
    grouped.flush()
    assert wal.stat().st_size < 1 << 20  # 300 commits of 3+ pages: 4 MB without restarts
    assert grouped.get_meta("k9") == f"{299:08d}" * 1000
    conn = raw(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT value FROM meta WHERE key = 'busy'").fetchone() == ("299",)
    finally:
        conn.close()


def test_a_wal_started_again_is_cut_back_first(grouped: Index, db_path: Path) -> None:
    """When the WAL starts again from its beginning, the file is cut back first, so new
    frames are appended instead of written over old ones: frames are not page-aligned, and
    writing over a WAL page no longer in the page cache (after `drop_caches`, or under memory
    pressure) read it from the disk first, on the trio thread."""
    grouped.defer_checkpoints()
    grouped.wal_reset_bytes = 1 << 40  # no new start while the WAL grows
    wal = db_path.with_name(db_path.name + "-wal")
    for i in range(100):
        with grouped.txn():
            grouped.set_meta(f"k{i % 10}", f"{i:08d}" * 1000)
        grouped.flush()
    assert wal.stat().st_size > 1 << 20
    grouped.wal_reset_bytes = 256 << 10
    grouped.checkpoint()  # caught up and past the limit: the next flush starts it again
    with grouped.txn():
        grouped.set_meta("busy", "1")
    grouped.flush()
    with grouped.txn():
        grouped.set_meta("after", "1")
    grouped.flush()
    assert wal.stat().st_size < 64 << 10
    assert grouped.get_meta("k9") == f"{99:08d}" * 1000


def test_make_durable_keeps_data(index: Index) -> None:
    with index.txn():
        index.set_meta("store_id", "abc")
    index.make_durable()
    assert index.get_meta("store_id") == "abc"
    assert index.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # back to NORMAL


# ---- inodes ---------------------------------------------------------------------------------


def test_inode_round_trip(index: Index) -> None:
    row = new_inode(index, size=10)
    assert index.get_inode(row.id) == row
    row.mode = stat.S_IFREG | 0o600
    row.uid, row.gid, row.nlink, row.size = 5, 6, 3, 99
    row.atime_ns, row.mtime_ns, row.ctime_ns = 11, 12, 13
    row.sha256 = D1
    with index.txn():
        index.update_inode(row)
    assert index.get_inode(row.id) == row
    assert index.get_inode(row.id + 1000) is None


def test_inode_numbers_are_never_reused(index: Index) -> None:
    a = new_inode(index)
    b = new_inode(index)
    with index.txn():
        index.delete_inode(b.id)
    c = new_inode(index)
    assert c.id > b.id > a.id


def test_delete_inode_removes_what_hangs_off_it(index: Index) -> None:
    row = new_inode(index, size=5)
    with index.txn():
        index.set_blocks(row.id, [(0, D1)])
        index.set_xattr(row.id, b"user.a", b"1")
        index.set_symlink(row.id, b"target")
        index.delete_inode(row.id)
    assert index.get_inode(row.id) is None
    assert index.block_map(row.id) == {}
    assert index.list_xattrs(row.id) == []
    assert index.get_symlink(row.id) is None


def test_nlink_and_times(index: Index) -> None:
    row = new_inode(index)
    with index.txn():
        index.add_nlink(row.id, 2)
        index.add_nlink(row.id, -1, ctime_ns=50)
        index.touch_inode(row.id, mtime_ns=None, ctime_ns=60)
    got = index.get_inode(row.id)
    assert got is not None
    assert (got.nlink, got.ctime_ns, got.mtime_ns) == (2, 60, 7)
    with index.txn():
        index.touch_inode(row.id, mtime_ns=70, ctime_ns=71)
        index.update_file_state(row.id, 123, 80, 81, D2, 4096)
    got = index.get_inode(row.id)
    assert got is not None
    assert (got.size, got.mtime_ns, got.ctime_ns, got.sha256, got.stored) == (123, 80, 81, D2, 4096)


def test_unlinked_inodes(index: Index) -> None:
    a = new_inode(index)
    b = new_inode(index, nlink=0)
    assert index.unlinked_inodes() == [b.id]
    assert index.count_inodes() == 2
    assert a.id not in index.unlinked_inodes()


# ---- directory entries ----------------------------------------------------------------------


def test_dentries(index: Index) -> None:
    r = root(index)
    d = new_inode(index, kind=4, nlink=2, mode=stat.S_IFDIR | 0o755)
    f = new_inode(index)
    with index.txn():
        index.add_dentry(r.id, b"d", d.id)
        index.add_dentry(d.id, b"f", f.id)
        index.add_dentry(d.id, b"\xff\xfe", f.id)  # names are bytes, not text
    assert index.lookup_child(r.id, b"d") == d.id
    assert index.lookup_child(r.id, b"nope") is None
    assert index.lookup_child_inode(d.id, b"f") == f
    assert index.lookup_child_inode(d.id, b"\xff\xfe") == f
    assert index.lookup_child_inode(d.id, b"g") is None
    assert index.count_dentries(f.id) == 2
    assert index.parent_of(d.id) == (r.id, b"d")
    assert index.parent_of(r.id) is None
    assert index.has_children(d.id)
    assert not index.has_children(f.id)
    with pytest.raises(sqlite3.IntegrityError), index.txn():
        index.add_dentry(d.id, b"f", d.id)
    with index.txn():
        index.move_dentry(d.id, b"f", r.id, b"g")
    assert index.lookup_child(d.id, b"f") is None
    assert index.lookup_child(r.id, b"g") == f.id
    with index.txn():
        index.set_dentry_inode(r.id, b"g", d.id)
    assert index.lookup_child(r.id, b"g") == d.id
    with index.txn():
        index.remove_dentry(r.id, b"g")
        index.remove_dentry(d.id, b"\xff\xfe")
    assert index.lookup_child(r.id, b"g") is None
    assert not index.has_children(d.id)
    assert index.count_dentries(f.id) == 0


def test_list_children_paging(index: Index) -> None:
    r = root(index)
    f = new_inode(index)
    names = [f"n{i:02d}".encode() for i in range(25)]
    with index.txn():
        for n in reversed(names):  # listing follows creation order, not name order
            index.add_dentry(r.id, n, f.id)
    pages: list[list[bytes]] = []
    after = 0
    while True:
        page = index.list_children(r.id, after=after, limit=10)
        if not page:
            break
        pages.append([name for _, name, _ in page])
        assert all(row == f for _, _, row in page)
        ids = [i for i, _, _ in page]
        assert ids == sorted(ids) and ids[0] > after
        after = ids[-1]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [n for p in pages for n in p] == list(reversed(names))
    assert index.list_children(r.id, after=after) == []
    assert index.list_children(f.id) == []


def test_list_children_resume_after_removal(index: Index) -> None:
    r = root(index)
    f = new_inode(index)
    with index.txn():
        for n in (b"a", b"b", b"c", b"d"):
            index.add_dentry(r.id, n, f.id)
    first = index.list_children(r.id, limit=2)
    with index.txn():
        index.remove_dentry(r.id, b"b")  # already listed
        index.remove_dentry(r.id, b"c")  # not yet listed
    rest = index.list_children(r.id, after=first[-1][0])
    assert [n for _, n, _ in first] == [b"a", b"b"]
    assert [n for _, n, _ in rest] == [b"d"]


# ---- block maps and blobs -------------------------------------------------------------------


def test_block_maps(index: Index) -> None:
    f = new_inode(index, size=5 * 4096)
    with index.txn():
        index.set_blocks(f.id, [(0, D1), (1, D2), (3, D1), (4, D3)])
    assert index.block_map(f.id) == {0: D1, 1: D2, 3: D1, 4: D3}
    assert index.block_stats(f.id) == (4, 4)
    assert index.count_block_refs(D1) == 2
    with index.txn():
        index.set_blocks(f.id, [(1, None), (2, D3), (0, D2)])  # hole, new block, replace
    assert index.block_map(f.id) == {0: D2, 2: D3, 3: D1, 4: D3}
    with index.txn():
        index.drop_blocks_from(f.id, 3)
    assert index.block_map(f.id) == {0: D2, 2: D3}
    assert index.block_stats(f.id) == (2, 2)
    g = new_inode(index)
    assert index.block_stats(g.id) == (0, -1)
    with index.txn():
        index.copy_blocks(f.id, g.id)
    assert index.block_map(g.id) == {0: D2, 2: D3}
    with index.txn():
        index.drop_blocks_from(f.id, 0)
    assert index.block_map(f.id) == {}
    assert index.block_map(g.id) == {0: D2, 2: D3}


def test_blobs_recorded_once(index: Index) -> None:
    assert index.stored_bytes() == (0, 0)
    with index.txn():
        index.record_blobs([(D1, 100), (D2, 50)], 1)
        index.record_blobs([(D1, 100)], 2)
    assert index.known_blob(D1) and index.known_blob(D2)
    assert not index.known_blob(D3)
    assert index.stored_bytes() == (2, 150)


# ---- symlinks and xattrs --------------------------------------------------------------------


def test_symlinks(index: Index) -> None:
    s = new_inode(index, kind=6, mode=stat.S_IFLNK | 0o777)
    with index.txn():
        index.set_symlink(s.id, b"../some/\xfftarget")
    assert index.get_symlink(s.id) == b"../some/\xfftarget"
    assert index.get_symlink(s.id + 1) is None


def test_xattrs(index: Index) -> None:
    f = new_inode(index)
    g = new_inode(index)
    assert index.get_xattr(f.id, b"user.a") is None
    with index.txn():
        index.set_xattr(f.id, b"user.b", b"two")
        index.set_xattr(f.id, b"user.a", b"")
        index.set_xattr(f.id, b"user.b", b"\x00binary\xff")
        index.set_xattr(g.id, b"user.a", b"other")
    assert index.get_xattr(f.id, b"user.a") == b""
    assert index.get_xattr(f.id, b"user.b") == b"\x00binary\xff"
    assert index.list_xattrs(f.id) == [b"user.a", b"user.b"]
    assert index.xattr_total(f.id) == len(b"user.a") + len(b"user.b") + len(b"\x00binary\xff")
    with index.txn():
        assert index.remove_xattr(f.id, b"user.a") is True
        assert index.remove_xattr(f.id, b"user.a") is False
    assert index.list_xattrs(f.id) == [b"user.b"]
    assert index.get_xattr(g.id, b"user.a") == b"other"
    assert index.xattr_total(new_inode(index).id) == 0


# ---- grid rows ------------------------------------------------------------------------------


def test_grid_rows(index: Index) -> None:
    sbi = new_inode(index, kind=1, nlink=2, mode=stat.S_IFDIR | 0o755)
    sci = new_inode(index, kind=2, nlink=2, mode=stat.S_IFDIR | 0o755)
    nsi = new_inode(index, kind=3, nlink=2, mode=stat.S_IFDIR | 0o755)
    with index.txn():
        sb = index.insert_sandbox("acme", sbi.id, 1)
        sc = index.insert_scope(sb, "user", "alice", "user-alice", sci.id, 2)
        ns = index.insert_namespace("pub", sc, "workspace", "0", "ws", nsi.id, 3)
    assert index.sandbox_by_inode(sbi.id) == index.sandbox_by_id(sb)
    scope = index.scope_by_inode(sci.id)
    assert scope is not None and (scope.kind, scope.owner, scope.name) == (
        "user",
        "alice",
        "user-alice",
    )
    assert index.scope_by_id(sc) == scope
    nsrow = index.namespace_by_root(nsi.id)
    assert nsrow is not None and nsrow == index.namespace_by_id(ns)
    assert (nsrow.public_id, nsrow.kind, nsrow.name) == ("pub", "workspace", "ws")
    got = index.get_inode(nsi.id)
    assert got is not None and got.namespace_id == ns
    with index.txn():
        index.rename_namespace(ns, "ws2")
        index.rename_sandbox(sb, "acme2")
    assert index.namespace_by_id(ns).name == "ws2"  # type: ignore[union-attr]
    assert index.sandbox_by_id(sb).name == "acme2"  # type: ignore[union-attr]
    assert index.count_namespaces() == 1
    with pytest.raises(sqlite3.IntegrityError), index.txn():
        index.insert_namespace("pub2", sc, "blob", "0", "ws2", sbi.id, 4)
    with index.txn():
        index.delete_namespace(ns)
        index.delete_scope(sc)
        index.delete_sandbox(sb)
    assert index.count_namespaces() == 0
    assert index.scope_by_id(sc) is None and index.sandbox_by_id(sb) is None


# ---- events ---------------------------------------------------------------------------------


def test_events_cbor_round_trip_and_order(index: Index, db_path: Path) -> None:
    payloads: list[dict[str, Any]] = [
        {"id": "abc", "n": 1, "nested": {"list": [1, "two", b"\x00\xff"]}, "none": None},
        {"big": 2**40, "neg": -5, "float": 1.5, "bool": True},
        {},
    ]
    with index.txn():
        seqs = [
            index.append_event("namespace.create", payloads[0], "acme"),
            index.append_event("mount.start", payloads[1]),
            index.append_event("namespace.destroy", payloads[2], "acme"),
        ]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    evs = index.events()
    assert [e.seq for e in evs] == seqs
    assert [e.payload for e in evs] == payloads
    assert [e.type for e in evs] == ["namespace.create", "mount.start", "namespace.destroy"]
    assert [e.sandbox for e in evs] == ["acme", None, "acme"]
    assert all(e.time_ns > 0 for e in evs)
    assert [e.time_ns for e in evs] == sorted(e.time_ns for e in evs)
    # Stored as CBOR bytes, readable by any CBOR decoder.
    conn = raw(db_path)
    try:
        blob = conn.execute("SELECT payload FROM events WHERE seq = ?", (seqs[0],)).fetchone()[0]
    finally:
        conn.close()
    assert isinstance(blob, bytes) and cbor2.loads(blob) == payloads[0]


def test_events_after_and_type_prefix(index: Index) -> None:
    with index.txn():
        a = index.append_event("namespace.create", {"i": 1})
        index.append_event("mount.start", {"i": 2})
        c = index.append_event("namespace.rename", {"i": 3})
    assert [e.payload["i"] for e in index.events(after=a)] == [2, 3]
    assert [e.seq for e in index.events(type_prefix="namespace.")] == [a, c]
    assert [e.seq for e in index.events(after=a, type_prefix="namespace.")] == [c]
    assert index.events(type_prefix="checkpoint.") == []


def test_events_type_prefix_is_literal(index: Index) -> None:
    """A prefix is matched literally: LIKE wildcards and case folding must not widen it."""
    with index.txn():
        index.append_event("namespaceXcreate", {})
        index.append_event("Namespace.create", {})
        index.append_event("namespace.create", {})
    assert [e.type for e in index.events(type_prefix="namespace_")] == []
    assert [e.type for e in index.events(type_prefix="namespace.")] == ["namespace.create"]


def test_events_are_append_only_in_order(index: Index) -> None:
    with index.txn():
        for i in range(50):
            index.append_event("t", {"i": i})
    assert [e.payload["i"] for e in index.events()] == list(range(50))


# ---- invariant queries ----------------------------------------------------------------------


def test_invariant_queries_clean_tree(index: Index) -> None:
    r = root(index)
    d = new_inode(index, kind=4, nlink=2, mode=stat.S_IFDIR | 0o755)
    f = new_inode(index, nlink=2)
    with index.txn():
        index.add_dentry(r.id, b"d", d.id)
        index.add_nlink(r.id, 1)
        index.add_dentry(d.id, b"f", f.id)
        index.add_dentry(r.id, b"g", f.id)
        index.set_blocks(f.id, [(0, D1)])
        index.record_blobs([(D1, 10)], 1)
    assert index.link_count_mismatches() == []
    assert index.dangling_dentries() == []
    assert index.unknown_block_digests() == []


def test_invariant_queries_find_damage(index: Index) -> None:
    r = root(index)
    d = new_inode(index, kind=4, nlink=2, mode=stat.S_IFDIR | 0o755)
    f = new_inode(index, nlink=1)
    with index.txn():
        index.add_dentry(r.id, b"d", d.id)  # root nlink not raised: 2, expected 3
        index.add_dentry(d.id, b"f", f.id)
        index.add_dentry(d.id, b"f2", f.id)  # f has 2 names, nlink 1
        index.add_dentry(d.id, b"ghost", 9999)
        index.set_blocks(f.id, [(0, D1), (1, D2)])
        index.record_blobs([(D1, 10)], 1)
    assert sorted(index.link_count_mismatches()) == [(r.id, 2, 3), (f.id, 1, 2)]
    assert index.dangling_dentries() == [(d.id, b"ghost", 9999)]
    assert index.unknown_block_digests() == [D2]


def test_v1_data_survives_migration_and_is_tracked(db_path: Path) -> None:
    """A store made by version 1 moves to version 2 with its data, and changes made after
    the migration mark directories dirty (the v2 triggers apply to old rows too)."""
    conn = raw(db_path)
    try:
        migrate(conn, target=1)
        conn.execute(
            "INSERT INTO inodes (id, kind, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns, "
            "btime_ns, namespace_id) VALUES (10, 3, 16877, 0, 0, 3, 1, 1, 1, 1, 7), "
            "(11, 4, 16877, 0, 0, 2, 1, 1, 1, 1, 7), (12, 5, 33188, 0, 0, 1, 1, 1, 1, 1, 7)"
        )
        conn.execute(
            "INSERT INTO dentries (parent, name, inode) VALUES (10, X'64', 11), (11, X'66', 12)"
        )
    finally:
        conn.close()
    ix = Index(db_path)
    try:
        assert ix.start_version == 1 and schema_version(ix.conn) == SCHEMA_VERSION
        assert ix.children(10)[0][0] == b"d"
        with ix.txn():
            ix.set_clean(10, D1, 1, 0)
            ix.set_clean(11, D2, 1, 0)
        assert ix.dir_state(10) is not None and ix.dir_state(11) is not None
        with ix.txn():
            ix.touch_inode(12, mtime_ns=5, ctime_ns=5)
        assert ix.dir_state(11) is None and ix.dir_state(10) is None
    finally:
        ix.close()


def test_v5_moves_journalled_blocks_out_of_the_index(db_path: Path) -> None:
    """Blocks a version-4 daemon journalled in `pending_blobs` and never stored are written
    to a journal segment nobody holds (the next daemon to start adopts and stores them)
    before the table is dropped."""
    data = b"journalled before the upgrade"
    digest = hashlib.sha256(data).digest()
    conn = raw(db_path)
    try:
        migrate(conn, target=4)
        conn.execute("INSERT INTO pending_blobs (digest, data) VALUES (?, ?)", (digest, data))
    finally:
        conn.close()
    ix = Index(db_path)
    try:
        assert ix.start_version == 4 and "pending_blobs" not in tables(ix.conn)
    finally:
        ix.close()
    segments = list(journal_dir(db_path.parent).glob("*.jnl"))
    assert len(segments) == 1 and not is_locked(str(segments[0]))
    assert JournalReader(journal_dir(db_path.parent)).get(digest) == data


# ---- the inode row cache ----------------------------------------------------------------------


@pytest.mark.parametrize("group", [False, True])
def test_row_cache_sees_commits_of_other_connections(db_path: Path, group: bool) -> None:
    """A row cached by one connection is not served after another connection changed it."""
    ix = Index(db_path, create=True)
    ix.group_commit = group
    other = raw(db_path)
    try:
        row = new_inode(ix)
        with ix.txn():
            assert ix.get_inode(row.id) == row  # cached now
            assert ix.get_inode(row.id) == row
        ix.flush()
        other.execute("UPDATE inodes SET mode = ?, nlink = 9 WHERE id = ?", (0o100600, row.id))
        # Outside a transaction: straight from the table.
        got = ix.get_inode(row.id)
        assert got is not None and got.mode == 0o100600 and got.nlink == 9
        other.execute("UPDATE inodes SET uid = 77 WHERE id = ?", (row.id,))
        with ix.txn():  # the BEGIN sees data_version move and drops the cache
            got = ix.get_inode(row.id)
            assert got is not None and got.uid == 77
        ix.flush()
        assert ix.row_cache_mismatches() == []
    finally:
        other.close()
        ix.close()


@pytest.mark.parametrize("group", [False, True])
def test_row_cache_forgets_rolled_back_writes(db_path: Path, group: bool) -> None:
    ix = Index(db_path, create=True)
    ix.group_commit = group
    try:
        row = new_inode(ix)
        with pytest.raises(Boom), ix.txn():
            changed = ix.get_inode(row.id)
            assert changed is not None
            changed.mode, changed.nlink = stat.S_IFREG | 0o600, 5
            ix.update_inode(changed)
            ix.add_nlink(row.id, 1, ctime_ns=99)
            ix.touch_inode(row.id, mtime_ns=98, ctime_ns=99)
            got = ix.get_inode(row.id)
            assert got is not None and (got.nlink, got.mtime_ns, got.ctime_ns) == (6, 98, 99)
            raise Boom()
        with ix.txn():
            assert ix.get_inode(row.id) == row
        ix.flush()
        assert ix.row_cache_mismatches() == []
    finally:
        ix.close()


def test_row_cache_follows_every_write(grouped: Index) -> None:
    """Each statement that writes `inodes` keeps the cached row equal to the table."""
    ix = grouped
    with ix.txn():
        row = ix.insert_inode(
            kind=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2, nlink=1, time_ns=7,
            namespace_id=None, sha256=D1,
        )
        ix.get_inode(row.id)
    steps = [
        lambda: ix.update_file_state(row.id, 10, 20, 30, D2, 4096),
        lambda: ix.set_sha256(row.id, D3),
        lambda: ix.update_file_state(row.id, 11, 21, 31, None, 4096),
        lambda: ix.set_sha256_if_unchanged(row.id, D1, 11, 21),
        lambda: ix.touch_inode(row.id, mtime_ns=None, ctime_ns=40),
        lambda: ix.touch_inode(row.id, mtime_ns=41, ctime_ns=42),
        lambda: ix.add_nlink(row.id, 2),
        lambda: ix.add_nlink(row.id, -1, ctime_ns=50),
        lambda: ix.update_inode(
            InodeRow(row.id, 5, 0o100600, 3, 4, 2, 12, 0, 1, 2, 3, 0, None, D2)
        ),
        lambda: ix.write_inode_exact(
            InodeRow(row.id, 5, 0o100640, 5, 6, 2, 13, 0, 4, 5, 6, 7, None, None, 8192)
        ),
        lambda: ix.delete_inode(row.id),
    ]
    for step in steps:
        with ix.txn():
            ix.get_inode(row.id)  # cache it (again) before each write
            step()
            assert ix.row_cache_mismatches() == [], step
        ix.flush()
    with ix.txn():
        assert ix.get_inode(row.id) is None


# ---- deferred write-back of inode rows (group commit) -----------------------------------------


def table_row(path: Path, ino: int) -> tuple[Any, ...] | None:
    """The row as another connection sees it (committed state only)."""
    conn = raw(path)
    try:
        row = conn.execute(
            "SELECT mode, uid, nlink, size, mtime_ns, ctime_ns, stored FROM inodes WHERE id = ?",
            (ino,),
        ).fetchone()
        return None if row is None else tuple(row)
    finally:
        conn.close()


def test_deferred_row_is_served_then_written_before_any_statement_on_inodes(
    grouped: Index, db_path: Path
) -> None:
    ix = grouped
    row = new_inode(ix)
    ix.flush()
    with ix.txn():
        ix.get_inode(row.id)  # cached
    changed = ix.get_inode(row.id)
    assert changed is not None
    changed.mode, changed.uid = stat.S_IFREG | 0o600, 42
    ix.defer_inode(changed)
    ix.update_file_state(row.id, 123, 5, 6, None, 4096)
    assert set(ix.conn.deferred) == {row.id}
    # This connection sees it at once, through the cache...
    got = ix.get_inode(row.id)
    assert got is not None and (got.mode, got.uid, got.size, got.stored) == (
        stat.S_IFREG | 0o600, 42, 123, 4096
    )
    # ...and any statement naming `inodes` first writes it back (here a join of a listing).
    mode, size = ix.conn.execute(
        "SELECT i.mode, i.size FROM inodes i WHERE i.id = ?", (row.id,)
    ).fetchone()
    assert (mode, size) == (stat.S_IFREG | 0o600, 123)
    assert ix.conn.deferred == {}
    ix.flush()
    assert table_row(db_path, row.id) == (stat.S_IFREG | 0o600, 42, 1, 123, 5, 6, 4096)
    assert ix.row_cache_mismatches() == []


def test_deferred_rows_are_committed_by_flush_in_one_statement(
    grouped: Index, db_path: Path
) -> None:
    ix = grouped
    rows = [new_inode(ix) for _ in range(3)]
    ix.flush()
    statements: list[str] = []
    with ix.txn():
        for r in rows:
            ix.get_inode(r.id)
    ix.conn.set_trace_callback(statements.append)
    for i, r in enumerate(rows):
        for t in range(4):  # tar: chown, chmod, utimes... of each file
            ix.touch_inode(r.id, mtime_ns=100 * i + t, ctime_ns=100 * i + t)
    assert not any("inodes" in s for s in statements)
    ix.flush()
    ix.conn.set_trace_callback(None)
    # One UPDATE per row (SQLite's trace may report a statement with triggers twice).
    assert len({s for s in statements if s.startswith("UPDATE inodes")}) == 3
    for i, r in enumerate(rows):
        got = table_row(db_path, r.id)
        assert got is not None and got[4:6] == (100 * i + 3, 100 * i + 3)


def test_unit_rollback_restores_rows_deferred_before_it(grouped: Index, db_path: Path) -> None:
    """A row deferred before a unit, written back inside it (a statement named inodes) and
    rolled back with it, is deferred again with its value from before the unit."""
    ix = grouped
    row = new_inode(ix)
    other = new_inode(ix)
    with ix.txn():
        ix.get_inode(row.id)
        ix.get_inode(other.id)
    ix.touch_inode(row.id, mtime_ns=11, ctime_ns=12)  # deferred, outside any unit
    with pytest.raises(Boom), ix.txn():
        ix.touch_inode(row.id, mtime_ns=21, ctime_ns=22)  # deferred again, inside
        ix.touch_inode(other.id, mtime_ns=31, ctime_ns=32)  # first deferred inside
        ix.add_nlink(other.id, 5)
        ix.conn.execute("SELECT count(*) FROM inodes").fetchone()  # writes them back
        ix.touch_inode(row.id, mtime_ns=41, ctime_ns=42)
        raise Boom()
    got = ix.get_inode(row.id)
    assert got is not None and (got.mtime_ns, got.ctime_ns) == (11, 12)
    got = ix.get_inode(other.id)
    assert got is not None and (got.nlink, got.mtime_ns) == (1, 7)
    ix.flush()
    assert table_row(db_path, row.id) == (stat.S_IFREG | 0o644, 1, 1, 0, 11, 12, 0)
    assert table_row(db_path, other.id) == (stat.S_IFREG | 0o644, 1, 1, 0, 7, 7, 0)
    assert ix.row_cache_mismatches() == []


def test_failed_unit_after_deferral_keeps_the_group_usable(grouped: Index, db_path: Path) -> None:
    """A constraint error inside a unit (the statement fails, the unit rolls back) leaves
    the rows deferred before it intact and later units work."""
    ix = grouped
    parent = new_inode(ix, kind=4, nlink=2, mode=stat.S_IFDIR | 0o755)
    child = new_inode(ix)
    with ix.txn():
        ix.add_dentry(parent.id, b"a", child.id)
        ix.get_inode(parent.id)
    ix.touch_inode(parent.id, mtime_ns=50, ctime_ns=51)
    with pytest.raises(sqlite3.IntegrityError), ix.txn():
        ix.touch_inode(parent.id, mtime_ns=60, ctime_ns=61)
        ix.add_dentry(parent.id, b"a", child.id)  # taken
    with ix.txn():
        ix.touch_inode(parent.id, mtime_ns=70, ctime_ns=71)
    ix.flush()
    assert table_row(db_path, parent.id) == (stat.S_IFDIR | 0o755, 1, 2, 0, 70, 71, 0)
    assert ix.row_cache_mismatches() == []


def test_deferred_changes_mark_checkpointed_directories_dirty(grouped: Index) -> None:
    """The triggers that track what changed since a checkpoint see a deferred change when it
    is written back, before the commit that another connection would read."""
    ix = grouped
    with ix.txn():
        d, f = (
            ix.insert_inode(kind=k, mode=m, uid=0, gid=0, nlink=n, time_ns=1, namespace_id=1)
            for k, m, n in ((4, stat.S_IFDIR | 0o755, 2), (5, stat.S_IFREG | 0o644, 1))
        )
        ix.add_dentry(d.id, b"f", f.id)
    ix.flush()
    with ix.txn():
        ix.set_clean(d.id, D1, 1, 0)
        ix.get_inode(f.id)
    ix.flush()
    assert ix.dir_state(d.id) is not None
    ix.touch_inode(f.id, mtime_ns=99, ctime_ns=99)  # deferred
    ix.flush()
    assert ix.dir_state(d.id) is None


def test_without_group_commit_nothing_is_deferred(index: Index, db_path: Path) -> None:
    row = new_inode(index)
    with index.txn():
        index.get_inode(row.id)
    index.touch_inode(row.id, mtime_ns=5, ctime_ns=6)
    assert index.conn.deferred == {}
    assert table_row(db_path, row.id) == (stat.S_IFREG | 0o644, 1, 1, 0, 5, 6, 0)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["defer", "touch", "nlink", "state", "sql"]),
        st.integers(0, 2),  # which inode
        st.integers(1, 1000),  # a value
        st.sampled_from(["alone", "unit", "failing unit"]),
    ),
    max_size=30,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_deferral_matches_a_model_whatever_rolls_back(tmp_path: Path, ops: list[Any]) -> None:
    """Random attribute changes, alone or in units that commit or roll back, with statements
    on `inodes` between them: the table after flush (and the cache all along) equals a model
    where a failed unit never happened."""
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.db"
    ix = Index(path, create=True)
    try:
        ix.group_commit = True
        rows = [new_inode(ix) for _ in range(3)]
        model = {
            r.id: {"mode": r.mode, "nlink": 1, "size": 0, "mtime": 7, "ctime": 7} for r in rows
        }
        with ix.txn():
            for r in rows:
                ix.get_inode(r.id)

        def apply(op: str, ino: int, v: int, m: dict[int, dict[str, int]]) -> None:
            if op == "defer":
                cur = ix.get_inode(ino)
                assert cur is not None
                cur.mode = stat.S_IFREG | (v & 0o777)
                ix.defer_inode(cur)
                m[ino]["mode"] = cur.mode
            elif op == "touch":
                ix.touch_inode(ino, mtime_ns=v, ctime_ns=v + 1)
                m[ino]["mtime"], m[ino]["ctime"] = v, v + 1
            elif op == "nlink":
                ix.add_nlink(ino, 1)
                m[ino]["nlink"] += 1
            elif op == "state":
                ix.update_file_state(ino, v, v, v, None, 0)
                m[ino]["size"] = m[ino]["mtime"] = m[ino]["ctime"] = v
            else:
                ix.conn.execute("SELECT sum(size) FROM inodes").fetchone()

        for op, which, v, how in ops:
            ino = rows[which].id
            if how == "alone":
                apply(op, ino, v, model)
                continue
            trial = {k: dict(c) for k, c in model.items()}
            try:
                with ix.txn():
                    apply(op, ino, v, trial)
                    apply("sql", ino, v, trial)
                    apply("touch", ino, v + 7, trial)
                    if how == "failing unit":
                        raise Boom()
            except Boom:
                pass
            else:
                model = trial
            for r in rows:
                got = ix.get_inode(r.id)
                assert got is not None
                want = model[r.id]
                assert (got.mode, got.nlink, got.size, got.mtime_ns, got.ctime_ns) == (
                    want["mode"], want["nlink"], want["size"], want["mtime"], want["ctime"]
                )
        ix.flush()
        assert ix.row_cache_mismatches() == []
        for r in rows:
            want = model[r.id]
            assert table_row(path, r.id) == (
                want["mode"], 1, want["nlink"], want["size"], want["mtime"], want["ctime"], 0
            )
    finally:
        ix.close()


def test_inodes_known_to_have_no_attributes_list_them_without_a_query(grouped: Index) -> None:
    """`cp -a` lists every source file's attributes twice (size, then names)."""
    ix = grouped
    with ix.txn():
        made = ix.insert_inode(
            kind=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2, nlink=1, time_ns=7, namespace_id=None
        )
        ix.set_xattr(made.id, b"user.k", b"v")  # empties what is known of every inode
    statements: list[str] = []
    ix.conn.set_trace_callback(statements.append)
    assert ix.list_xattrs(made.id) == [b"user.k"]
    with ix.txn():
        ix.remove_xattr(made.id, b"user.k")
    for _ in range(3):
        assert ix.list_xattrs(made.id) == []
    ix.conn.set_trace_callback(None)
    assert len([s for s in statements if s.startswith("SELECT name FROM xattrs")]) == 2
    with ix.txn():
        ix.set_xattr(made.id, b"user.j", b"w")
    assert ix.list_xattrs(made.id) == [b"user.j"]


def test_inodes_made_here_answer_getxattr_without_a_query(grouped: Index, db_path: Path) -> None:
    ix = grouped
    with ix.txn():
        row = ix.insert_inode(
            kind=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2, nlink=1, time_ns=7, namespace_id=None
        )
    statements: list[str] = []
    ix.conn.set_trace_callback(statements.append)
    assert ix.get_xattr(row.id, b"security.capability") is None
    assert statements == []
    with ix.txn():
        ix.set_xattr(row.id, b"security.capability", b"caps")
    assert ix.get_xattr(row.id, b"security.capability") == b"caps"
    ix.conn.set_trace_callback(None)
    ix.flush()
    # Another connection's attribute is seen once this one begins again.
    with ix.txn():
        other = ix.insert_inode(
            kind=5, mode=stat.S_IFREG | 0o644, uid=1, gid=2, nlink=1, time_ns=7, namespace_id=None
        )
    ix.flush()
    conn = raw(db_path)
    try:
        conn.execute(
            "INSERT INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (other.id, b"user.x", b"1")
        )
    finally:
        conn.close()
    with ix.txn():
        assert ix.get_xattr(other.id, b"user.x") == b"1"


def test_upload_states_answers_known_digests_in_batches(index: Index) -> None:
    index.remote = True  # new blobs wait for upload
    digests = [i.to_bytes(32, "big") for i in range(1, 1201)]
    with index.txn():
        index.record_blobs(((d, 10) for d in digests[:1100]), 1)
        index.mark_uploaded(digests[:300:3])
    states = index.upload_states(iter(digests))  # any iterable, past one batch of 500
    assert set(states) == set(digests[:1100])  # unknown digests are absent
    assert {d for d, up in states.items() if up} == set(digests[:300:3])
    assert index.upload_states([]) == {}
