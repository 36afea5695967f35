"""Checkpoints in the core tier: taking them, structural sharing, the dirty-directory
invariant kept by the index triggers, listing and deleting."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.manifest import decode
from artifactfs.errors import Exists, InvalidName, NotFound
from artifactfs.index.db import NamespaceRow
from coreutil import Core, open_core

WS = "acme/shared/ws"


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(tmp_path / "store") as c:
        await c.makedirs(WS)
        yield c


def ckpts(core: Core) -> Checkpoints:
    return Checkpoints(core.store.index, core.io)


async def namespace(core: Core, path: str = WS) -> NamespaceRow:
    ns = core.store.index.namespace_by_root(await core.resolve(path))
    assert ns is not None
    return ns


def dirty(core: Core, ino: int) -> bool:
    return core.store.index.dir_state(ino) is None


async def fresh_root(cp: Checkpoints, ns: NamespaceRow) -> bytes:
    """The root digest of the namespace encoded from scratch (no reuse)."""
    return (await cp.build(ns.root_inode, store_new=False, reuse=False)).root


async def test_create_list_delete(core: Core) -> None:
    await core.write_file(f"{WS}/a.txt", b"hello")
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "one", "tester")
    assert (row.files, row.bytes) == (1, 5)
    assert [r.name for r in cp.list(ns.id)] == ["one"]
    with pytest.raises(Exists):
        await cp.create(ns, "one", "tester")
    for bad in ("", "a/b", "."):
        with pytest.raises(InvalidName):
            await cp.create(ns, bad, "tester")
    root = await cp.manifest(row.root)
    assert set(root.entries) == {b"a.txt"}
    await cp.delete(ns, "one", "tester")
    assert cp.list(ns.id) == []
    with pytest.raises(NotFound):
        await cp.delete(ns, "one", "tester")
    types = [e.type for e in core.store.index.events(type_prefix="checkpoint.")]
    assert types == ["checkpoint.create", "checkpoint.delete"]


async def test_manifest_records_everything(core: Core) -> None:
    await core.makedirs(f"{WS}/d")
    await core.write_file(f"{WS}/d/f", b"x" * (3 * core.bs + 7))
    fs, caller = core.fs, core.caller
    d = await core.resolve(f"{WS}/d")
    await fs.symlink(d, b"ln", b"../elsewhere", caller)
    f = await core.resolve(f"{WS}/d/f")
    await fs.link(f, d, b"f2", caller)
    await fs.setxattr(f, b"user.k", b"v", caller)
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "c", "tester")
    top = await cp.manifest(row.root)
    sub = await cp.manifest(top.entries[b"d"].manifest or b"")
    f_e, f2_e, ln_e = sub.entries[b"f"], sub.entries[b"f2"], sub.entries[b"ln"]
    assert f_e == f2_e and f_e.link == f and f_e.nlink == 2
    assert f_e.xattrs == {b"user.k": b"v"} and f_e.size == 3 * core.bs + 7
    assert len(f_e.blocks) == 4 and f_e.sha256 is not None
    assert ln_e.type == "l" and ln_e.target == b"../elsewhere"
    assert row.files == 2  # two names of one file


async def deep_tree(core: Core, depth: int = 6, width: int = 4) -> list[str]:
    files = []
    for w in range(width):
        path = "/".join([WS] + [f"d{w}_{i}" for i in range(depth)])
        await core.makedirs(path)
        for j in range(3):
            await core.write_file(f"{path}/f{j}", f"{w}-{j}".encode())
            files.append(f"{path}/f{j}")
    return files


async def test_structural_sharing_writes_only_the_changed_path(core: Core) -> None:
    files = await deep_tree(core)
    cp, ns = ckpts(core), await namespace(core)
    first = await cp.create(ns, "first", "tester")
    assert first.files == len(files)
    # Everything is clean after a checkpoint.
    assert not dirty(core, ns.root_inode)
    # Nothing changed: nothing written, same root.
    again = await cp.create(ns, "again", "tester")
    assert again.root == first.root and again.manifest_bytes == 0
    # One file deep down: only the directories on its path are written.
    await core.write_file(files[-1], b"changed")
    leaf_dir = await core.resolve(files[-1].rsplit("/", 1)[0])
    assert dirty(core, leaf_dir) and dirty(core, ns.root_inode)
    other = await core.resolve(files[0].rsplit("/", 1)[0])
    assert not dirty(core, other)
    built = await cp.build(ns.root_inode, store_new=False)
    assert len(built.dirs) == 7  # the namespace root and the 6 directories of the path
    third = await cp.create(ns, "third", "tester")
    assert third.root != first.root
    assert third.root == await fresh_root(cp, ns)


@pytest.mark.parametrize(
    "change",
    ["write", "chmod", "xattr", "rename_dir", "unlink", "link", "mkdir", "utimes", "truncate"],
)
async def test_every_change_dirties_its_path(core: Core, change: str) -> None:
    files = await deep_tree(core, depth=4, width=2)
    cp, ns = ckpts(core), await namespace(core)
    first = await cp.create(ns, "first", "tester")
    fs, caller = core.fs, core.caller
    target = files[-1]
    parent_path, name = target.rsplit("/", 1)
    parent = await core.resolve(parent_path)
    ino = await core.resolve(target)
    from artifactfs.core.nodes import AttrChanges

    if change == "write":
        await core.write_file(target, b"new content")
    elif change == "chmod":
        await fs.setattr(ino, AttrChanges(mode=0o600), caller)
    elif change == "xattr":
        await fs.setxattr(ino, b"user.x", b"1", caller)
    elif change == "rename_dir":
        grand = await core.resolve(parent_path.rsplit("/", 1)[0])
        await fs.rename(grand, parent_path.rsplit("/", 1)[1].encode(), grand, b"moved", 0, caller)
    elif change == "unlink":
        await fs.unlink(parent, name.encode(), caller)
    elif change == "link":
        await fs.link(await core.resolve(files[0]), parent, b"hard", caller)
    elif change == "mkdir":
        await fs.mkdir(parent, b"newdir", 0o755, caller)
    elif change == "utimes":
        await fs.setattr(ino, AttrChanges(mtime_ns=12345, atime_ns=12345), caller)
    elif change == "truncate":
        await fs.setattr(ino, AttrChanges(size=1), caller)
    assert dirty(core, ns.root_inode)
    second = await cp.create(ns, "second", "tester")
    assert second.root != first.root
    assert second.root == await fresh_root(cp, ns)
    # And once more with no change: clean, identical.
    third = await cp.create(ns, "third", "tester")
    assert third.root == second.root and third.manifest_bytes == 0


async def test_change_during_build_keeps_directory_dirty(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = await deep_tree(core, depth=3, width=2)
    cp, ns = ckpts(core), await namespace(core)
    await cp.create(ns, "first", "tester")
    await core.write_file(files[0], b"before")
    real_build = cp.build

    async def build_then_write(root: int, *, store_new: bool, reuse: bool = True):  # type: ignore[no-untyped-def]
        built = await real_build(root, store_new=store_new, reuse=reuse)
        # A write lands after the snapshot but before the checkpoint is recorded.
        await core.write_file(files[-1], b"racing")
        return built

    monkeypatch.setattr(cp, "build", build_then_write)
    await cp.create(ns, "second", "tester")
    monkeypatch.undo()
    leaf = await core.resolve(files[-1].rsplit("/", 1)[0])
    assert dirty(core, leaf) and dirty(core, ns.root_inode)
    third = await cp.create(ns, "third", "tester")
    assert third.root == await fresh_root(cp, ns)
    m = await cp.manifest(third.root)
    assert m.kind == "dir"


async def test_blob_namespace_checkpoint(core: Core) -> None:
    await core.write_file("acme/shared/blob.bin", b"blob data" * 1000)
    cp = ckpts(core)
    ns = await namespace(core, "acme/shared/blob.bin")
    row = await cp.create(ns, "v1", "tester")
    m = decode(core.io._get(row.root), row.root)
    assert m.kind == "blob" and m.self_entry.size == 9000 and row.files == 1


async def test_deep_tree_marks_every_ancestor(core: Core) -> None:
    depth = 60
    path = "/".join([WS] + [f"n{i}" for i in range(depth)])
    await core.makedirs(path)
    await core.write_file(f"{path}/f", b"x")
    cp, ns = ckpts(core), await namespace(core)
    await cp.create(ns, "c", "tester")
    await core.write_file(f"{path}/f", b"y")
    parts = path.split("/")
    for i in range(3, len(parts) + 1):
        assert dirty(core, await core.resolve("/".join(parts[:i])))
    assert os.path.basename(path) == f"n{depth - 1}"
