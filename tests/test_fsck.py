"""fsck in the core tier: a store corrupted on purpose, each finding asserted, each repair
checked by a second run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from coreutil import open_core, workspace

from artifactfs.core.fsck import (
    BROKEN_MANIFEST,
    CORRUPT_BLOB,
    DANGLING_DENTRY,
    GRID_WITHOUT_INODE,
    MISSING_BLOB,
    ORPHAN_BLOB,
    ORPHAN_ROWS,
    STALE_BLOB_ROW,
    UNRECORDED_BLOB,
    WRONG_NLINK,
    FsckReport,
    check,
)
from artifactfs.core.grid import find_namespace
from artifactfs.store import Store

WS = "acme/shared/ws"


async def make(path: Path) -> dict[str, bytes]:
    """A store with a workspace, files and a checkpoint; returns file digests by name."""
    async with open_core(path) as core:
        await workspace(core, WS)
        await core.makedirs(f"{WS}/d")
        await core.write_file(f"{WS}/d/a", b"A" * 100)
        await core.write_file(f"{WS}/b", os.urandom(2 * core.bs))
        await core.write_file(f"{WS}/c", b"see")
        ns = find_namespace(core.store.index, WS)
        await core.fs.checkpoints.create(ns, "one", "test")
        await core.io.drained()
        await core.fs.retire_journal()
    return {"a": hashlib.sha256(b"A" * 100).digest(), "c": hashlib.sha256(b"see").digest()}


def fsck(path: Path, **kw: object) -> FsckReport:
    store = Store(path)
    try:
        return check(store.index, store.backend, **kw)  # type: ignore[arg-type]
    finally:
        store.close()


def kinds(report: FsckReport) -> list[str]:
    return sorted(f.kind for f in report.findings)


def blob_file(path: Path, digest: bytes) -> Path:
    store = Store(path)
    try:
        return store.backend.path_of(digest)
    finally:
        store.close()


def sql(path: Path, statement: str, *args: object) -> None:
    store = Store(path)
    try:
        with store.index.txn():
            store.index.conn.execute(statement, args)
    finally:
        store.close()


async def test_a_fresh_store_is_clean(tmp_path: Path) -> None:
    await make(tmp_path / "s")
    report = fsck(tmp_path / "s", verify=True)
    assert report.clean, [str(f) for f in report.findings]
    assert report.verified == report.blobs > 0 and report.checkpoints == 1


async def test_missing_block_names_files_and_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "s"
    digests = await make(path)
    blob_file(path, digests["a"]).unlink()
    report = fsck(path, repair=True)
    assert kinds(report) == [MISSING_BLOB]
    (f,) = report.findings
    assert f"{WS}/d/a" in f.message and f"{WS}@one" in f.message
    assert not f.repaired and report.unrepaired == [f]


async def test_flipped_byte_is_found_by_verify_only(tmp_path: Path) -> None:
    path = tmp_path / "s"
    digests = await make(path)
    p = blob_file(path, digests["c"])
    p.chmod(0o644)
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    assert fsck(path).clean
    report = fsck(path, verify=True)
    assert kinds(report) == [CORRUPT_BLOB]
    assert f"{WS}/c" in report.findings[0].message and "@one" in report.findings[0].message


async def test_wrong_link_count_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / "s"
    await make(path)
    sql(
        path,
        "UPDATE inodes SET nlink = 5 WHERE id = (SELECT inode FROM dentries "
        "WHERE name = CAST('c' AS BLOB))",
    )
    report = fsck(path)
    assert kinds(report) == [WRONG_NLINK] and "has link count 5, its names say 1" in str(
        report.findings[0]
    )
    report = fsck(path, repair=True)
    assert report.findings[0].repaired
    assert fsck(path).clean


async def test_dentry_naming_a_deleted_inode_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / "s"
    await make(path)
    sql(
        path,
        "DELETE FROM inodes WHERE id = (SELECT inode FROM dentries WHERE name = CAST('b' AS BLOB))",
    )
    report = fsck(path)
    # the dentry, and the block map rows of the inode that went
    assert kinds(report) == [DANGLING_DENTRY, ORPHAN_ROWS]
    assert "'b'" in report.of(DANGLING_DENTRY)[0].message
    report = fsck(path, repair=True)
    assert all(f.repaired for f in report.findings)
    assert fsck(path).clean


async def test_orphan_and_unrecorded_blobs_and_stale_rows(tmp_path: Path) -> None:
    path = tmp_path / "s"
    digests = await make(path)
    store = Store(path)
    orphan = os.urandom(10)
    store.backend.put(hashlib.sha256(orphan).digest(), orphan)
    store.close()
    sql(path, "DELETE FROM blobs WHERE digest = ?", digests["c"])
    sql(path, "INSERT INTO blobs (digest, size, created_ns) VALUES (?, 1, 0)", b"\x01" * 32)
    report = fsck(path)
    assert kinds(report) == [ORPHAN_BLOB, STALE_BLOB_ROW, UNRECORDED_BLOB]
    assert not report.of(ORPHAN_BLOB)[0].repairable  # younger than the grace period
    report = fsck(path, repair=True, grace_s=0)
    assert all(f.repaired for f in report.findings)
    assert fsck(path, verify=True).clean
    assert not Store(path).backend.has(hashlib.sha256(orphan).digest())


async def test_broken_manifest_and_namespace_without_root(tmp_path: Path) -> None:
    path = tmp_path / "s"
    await make(path)
    store = Store(path)
    (root,) = store.index.checkpoint_roots()
    store.close()
    blob_file(path, root).unlink()
    sql(path, "DELETE FROM inodes WHERE id = (SELECT root_inode FROM namespaces)")
    report = fsck(path)
    assert BROKEN_MANIFEST in kinds(report) and GRID_WITHOUT_INODE in kinds(report)
    (broken,) = report.of(BROKEN_MANIFEST)
    assert "missing" in broken.message and "@one" in broken.message
    assert not fsck(path, repair=True).of(BROKEN_MANIFEST)[0].repaired
