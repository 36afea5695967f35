"""`.snapshots` in the core tier: checkpoints browsed, taken and deleted through the
FileSystem operations the FUSE adapter calls, with virtual inode numbers (core/snapview.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from coreutil import BLOCK, Core, open_core

from artifactfs.core.fs import XATTR_SHA256
from artifactfs.core.nodes import Attr, AttrChanges, Caller
from artifactfs.core.policy import View
from artifactfs.core.snapview import VIRTUAL_BASE, is_virtual
from artifactfs.errors import (
    Exists,
    InvalidArgument,
    InvalidName,
    NameTooLong,
    NoData,
    NotADirectory,
    NotFound,
    ReadOnly,
)

WS = "acme/shared/ws"
SNAP = f"{WS}/.snapshots"


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(tmp_path / "store") as c:
        await c.makedirs(WS)
        yield c


def data(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))


async def take(core: Core, name: str, path: str = SNAP) -> Attr:
    return await core.fs.mkdir(await core.resolve(path), name.encode(), 0o755, core.caller)


async def listing(core: Core, path: str) -> list[bytes]:
    return sorted(await core.listdir(path))


async def tree(core: Core) -> None:
    """A small tree with everything a checkpoint must keep."""
    fs, caller = core.fs, core.caller
    await core.makedirs(f"{WS}/d/sub")
    await core.makedirs(f"{WS}/d/sub2")
    await core.write_file(f"{WS}/d/f", data(3 * BLOCK + 17))
    await core.write_file(f"{WS}/top", b"top\n")
    d = await core.resolve(f"{WS}/d")
    f = await core.resolve(f"{WS}/d/f")
    await fs.symlink(d, b"ln", b"../top", caller)
    await fs.link(f, d, b"f2", caller)
    await fs.setxattr(f, b"user.k", b"v", caller)
    await fs.setattr(f, AttrChanges(mode=0o640, uid=1234, gid=4321), caller)
    await fs.setattr(f, AttrChanges(atime_ns=1_000_000_001, mtime_ns=2_000_000_002), caller)
    # Sparse: a hole in the middle, and a stored block shorter than the file's last block.
    await core.write_file(f"{WS}/sparse", b"head", offset=0)
    await core.write_file(f"{WS}/sparse", b"tail", offset=5 * BLOCK)
    sparse = await core.resolve(f"{WS}/sparse")
    await fs.setattr(sparse, AttrChanges(size=7 * BLOCK + 3), caller)
    await fs.mknod(await core.resolve(WS), b"fifo", stat.S_IFIFO | 0o600, 0, caller)


def same_stat(a: Attr, b: Attr) -> None:
    assert (a.mode, a.uid, a.gid, a.size, a.rdev) == (b.mode, b.uid, b.gid, b.size, b.rdev)
    assert (a.atime_ns, a.mtime_ns, a.ctime_ns, a.btime_ns) == (
        b.atime_ns,
        b.mtime_ns,
        b.ctime_ns,
        b.btime_ns,
    )


# ---- .snapshots itself ----------------------------------------------------------------------


async def test_snapshots_found_by_lookup_never_listed(core: Core) -> None:
    await core.write_file(f"{WS}/a", b"x")
    root = await core.attr(WS)
    snap = await core.attr(SNAP)
    assert is_virtual(snap.ino) and snap.ino >= VIRTUAL_BASE
    assert stat.S_ISDIR(snap.mode) and (snap.uid, snap.gid) == (root.uid, root.gid)
    # Read-only, except for whoever may write the workspace root (mkdir takes checkpoints).
    assert stat.S_IMODE(snap.mode) == 0o555 | (root.mode & 0o222)
    assert snap.nlink == 2
    assert await listing(core, WS) == [b"a"]
    assert await listing(core, SNAP) == []
    # Not in deeper directories, and not anywhere else in the grid but scopes.
    await core.makedirs(f"{WS}/deep")
    assert not await core.exists(f"{WS}/deep/.snapshots")
    assert not await core.exists("acme/.snapshots")
    # "." and ".." of the virtual directory.
    fs = core.fs
    this, parent = await fs.dot_attrs(snap.ino)
    assert (this.ino, parent.ino) == (snap.ino, root.ino)


async def test_mkdir_takes_and_rmdir_deletes(core: Core) -> None:
    await core.write_file(f"{WS}/a", b"one")
    attr = await take(core, "first")
    assert stat.S_ISDIR(attr.mode) and is_virtual(attr.ino)
    ns = core.store.index.namespace_by_root(await core.resolve(WS))
    assert ns is not None
    rows = core.fs.checkpoints.list(ns.id)
    assert [(r.name, r.creator) for r in rows] == [("first", f"uid:{core.caller.uid}")]
    assert await listing(core, SNAP) == [b"first"]
    assert (await core.attr(SNAP)).nlink == 3
    assert (await core.attr(f"{SNAP}/first")).ino == attr.ino
    with pytest.raises(Exists):
        await take(core, "first")
    snap_ino = await core.resolve(SNAP)
    for bad, exc in (
        (b"\xff\xfe", InvalidName),
        (b"x" * 256, NameTooLong),
        (b".", InvalidName),
        (b"", InvalidName),
    ):
        with pytest.raises(exc):
            await core.fs.mkdir(snap_ino, bad, 0o755, core.caller)
    # Names that cannot be checkpoint names are simply not there.
    with pytest.raises(NotFound):
        await core.fs.lookup(snap_ino, b"\xff", core.caller)
    with pytest.raises(NotFound):
        await core.fs.rmdir(snap_ino, b"\xff", core.caller)
    await core.fs.rmdir(snap_ino, b"first", core.caller)
    assert core.fs.checkpoints.list(ns.id) == []
    assert await listing(core, SNAP) == []
    assert not await core.exists(f"{SNAP}/first")
    with pytest.raises(NotFound):
        await core.fs.rmdir(snap_ino, b"first", core.caller)
    types = [e.type for e in core.store.index.events(type_prefix="checkpoint.")]
    assert types == ["checkpoint.create", "checkpoint.delete"]


async def test_checkpoint_taken_elsewhere_appears_at_once(core: Core) -> None:
    assert not await core.exists(f"{SNAP}/ext")
    ns = core.store.index.namespace_by_root(await core.resolve(WS))
    assert ns is not None
    await core.fs.checkpoints.create(ns, "ext", "cli")
    assert await core.exists(f"{SNAP}/ext")
    assert await listing(core, SNAP) == [b"ext"]
    assert core.fs.volatile(await core.resolve(f"{SNAP}/ext"))
    assert core.fs.volatile(await core.resolve(SNAP))


# ---- browsing -------------------------------------------------------------------------------


async def test_browse_shows_the_checkpoint_exactly(core: Core) -> None:
    await tree(core)
    fs = core.fs
    live = {
        rel: await core.attr(f"{WS}/{rel}")
        for rel in ("", "d", "d/sub", "d/f", "d/f2", "d/ln", "top", "sparse", "fifo")
    }
    live_sha = await core.sha256_xattr(f"{WS}/d/f")
    await take(core, "c")
    base = f"{SNAP}/c"
    for rel, want in live.items():
        got = await core.attr(f"{base}/{rel}" if rel else base)
        assert is_virtual(got.ino)
        same_stat(got, want)
        assert got.nlink == want.nlink, rel
    assert await listing(core, base) == sorted([b"d", b"top", b"sparse", b"fifo"])
    assert await listing(core, f"{base}/d") == [b"f", b"f2", b"ln", b"sub", b"sub2"]
    assert (await core.attr(f"{base}/d")).nlink == 4  # 2 + sub + sub2
    # Hard links: one inode, two names.
    f, f2 = await core.attr(f"{base}/d/f"), await core.attr(f"{base}/d/f2")
    assert f.ino == f2.ino and f.nlink == 2
    # Contents, symlinks, xattrs and the recorded digest.
    assert await core.read_file(f"{base}/d/f") == data(3 * BLOCK + 17)
    assert await core.read_file(f"{base}/top") == b"top\n"
    assert await fs.readlink(await core.resolve(f"{base}/d/ln")) == b"../top"
    with pytest.raises(InvalidArgument):
        await fs.readlink(await core.resolve(f"{base}/top"))
    fino = await core.resolve(f"{base}/d/f")
    assert await fs.getxattr(fino, b"user.k") == b"v"
    assert (await fs.getxattr(fino, XATTR_SHA256)).decode() == live_sha
    assert await fs.listxattr(fino) == [b"user.k"]  # the digest by name only
    with pytest.raises(NoData):
        await fs.getxattr(fino, b"security.capability")
    dino = await core.resolve(f"{base}/d")
    with pytest.raises(NoData):
        await fs.getxattr(dino, XATTR_SHA256)
    assert await fs.listxattr(dino) == []
    # Sparse: holes read as zeros, and so do bytes after a short stored block.
    want = b"head" + bytes(5 * BLOCK - 4) + b"tail" + bytes(2 * BLOCK - 1)
    assert await core.read_file(f"{base}/sparse") == want
    assert (await core.attr(f"{base}/sparse")).blocks_512 == (
        await core.attr(f"{WS}/sparse")
    ).blocks_512
    # Reads at odd offsets and past the end.
    fh = await core.open(f"{base}/d/f")
    try:
        assert await fs.read(fh, BLOCK - 3, 10) == data(3 * BLOCK + 17)[BLOCK - 3 : BLOCK + 7]
        assert await fs.read(fh, 3 * BLOCK + 10, 100) == data(3 * BLOCK + 17)[3 * BLOCK + 10 :]
        assert await fs.read(fh, 10 * BLOCK, 10) == b""
    finally:
        await fs.release(fh)
    # ".." inside the checkpoint.
    sub = await core.resolve(f"{base}/d/sub")
    assert (await fs.lookup(sub, b"..", core.caller)).ino == dino
    with pytest.raises(NotADirectory):
        await fs.lookup(fino, b"x", core.caller)
    with pytest.raises(NotFound):
        await fs.lookup(dino, b"missing", core.caller)


async def test_snapshot_keeps_the_old_state(core: Core) -> None:
    await tree(core)
    await take(core, "before")
    fs, caller = core.fs, core.caller
    await core.write_file(f"{WS}/top", b"changed, and longer than before\n")
    d = await core.resolve(f"{WS}/d")
    await fs.unlink(d, b"f2", caller)
    await fs.rename(d, b"sub", d, b"renamed", 0, caller)
    await fs.setxattr(await core.resolve(f"{WS}/d/f"), b"user.k", b"new", caller)
    assert await core.read_file(f"{SNAP}/before/top") == b"top\n"
    assert await listing(core, f"{SNAP}/before/d") == [b"f", b"f2", b"ln", b"sub", b"sub2"]
    assert await fs.getxattr(await core.resolve(f"{SNAP}/before/d/f"), b"user.k") == b"v"
    assert (await core.attr(f"{SNAP}/before/d/f")).nlink == 2
    await take(core, "after")
    assert await core.read_file(f"{SNAP}/after/top") == b"changed, and longer than before\n"
    assert await listing(core, f"{SNAP}/after/d") == [b"f", b"ln", b"renamed", b"sub2"]
    assert (await core.attr(f"{SNAP}/after/d/f")).nlink == 1
    assert await listing(core, SNAP) == [b"after", b"before"]


async def test_large_reads_go_through_read_many(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = data(40 * BLOCK + 5)
    await core.write_file(f"{WS}/big", content)
    await take(core, "c")
    calls: list[int] = []
    real = core.io.read_many

    async def spy(pieces):  # type: ignore[no-untyped-def]
        calls.append(len(pieces))
        return await real(pieces)

    monkeypatch.setattr(core.io, "read_many", spy)
    fh = await core.open(f"{SNAP}/c/big")
    try:
        assert await core.fs.read(fh, 0, len(content) + 100) == content
    finally:
        await core.fs.release(fh)
    assert calls == [41]  # every block of the read in one call


# ---- read-only ------------------------------------------------------------------------------


async def test_every_change_under_snapshots_is_erofs(core: Core) -> None:
    await tree(core)
    await take(core, "c")
    fs, caller = core.fs, core.caller
    snap = await core.resolve(SNAP)
    c = await core.resolve(f"{SNAP}/c")
    d = await core.resolve(f"{SNAP}/c/d")
    f = await core.resolve(f"{SNAP}/c/d/f")
    live = await core.resolve(WS)
    live_f = await core.resolve(f"{WS}/top")
    attempts = {
        "create": fs.create(d, b"new", 0o644, os.O_WRONLY, caller),
        "create in .snapshots": fs.create(snap, b"new", 0o644, os.O_WRONLY, caller),
        "mknod": fs.mknod(d, b"fifo2", stat.S_IFIFO | 0o600, 0, caller),
        "mkdir": fs.mkdir(d, b"new", 0o755, caller),
        "mkdir in checkpoint root": fs.mkdir(c, b"new", 0o755, caller),
        "symlink": fs.symlink(d, b"s", b"t", caller),
        "link into": fs.link(live_f, d, b"l", caller),
        "link from": fs.link(f, live, b"l", caller),
        "unlink": fs.unlink(d, b"f", caller),
        "unlink in .snapshots": fs.unlink(snap, b"c", caller),
        "rmdir": fs.rmdir(d, b"sub", caller),
        "rename within": fs.rename(d, b"f", d, b"g", 0, caller),
        "rename into": fs.rename(live, b"top", d, b"top", 0, caller),
        "rename out of": fs.rename(d, b"f", live, b"f", 0, caller),
        "rename a checkpoint": fs.rename(snap, b"c", snap, b"c2", 0, caller),
        "chmod": fs.setattr(f, AttrChanges(mode=0o777), caller),
        "chown": fs.setattr(f, AttrChanges(uid=0, gid=0), caller),
        "utimes": fs.setattr(f, AttrChanges(atime_ns=1, mtime_ns=1), caller),
        "truncate": fs.setattr(f, AttrChanges(size=0), caller),
        "chmod .snapshots": fs.setattr(snap, AttrChanges(mode=0o777), caller),
        "setxattr": fs.setxattr(f, b"user.x", b"1", caller),
        "removexattr": fs.removexattr(f, b"user.k", caller),
        "open for writing": fs.open(f, os.O_WRONLY, caller),
        "open read-write": fs.open(f, os.O_RDWR, caller),
        "open with O_TRUNC": fs.open(f, os.O_RDONLY | os.O_TRUNC, caller),
        "rmdir .snapshots": fs.rmdir(live, b".snapshots", caller),
        "rename .snapshots": fs.rename(live, b".snapshots", live, b"x", 0, caller),
    }
    for what, coro in attempts.items():
        with pytest.raises(ReadOnly):
            await coro
            pytest.fail(f"{what} was allowed")
    # A read handle cannot write either.
    fh = await fs.open(f, os.O_RDONLY, caller)
    try:
        with pytest.raises(ReadOnly):
            await fs.write(fh, 0, b"x")
    finally:
        await fs.release(fh)
    assert await core.read_file(f"{SNAP}/c/d/f") == data(3 * BLOCK + 17)
    assert await listing(core, SNAP) == [b"c"]


async def test_real_snapshots_name_refused_in_workspace_root(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    fs, caller = core.fs, core.caller
    root = await core.resolve(WS)
    await core.write_file(f"{WS}/file", b"x")
    await core.makedirs(f"{WS}/dir")
    file = await core.resolve(f"{WS}/file")
    attempts = {
        "create": fs.create(root, b".snapshots", 0o644, os.O_WRONLY, caller),
        "mkdir": fs.mkdir(root, b".snapshots", 0o755, caller),
        "mknod": fs.mknod(root, b".snapshots", stat.S_IFIFO | 0o600, 0, caller),
        "symlink": fs.symlink(root, b".snapshots", b"t", caller),
        "link": fs.link(file, root, b".snapshots", caller),
        "rename file": fs.rename(root, b"file", root, b".snapshots", 0, caller),
        "rename dir": fs.rename(root, b"dir", root, b".snapshots", 0, caller),
    }
    for what, coro in attempts.items():
        caplog.clear()
        with pytest.raises(InvalidName):
            await coro
            pytest.fail(f"{what} was allowed")
        assert "reserved for its checkpoints" in caplog.text, what
    assert sorted(await core.listdir(WS)) == [b"dir", b"file"]
    # Deeper directories may have a real .snapshots.
    await core.makedirs(f"{WS}/dir/.snapshots/x")
    await core.write_file(f"{WS}/dir/.snapshots/x/f", b"real")
    assert not is_virtual(await core.resolve(f"{WS}/dir/.snapshots"))
    assert sorted(await core.listdir(f"{WS}/dir")) == [b".snapshots"]
    await take(core, "c")
    assert await core.read_file(f"{SNAP}/c/dir/.snapshots/x/f") == b"real"


async def test_read_only_credential_cannot_take(core: Core) -> None:
    await take(core, "c")
    core.fs.view = View(sandbox="acme", user="u", session="s", shared_writable=False)
    try:
        with pytest.raises(ReadOnly):
            await take(core, "c2")
        with pytest.raises(ReadOnly):
            await core.fs.rmdir(await core.resolve(SNAP), b"c", core.caller)
        assert await listing(core, SNAP) == [b"c"]
        # Another sandbox's credential does not see it at all.
        core.fs.view = View(sandbox="other", user="u", session="s")
        with pytest.raises(NotFound):
            await core.resolve(f"{SNAP}/c")
    finally:
        core.fs.view = View()


# ---- virtual inodes -------------------------------------------------------------------------


async def test_virtual_inodes_stable_while_referenced_and_reclaimed(core: Core) -> None:
    await tree(core)
    await take(core, "c")
    fs = core.fs
    before = len(fs.snap)
    ino = await core.resolve(f"{SNAP}/c/d/f")
    assert await core.resolve(f"{SNAP}/c/d/f") == ino
    assert (await core.attr(f"{SNAP}/c/d/f2")).ino == ino
    assert len(fs.snap) > before
    # The kernel forgets every reference: the nodes go, and a new lookup gets a new number.
    fs.forget([(i, n) for i, n in list(fs.lookups.items()) if is_virtual(i)])
    assert len(fs.snap) == 0
    with pytest.raises(NotFound):
        await fs.getattr(ino)
    again = await core.resolve(f"{SNAP}/c/d/f")
    assert again != ino and is_virtual(again)
    # An open handle keeps its node after the forget.
    fh = await fs.open(again, os.O_RDONLY, core.caller)
    fs.forget([(i, n) for i, n in list(fs.lookups.items()) if is_virtual(i)])
    assert (await fs.getattr(again)).ino == again
    assert await fs.read(fh, 0, 5) == data(5)
    await fs.release(fh)
    with pytest.raises(NotFound):
        await fs.getattr(again)


async def test_readdir_entries_the_kernel_did_not_take_are_swept(core: Core) -> None:
    for i in range(10):
        await core.write_file(f"{WS}/f{i}", b"x")
    await take(core, "c")
    fs = core.fs
    c = await core.resolve(f"{SNAP}/c")
    held = len(fs.snap)
    entries = await fs.readdir(c, 0)
    assert [e.name for e in entries] == [f"f{i}".encode() for i in range(10)]
    assert all(is_virtual(e.attr.ino) for e in entries)
    # The adapter remembers the entries it replied with; say it took only three.
    for e in entries[:3]:
        fs.remember(e.attr.ino)
    # Paging resumes after an offset.
    rest = await fs.readdir(c, entries[2].next_offset)
    assert [e.name for e in rest] == [f"f{i}".encode() for i in range(3, 10)]
    for e in rest:
        fs.remember(e.attr.ino)
    assert len(fs.snap) == held + 10
    fs.forget([(e.attr.ino, 1) for e in entries[:3] + rest])
    await core.resolve(SNAP)  # any later operation sweeps what nobody took
    assert len(fs.snap) == held


# ---- blob namespaces ------------------------------------------------------------------------


async def test_blob_checkpoints(core: Core) -> None:
    fs, caller = core.fs, core.caller
    await core.write_file("acme/shared/blob.bin", data(2 * BLOCK + 9))
    await core.write_file("acme/shared/other.bin", b"other")
    scope_snap = await core.attr("acme/shared/.snapshots")
    assert stat.S_ISDIR(scope_snap.mode) and stat.S_IMODE(scope_snap.mode) == 0o555
    assert b".snapshots" not in await core.listdir("acme/shared")
    assert await listing(core, "acme/shared/.snapshots") == [b"blob.bin", b"other.bin"]
    assert scope_snap.nlink == 4
    bdir = await core.resolve("acme/shared/.snapshots/blob.bin")
    assert await listing(core, "acme/shared/.snapshots/blob.bin") == []
    # A new file there takes a checkpoint; its handle reads and cannot write.
    fh, attr = await fs.create(bdir, b"v1", 0o644, os.O_WRONLY | os.O_CREAT, caller)
    try:
        assert stat.S_ISREG(attr.mode) and attr.size == 2 * BLOCK + 9
        with pytest.raises(ReadOnly):
            await fs.write(fh, 0, b"x")
        assert await fs.read(fh, 0, 3 * BLOCK) == data(2 * BLOCK + 9)
    finally:
        await fs.flush(fh)
        await fs.release(fh)
    with pytest.raises(Exists):
        await fs.create(bdir, b"v1", 0o644, os.O_WRONLY | os.O_CREAT, caller)
    live = await core.attr("acme/shared/blob.bin")
    await core.write_file("acme/shared/blob.bin", b"new content")
    got = await core.attr("acme/shared/.snapshots/blob.bin/v1")
    assert (got.mode, got.uid, got.mtime_ns, got.size) == (
        live.mode,
        live.uid,
        live.mtime_ns,
        live.size,
    )
    assert await core.read_file("acme/shared/.snapshots/blob.bin/v1") == data(2 * BLOCK + 9)
    ino = await core.resolve("acme/shared/.snapshots/blob.bin/v1")
    assert await fs.listxattr(ino) == []
    assert await listing(core, "acme/shared/.snapshots/blob.bin") == [b"v1"]
    # Nothing else can be made there, nor in the scope's .snapshots.
    scope_ino = await core.resolve("acme/shared/.snapshots")
    for coro in (
        fs.mkdir(bdir, b"d", 0o755, caller),
        fs.create(scope_ino, b"x", 0o644, os.O_WRONLY, caller),
        fs.mkdir(scope_ino, b"x", 0o755, caller),
        fs.unlink(scope_ino, b"blob.bin", caller),
        fs.rmdir(scope_ino, b"blob.bin", caller),
        fs.setattr(ino, AttrChanges(mode=0o600), caller),
        fs.open(ino, os.O_WRONLY, caller),
    ):
        with pytest.raises(ReadOnly):
            await coro
    # unlink deletes the checkpoint.
    await fs.unlink(bdir, b"v1", caller)
    assert await listing(core, "acme/shared/.snapshots/blob.bin") == []
    ns = core.store.index.namespace_by_root(await core.resolve("acme/shared/blob.bin"))
    assert ns is not None and core.fs.checkpoints.list(ns.id) == []
    with pytest.raises(NotFound):
        await fs.unlink(bdir, b"v1", caller)
    # Workspaces are not blobs.
    assert not await core.exists("acme/shared/.snapshots/ws")


async def test_other_uid_as_creator(core: Core) -> None:
    other = Caller(uid=4242, gid=4242)
    await core.fs.mkdir(await core.resolve(SNAP), b"by-other", 0o755, other)
    ns = core.store.index.namespace_by_root(await core.resolve(WS))
    assert ns is not None
    assert core.fs.checkpoints.get(ns.id, "by-other").creator == "uid:4242"


async def test_deleted_checkpoint_stays_readable_while_held(core: Core) -> None:
    await core.write_file(f"{WS}/a", b"kept")
    await take(core, "c")
    fh = await core.open(f"{SNAP}/c/a")
    try:
        await core.fs.rmdir(await core.resolve(SNAP), b"c", core.caller)
        assert not await core.exists(f"{SNAP}/c")
        assert await core.fs.read(fh, 0, 10) == b"kept"
    finally:
        await core.fs.release(fh)
    # The same name again is a new checkpoint with new inodes.
    await core.write_file(f"{WS}/a", b"new", flags=os.O_WRONLY | os.O_TRUNC)
    await take(core, "c")
    assert await core.read_file(f"{SNAP}/c/a") == b"new"


async def test_big_directories_cold_and_warm(tmp_path: Path) -> None:
    """Directories of many entries (stored as chunked manifests), read from a cold cache
    (a new mount of the store) and a warm one."""
    names = [f"f{i:03d}".encode() for i in range(150)] + [b"sub1", b"sub2", b"sub3"]
    async with open_core(tmp_path / "store") as core:
        await core.makedirs(f"{WS}/big")
        for i in range(150):
            await core.write_file(f"{WS}/big/f{i:03d}", f"file {i}".encode())
        for d in (b"sub1", b"sub2", b"sub3"):
            await core.makedirs(f"{WS}/big/{d.decode()}")
        await take(core, "c")
        warm = await listing(core, f"{SNAP}/c/big")
        assert warm == sorted(names)
    async with open_core(tmp_path / "store") as core:
        big = f"{SNAP}/c/big"
        assert (await core.attr(big)).nlink == 5
        assert await core.read_file(f"{big}/f149") == b"file 149"
        # readdir in small pages, as the kernel's buffer allows.
        ino = await core.resolve(big)
        got: list[bytes] = []
        after = 0
        while True:
            page = await core.fs.readdir(ino, after, limit=17)
            if not page:
                break
            got.extend(e.name for e in page)
            for e in page:
                core.fs.remember(e.attr.ino)
            after = page[-1].next_offset
        assert got == sorted(names)
        for i in (0, 77, 149):
            assert await core.read_file(f"{big}/f{i:03d}") == f"file {i}".encode()
