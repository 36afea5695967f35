"""Checkpoints in the core tier: taking them, structural sharing, the dirty-directory
invariant kept by the index triggers, listing and deleting."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from coreutil import Core, open_core

from artifactfs.blobs.journal import Journal, remove_segments
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.diff import diff, diff_counted
from artifactfs.core.manifest import decode
from artifactfs.core.nodes import AttrChanges
from artifactfs.core.restore import restore
from artifactfs.errors import Exists, InvalidName, NotFound
from artifactfs.index.db import NamespaceRow

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


# ---- restore and diff ------------------------------------------------------------------------

Model = dict[str, tuple[object, ...]]


async def model(core: Core, top_path: str = WS) -> tuple[Model, set[frozenset[str]]]:
    """Everything a checkpoint promises to keep, read through the core like a user would."""
    fs = core.fs
    top = await core.resolve(top_path)
    tree: Model = {}
    groups: dict[int, set[str]] = {}

    async def xattrs_of(ino: int) -> dict[bytes, bytes]:
        return {
            n: await fs.getxattr(ino, n)
            for n in await fs.listxattr(ino)
            if not n.startswith(b"user.artifactfs.")
        }

    async def walk(ino: int, prefix: str) -> None:
        a = await fs.getattr(ino)
        tree[prefix or "."] = ("dir", a.mode, a.uid, a.gid, a.mtime_ns, await xattrs_of(ino))
        for ent in await fs.readdir(ino, 0, 100000):
            c = await fs.getattr(ent.attr.ino)
            rel = f"{prefix}/{os.fsdecode(ent.name)}" if prefix else os.fsdecode(ent.name)
            groups.setdefault(c.ino, set()).add(rel)
            if stat.S_ISDIR(c.mode):
                await walk(c.ino, rel)
            elif stat.S_ISLNK(c.mode):
                tree[rel] = ("link", c.mode, c.uid, c.gid, c.mtime_ns, await fs.readlink(c.ino))
            elif stat.S_ISREG(c.mode):
                fh = await fs.open(c.ino, os.O_RDONLY, core.caller)
                try:
                    content = await core.read_fh(fh)
                finally:
                    await fs.release(fh)
                tree[rel] = (
                    "file", c.mode, c.uid, c.gid, c.mtime_ns, c.size, content,
                    await xattrs_of(c.ino), c.nlink,
                )
            else:
                tree[rel] = ("special", c.mode, c.rdev, c.mtime_ns)

    await walk(top, "")
    return tree, {frozenset(g) for g in groups.values() if len(g) > 1}


def reference_diff(a: Model, b: Model) -> list[tuple[str, str]]:
    """The diff rules of core/diff.py, computed from two walked trees."""
    out = []
    for path in sorted(set(a) | set(b)):
        x, y = a.get(path), b.get(path)
        if x is None:
            out.append((path, "added"))
        elif y is None:
            out.append((path, "removed"))
        elif x[0] != y[0]:
            out.append((path, "type-changed"))
        elif x[0] == "dir":
            if (x[1], x[2], x[3], x[5]) != (y[1], y[2], y[3], y[5]):
                out.append((path, "modified"))
        elif x[0] == "file":
            if x[:8] != y[:8]:
                out.append((path, "modified"))
        elif x != y:
            out.append((path, "modified"))
    return out


async def rich_tree(core: Core) -> None:
    fs, caller = core.fs, core.caller
    await core.makedirs(f"{WS}/src/pkg")
    await core.makedirs(f"{WS}/docs")
    await core.write_file(f"{WS}/src/main.py", b"print('hi')\n")
    await core.write_file(f"{WS}/src/pkg/big.bin", os.urandom(3 * core.bs + 11))
    await core.write_file(f"{WS}/sparse", b"end", offset=5 * core.bs)
    await core.write_file(f"{WS}/docs/readme", b"read me")
    src = await core.resolve(f"{WS}/src")
    await fs.symlink(src, b"link", b"pkg/big.bin", caller)
    docs = await core.resolve(f"{WS}/docs")
    main = await core.resolve(f"{WS}/src/main.py")
    await fs.link(main, docs, b"main-hardlink", caller)
    await fs.setxattr(main, b"user.mime_type", b"text/x-python", caller)
    await fs.setxattr(docs, b"user.summary", b"docs", caller)
    await fs.setattr(await core.resolve(f"{WS}/docs/readme"), AttrChanges(mode=0o600), caller)
    await fs.mknod(docs, b"fifo", 0o10644, 0, caller)


async def mutate(core: Core) -> None:
    fs, caller = core.fs, core.caller
    await core.write_file(f"{WS}/src/main.py", b"changed", offset=3)
    src = await core.resolve(f"{WS}/src")
    pkg = await core.resolve(f"{WS}/src/pkg")
    await fs.unlink(pkg, b"big.bin", caller)
    await fs.rename(src, b"link", src, b"renamed-link", 0, caller)
    docs = await core.resolve(f"{WS}/docs")
    await fs.unlink(docs, b"main-hardlink", caller)
    await fs.removexattr(docs, b"user.summary", caller)
    await fs.setattr(docs, AttrChanges(mode=0o700), caller)
    await core.makedirs(f"{WS}/new/deeper")
    await core.write_file(f"{WS}/new/deeper/file", b"new")
    ws = await core.resolve(WS)
    await fs.unlink(docs, b"fifo", caller)
    await fs.rename(ws, b"sparse", docs, b"sparse-moved", 0, caller)


async def test_restore_round_trip(core: Core) -> None:

    await rich_tree(core)
    before = await model(core)
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "base", "tester")
    await mutate(core)
    after = await model(core)
    changes = await diff(cp, ns, row.root, None)
    assert [(c.path, c.kind) for c in changes] == reference_diff(before[0], after[0])
    result = await restore(cp, ns, row.root, actor="tester", name="base")
    assert result.changed > 0
    assert await model(core) == before
    assert await diff(cp, ns, row.root, None) == []
    # A second restore has nothing to do.
    assert (await restore(cp, ns, row.root, actor="tester")).changed == 0
    types = [e.type for e in core.store.index.events(type_prefix="checkpoint.")]
    assert types.count("checkpoint.restore") == 2


async def test_restore_without_hard_links_is_exact(core: Core) -> None:

    files = await deep_tree(core, depth=3, width=3)
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "base", "tester")
    for f in files[::2]:
        await core.write_file(f, b"mutated")
    await core.makedirs(f"{WS}/extra/dir")
    await restore(cp, ns, row.root, actor="tester")
    # Times included: the restored tree encodes to the very same digest, and is clean.
    assert not dirty(core, ns.root_inode)
    assert (await cp.build(ns.root_inode, store_new=False)).root == row.root
    assert await fresh_root(cp, ns) == row.root


async def test_restore_after_few_changes_touches_only_them(core: Core) -> None:

    files = await deep_tree(core, depth=5, width=6)
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "base", "tester")
    await core.write_file(files[-1], b"one change")
    changes, read = await diff_counted(cp, ns, row.root, None)
    assert [c.kind for c in changes] == ["modified"]
    assert read <= 2 * 6 + 2  # the changed path on both sides, not the 31 directories
    result = await restore(cp, ns, row.root, actor="tester")
    assert result.changed == 1
    assert await core.read_file(files[-1]) == b"5-2"
    assert (await cp.build(ns.root_inode, store_new=False)).root == row.root


async def test_open_file_keeps_old_content_across_restore(core: Core) -> None:

    await core.write_file(f"{WS}/f", b"old content")
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "base", "tester")
    await core.write_file(f"{WS}/f", b"NEW CONTENT")
    fh = await core.open(f"{WS}/f")
    try:
        await restore(cp, ns, row.root, actor="tester")
        assert await core.read_fh(fh) == b"NEW CONTENT"
    finally:
        await core.fs.release(fh)
    assert await core.read_file(f"{WS}/f") == b"old content"


async def test_restore_blob_namespace(core: Core) -> None:

    path = "acme/shared/blob.bin"
    await core.write_file(path, b"version one")
    cp = ckpts(core)
    ns = await namespace(core, path)
    row = await cp.create(ns, "v1", "tester")
    await core.write_file(path, b"version two, longer")
    await restore(cp, ns, row.root, actor="tester")
    assert await core.read_file(path) == b"version one"
    again = await namespace(core, path)
    assert again.id == ns.id
    assert [r.name for r in cp.list(ns.id)] == ["v1"]


async def test_restore_into_empty_namespace(core: Core) -> None:

    await rich_tree(core)
    cp, ns = ckpts(core), await namespace(core)
    row = await cp.create(ns, "base", "tester")
    before = await model(core)
    await core.makedirs("acme/shared/copy")
    other = await namespace(core, "acme/shared/copy")
    await restore(cp, other, row.root, actor="tester")
    after = await model(core, "acme/shared/copy")
    assert after[0] == before[0]
    assert after[1] == before[1]


async def test_big_directory_is_chunked_and_shared(core: Core) -> None:
    from artifactfs.core.manifest import CHUNK_THRESHOLD

    n = 1000
    ws = await core.resolve(WS)
    for i in range(n):
        fh, _ = await core.fs.create(ws, f"file{i:04d}".encode(), 0o644, os.O_WRONLY, core.caller)
        await core.fs.write(fh, 0, f"content {i}".encode())
        await core.fs.release(fh)
    cp, ns = ckpts(core), await namespace(core)
    first = await cp.create(ns, "first", "tester")
    top = await cp.raw(first.root)
    assert len(top.chunks) > n // 64 and top.entries == {}
    whole = await cp.manifest(first.root)
    assert len(whole.entries) == n > CHUNK_THRESHOLD
    before = await model(core)
    # One changed file rewrites one chunk and the top, a small fraction of the bytes.
    await core.write_file(f"{WS}/file0500", b"changed")
    await core.write_file(f"{WS}/new-file", b"added")
    second = await cp.create(ns, "second", "tester")
    assert second.manifest_bytes < first.manifest_bytes / 8
    assert second.root == await fresh_root(cp, ns)
    changes, read = await diff_counted(cp, ns, first.root, second.root)
    assert [(c.path, c.kind) for c in changes] == [("file0500", "modified"), ("new-file", "added")]
    assert read <= 2 + 6  # two tops and the chunks that differ
    await restore(cp, ns, first.root, actor="tester")
    assert await model(core) == before


async def test_removing_a_namespace_removes_its_checkpoints(core: Core) -> None:
    await core.write_file(f"{WS}/a", b"a")
    cp, ns = ckpts(core), await namespace(core)
    await cp.create(ns, "one", "tester")
    await cp.create(ns, "two", "tester")
    scope = await core.resolve("acme/shared")
    await core.fs.unlink(await core.resolve(f"{WS}"), b"a", core.caller)
    await core.fs.rmdir(scope, b"ws", core.caller)
    assert cp.list(ns.id) == []
    events = core.store.index.events(type_prefix="namespace.destroy")
    assert events[-1].payload["checkpoints_deleted"] == ["one", "two"]


async def test_one_change_in_ten_thousand_files_writes_only_its_path(core: Core) -> None:
    """10,000 files in 10 x 10 directories of 100 files; one deep change rewrites only
    the manifests on its path: the root, the middle directory, and the leaf directory's
    top manifest and the one chunk holding the file."""
    ws = await core.resolve(WS)
    leaves = []
    for a in range(10):
        mid = (await core.fs.mkdir(ws, f"m{a}".encode(), 0o755, core.caller)).ino
        for b in range(10):
            leaf = (await core.fs.mkdir(mid, f"l{b}".encode(), 0o755, core.caller)).ino
            leaves.append(leaf)
            for i in range(100):
                name = f"f{i}".encode()
                fh, _ = await core.fs.create(leaf, name, 0o644, os.O_WRONLY, core.caller)
                await core.fs.release(fh)
    cp, ns = ckpts(core), await namespace(core)
    first = await cp.create(ns, "first", "tester")
    assert first.files == 10_000
    await core.write_file(f"{WS}/m7/l3/f42", b"the one change")
    second = await cp.create(ns, "second", "tester")
    payload = core.store.index.events(type_prefix="checkpoint.create")[-1].payload
    assert payload["manifests_written"] == 4
    assert second.manifest_bytes < first.manifest_bytes / 100
    changes = await diff(cp, ns, first.root, second.root)
    assert [(c.path, c.kind) for c in changes] == [("m7/l3/f42", "modified")]


async def test_block_journalled_by_another_process_is_readable(core: Core) -> None:
    """A small block another process (a mount, the API) committed to the journal and has not
    stored yet is read from that process's journal, not reported missing."""
    await core.write_file(f"{WS}/small", b"journalled elsewhere")
    await core.io.drained()
    digest = core.store.index.block_map(await core.resolve(f"{WS}/small"))[0]
    data = core.store.backend.get(digest)
    core.store.backend.delete(digest)
    other = Journal(core.store.journal_dir)  # another daemon's, alive (it holds the flock)
    other.append(digest, data)
    assert digest not in core.io.pending
    assert await core.read_file(f"{WS}/small") == b"journalled elsewhere"
    core.store.backend.put(digest, data)  # as the other process's mover would
    other.stored(digest)
    remove_segments(other.drop(other.retirable()))
    other.close()


async def test_sequential_reads_prefetch_on_remote_stores(core: Core) -> None:
    """A sequential reader asks the backend (a remote store's cache) for the next blocks."""
    asked: list[bytes] = []
    core.store.backend.prefetch = lambda digests: asked.extend(digests)  # type: ignore[attr-defined]
    try:
        data = os.urandom(10 * core.bs)
        await core.write_file(f"{WS}/big", data)
        await core.io.drained()
        blocks = core.store.index.block_map(await core.resolve(f"{WS}/big"))
        assert await core.read_file(f"{WS}/big") == data
        assert len(set(blocks.values())) == 10
        # Each read names the blocks after the ones it reads itself; the first one (7000
        # bytes of 4 KiB blocks) reads blocks 0 and 1.
        assert set(asked) == {blocks[i] for i in range(2, 10)}
    finally:
        del core.store.backend.prefetch  # type: ignore[attr-defined]
