"""Export and import of checkpoints in the core tier: round trips between two stores (hard
links, xattrs, symlinks, sparse files, special files, a blob namespace), and every kind of
damaged file refused before anything in the importing store changes."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from coreutil import Core, open_core

import artifactfs.core.portable as portable
from artifactfs.core.diff import diff
from artifactfs.core.grid import find_namespace, parse_grid_path
from artifactfs.core.manifest import Entry, Manifest, digest_of, encode
from artifactfs.core.nodes import AttrChanges
from artifactfs.core.portable import export_checkpoint, import_checkpoint
from artifactfs.core.restore import CHANGE_ENTRY, restore
from artifactfs.core.verify import verify_tree
from artifactfs.errors import Corrupt, Exists, InvalidArgument, NotFound, StorageError
from artifactfs.index.db import NamespaceRow

WS = "acme/shared/ws"
COPY = "other/user-bob/copy"


@pytest.fixture
async def src(tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(tmp_path / "src") as c:
        await c.makedirs(WS)
        yield c


@pytest.fixture
async def dst(tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(tmp_path / "dst") as c:
        yield c


async def namespace(core: Core, path: str = WS) -> NamespaceRow:
    return find_namespace(core.store.index, path)


async def model(core: Core, top_path: str) -> tuple[dict[str, tuple[object, ...]], set[Any]]:
    """Everything a checkpoint keeps, read through the core as a user would; hard links as
    groups of paths."""
    fs = core.fs
    tree: dict[str, tuple[object, ...]] = {}
    groups: dict[int, set[str]] = {}

    async def xattrs(ino: int) -> dict[bytes, bytes]:
        return {
            n: await fs.getxattr(ino, n)
            for n in await fs.listxattr(ino)
            if not n.startswith(b"user.artifactfs.")
        }

    async def walk(ino: int, prefix: str) -> None:
        a = await fs.getattr(ino)
        tree[prefix or "."] = ("d", a.mode, a.uid, a.gid, a.mtime_ns, a.atime_ns, await xattrs(ino))
        for ent in await fs.readdir(ino, 0, 100000):
            c = await fs.getattr(ent.attr.ino)
            rel = f"{prefix}/{os.fsdecode(ent.name)}" if prefix else os.fsdecode(ent.name)
            groups.setdefault(c.ino, set()).add(rel)
            common = (c.mode, c.uid, c.gid, c.mtime_ns, c.atime_ns, await xattrs(c.ino))
            if stat.S_ISDIR(c.mode):
                await walk(c.ino, rel)
            elif stat.S_ISLNK(c.mode):
                tree[rel] = ("l", *common, await fs.readlink(c.ino))
            elif stat.S_ISREG(c.mode):
                fh = await fs.open(c.ino, os.O_RDONLY, core.caller)
                try:
                    content = await core.read_fh(fh)
                finally:
                    await fs.release(fh)
                tree[rel] = ("f", *common, c.size, content, c.nlink, c.blocks_512)
            else:
                tree[rel] = ("s", *common, c.rdev)

    ino = await core.resolve(top_path)
    if stat.S_ISREG((await fs.getattr(ino)).mode):
        groups[ino] = {"."}
        a = await fs.getattr(ino)
        tree["."] = ("f", a.mode, a.uid, a.gid, a.mtime_ns, a.size, await core.read_file(top_path),
                     await xattrs(ino))
    else:
        await walk(ino, "")
    return tree, {frozenset(g) for g in groups.values() if len(g) > 1}


async def rich_tree(core: Core, *, links: bool = True) -> None:
    fs, caller, bs = core.fs, core.caller, core.bs
    await core.makedirs(f"{WS}/src/pkg")
    await core.makedirs(f"{WS}/docs")
    await core.makedirs(f"{WS}/empty-dir")
    await core.write_file(f"{WS}/src/main.py", b"print('hi')\n")
    await core.write_file(f"{WS}/src/pkg/big.bin", os.urandom(3 * bs + 11))
    await core.write_file(f"{WS}/sparse", b"end", offset=5 * bs)
    await core.write_file(f"{WS}/docs/readme", b"read me")
    await core.write_file(f"{WS}/docs/same-as-readme", b"read me")
    src = await core.resolve(f"{WS}/src")
    await fs.symlink(src, b"link", b"pkg/big.bin", caller)
    docs = await core.resolve(f"{WS}/docs")
    main = await core.resolve(f"{WS}/src/main.py")
    if links:
        await fs.link(main, docs, b"main-hardlink", caller)
    await fs.setxattr(main, b"user.mime_type", b"text/x-python", caller)
    await fs.setxattr(docs, b"user.summary", b"docs", caller)
    await fs.setattr(await core.resolve(f"{WS}/docs/readme"), AttrChanges(mode=0o600), caller)
    await fs.setattr(main, AttrChanges(atime_ns=1_000_000_000, mtime_ns=2_000_000_000), caller)
    await fs.mknod(docs, b"fifo", stat.S_IFIFO | 0o644, 0, caller)


def snapshot(core: Core) -> dict[str, object]:
    """What an import must not touch when it is refused."""
    conn = core.store.index.conn
    return {
        "tables": {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("inodes", "dentries", "namespaces", "scopes", "sandboxes", "checkpoints",
                      "blobs", "events", "blocks")
        },
        "backend": sorted(d for d, _, _ in core.store.backend.iterate()),
    }


async def exported(core: Core, tmp_path: Path, ns_path: str = WS, name: str = "base") -> Path:
    dest = tmp_path / f"{name}.afsckpt"
    await export_checkpoint(
        core.fs.checkpoints, await namespace(core, ns_path), name, dest, actor="tester"
    )
    return dest


# ---- round trips -------------------------------------------------------------------------------


async def test_workspace_round_trip(src: Core, dst: Core, tmp_path: Path) -> None:
    await rich_tree(src)
    ns = await namespace(src)
    row = await src.fs.checkpoints.create(ns, "base", "alice")
    before = await model(src, WS)
    await src.write_file(f"{WS}/src/main.py", b"changed after the checkpoint")
    dest = await exported(src, tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))

    result = await import_checkpoint(
        dst.fs, dest, parse_grid_path(COPY), actor="bob", caller=dst.caller
    )
    assert await model(dst, COPY) == before
    # The checkpoint record travels under its original name.
    got = result.checkpoint
    assert (got.name, got.root, got.created_ns, got.creator, got.files, got.bytes) == (
        "base", row.root, row.created_ns, "alice", row.files, row.bytes,
    )
    assert [r.name for r in dst.fs.checkpoints.list(result.namespace.id)] == ["base"]
    assert result.namespace.kind == "workspace"
    # Everything it names is in the new store, and the live tree equals it.
    assert (await verify_tree(dst.io, row.root)).clean
    assert await diff(dst.fs.checkpoints, result.namespace, row.root, None) == []
    types = [e.type for e in dst.store.index.events(type_prefix="checkpoint.")]
    assert types == ["checkpoint.import", "checkpoint.restore"]
    # Running mounts of the store are told the new names exist (the change feed).
    scope = await dst.resolve("other/user-bob")
    feed = [(kind, ino, name) for _, kind, ino, name in dst.store.index.changes_after(0)]
    assert (CHANGE_ENTRY, scope, b"copy") in feed and (CHANGE_ENTRY, 1, b"other") in feed
    assert [e.type for e in src.store.index.events(type_prefix="checkpoint.")][-1] == (
        "checkpoint.export"
    )
    # The imported checkpoint can be restored again after changes.
    await dst.write_file(f"{COPY}/docs/readme", b"edited")
    await restore(dst.fs.checkpoints, result.namespace, row.root, actor="bob")
    assert await model(dst, COPY) == before


async def test_tree_without_links_imports_to_the_same_root(
    src: Core, dst: Core, tmp_path: Path
) -> None:
    await rich_tree(src, links=False)
    row = await src.fs.checkpoints.create(await namespace(src), "base", "alice")
    dest = await exported(src, tmp_path)
    result = await import_checkpoint(
        dst.fs, dest, parse_grid_path(COPY), actor="bob", caller=dst.caller
    )
    # Times, modes and xattrs included: a checkpoint of the imported tree is the same tree.
    again = await dst.fs.checkpoints.create(result.namespace, "again", "bob")
    assert again.root == row.root
    assert again.manifest_bytes == 0


async def test_blob_namespace_round_trip(src: Core, dst: Core, tmp_path: Path) -> None:
    blob = "acme/shared/blob.bin"
    await src.write_file(blob, os.urandom(2 * src.bs + 5), offset=src.bs)
    ino = await src.resolve(blob)
    await src.fs.setxattr(ino, b"user.mime_type", b"application/octet-stream", src.caller)
    before = await model(src, blob)
    ns = await namespace(src, blob)
    row = await src.fs.checkpoints.create(ns, "v1", "alice")
    dest = await exported(src, tmp_path, blob, "v1")
    result = await import_checkpoint(
        dst.fs, dest, parse_grid_path("other/shared/blob-copy"), actor="bob", caller=dst.caller
    )
    assert result.namespace.kind == "blob"
    assert await model(dst, "other/shared/blob-copy") == before
    assert result.checkpoint.root == row.root
    assert (await verify_tree(dst.io, row.root)).clean


async def test_import_into_existing_scope_and_twice(src: Core, dst: Core, tmp_path: Path) -> None:
    await src.write_file(f"{WS}/f", b"x")
    await src.fs.checkpoints.create(await namespace(src), "base", "alice")
    dest = await exported(src, tmp_path)
    await dst.makedirs("other/user-bob")
    await import_checkpoint(dst.fs, dest, parse_grid_path(COPY), actor="bob", caller=dst.caller)
    before = snapshot(dst)
    with pytest.raises(Exists, match="already exists"):
        await import_checkpoint(
            dst.fs, dest, parse_grid_path(COPY), actor="bob", caller=dst.caller
        )
    assert snapshot(dst) == before
    # The same file again under another name: blobs are shared, nothing new is stored.
    second = await import_checkpoint(
        dst.fs, dest, parse_grid_path("other/user-bob/copy2"), actor="bob", caller=dst.caller
    )
    assert second.stored == 0


async def test_export_refuses_existing_file_and_corrupt_store(src: Core, tmp_path: Path) -> None:
    await src.write_file(f"{WS}/f", b"y" * 100)
    ns = await namespace(src)
    await src.fs.checkpoints.create(ns, "base", "alice")
    dest = tmp_path / "out"
    dest.write_bytes(b"")
    with pytest.raises(Exists):
        await export_checkpoint(src.fs.checkpoints, ns, "base", dest, actor="t")
    with pytest.raises(NotFound):
        await export_checkpoint(src.fs.checkpoints, ns, "nope", tmp_path / "x", actor="t")
    await src.io.drained()
    await src.fs.retire_journal()  # else the journal still holds the block and serves it
    digest = src.store.index.block_map(await src.resolve(f"{WS}/f"))[0]
    path = src.store.backend.path_of(digest)
    os.chmod(path, 0o644)
    original = path.read_bytes()
    path.write_bytes(b"Y" + original[1:])
    try:
        with pytest.raises(Corrupt, match="corrupt in this store"):
            await export_checkpoint(src.fs.checkpoints, ns, "base", tmp_path / "x", actor="t")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
        src.store.backend.delete(digest)
        with pytest.raises(StorageError, match="nothing was exported"):
            await export_checkpoint(src.fs.checkpoints, ns, "base", tmp_path / "x", actor="t")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    finally:
        if src.store.backend.has(digest):
            path.write_bytes(original)
        else:
            src.store.backend.put(digest, original)


async def test_big_directory_round_trip(src: Core, dst: Core, tmp_path: Path) -> None:
    """A directory big enough to be stored in chunks travels whole."""
    await src.makedirs(f"{WS}/many")
    for i in range(150):
        await src.write_file(f"{WS}/many/f{i:03}", f"file {i}".encode())
    row = await src.fs.checkpoints.create(await namespace(src), "base", "alice")
    before = await model(src, WS)
    dest = await exported(src, tmp_path)
    manifests = [doc for _, _, doc in items(dest) if isinstance(doc, list) and doc[0] == "m"]
    assert len(manifests) > 2  # the root, the top of "many" and its chunks
    result = await import_checkpoint(
        dst.fs, dest, parse_grid_path(COPY), actor="bob", caller=dst.caller
    )
    assert await model(dst, COPY) == before
    assert result.checkpoint.files == 150
    assert (await verify_tree(dst.io, row.root)).clean


# ---- refusals ----------------------------------------------------------------------------------


def items(path: Path) -> list[tuple[int, int, Any]]:
    """(start, end, decoded item) for every item of an export file."""
    out = []
    with open(path, "rb") as f:
        dec = cbor2.CBORDecoder(f)
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            start = f.tell()
            doc = dec.decode()
            out.append((start, f.tell(), doc))
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def last_byte_of(path: Path, kind: str, nth: int = 0) -> int:
    found = [end - 1 for _, end, doc in items(path) if isinstance(doc, list) and doc[0] == kind]
    return found[nth]


def rewrite(path: Path, edit: Callable[[list[Any]], list[Any]]) -> None:
    docs = edit([doc for _, _, doc in items(path)])
    buf = io.BytesIO()
    for d in docs:
        buf.write(cbor2.dumps(d, canonical=isinstance(d, dict) and "format" in d))
    path.write_bytes(buf.getvalue())


def drop_item(kind: str, fix_counts: bool) -> Callable[[list[Any]], list[Any]]:
    def edit(docs: list[Any]) -> list[Any]:
        i = next(i for i, d in enumerate(docs) if isinstance(d, list) and d[0] == kind and i > 1)
        del docs[i]
        if fix_counts:
            docs[-1]["end"]["manifests" if kind == "m" else "blocks"] -= 1
        return docs

    return edit


def tamper_header(docs: list[Any]) -> list[Any]:
    docs[0]["checkpoint"]["creator"] = "mallory"
    return docs


def trailing_junk(path: Path) -> None:
    path.write_bytes(path.read_bytes() + cbor2.dumps(["b", b"\0" * 32, b""]))


DAMAGE: dict[str, Callable[[Path], object]] = {
    "flipped block byte": lambda p: flip(p, last_byte_of(p, "b", 1)),
    "flipped manifest byte": lambda p: flip(p, last_byte_of(p, "m", 1)),
    "flipped root manifest byte": lambda p: flip(p, last_byte_of(p, "m", 0)),
    "flipped digest byte": lambda p: flip(p, items(p)[2][0] + 5),
    "truncated in an item": lambda p: p.write_bytes(p.read_bytes()[: items(p)[3][0] + 20]),
    "truncated at an item boundary": lambda p: p.write_bytes(p.read_bytes()[: items(p)[3][0]]),
    "truncated trailer": lambda p: p.write_bytes(p.read_bytes()[:-3]),
    "missing block, counts fixed": lambda p: rewrite(p, drop_item("b", True)),
    "missing manifest, counts fixed": lambda p: rewrite(p, drop_item("m", True)),
    "missing block": lambda p: rewrite(p, drop_item("b", False)),
    "tampered header": lambda p: rewrite(p, tamper_header),
    "data after the trailer": trailing_junk,
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
async def test_damaged_file_is_refused_and_nothing_changes(
    src: Core, dst: Core, tmp_path: Path, how: str
) -> None:
    await rich_tree(src)
    await src.fs.checkpoints.create(await namespace(src), "base", "alice")
    dest = await exported(src, tmp_path)
    DAMAGE[how](dest)
    before = snapshot(dst)
    with pytest.raises(Corrupt) as err:
        await import_checkpoint(
            dst.fs, dest, parse_grid_path(COPY), actor="bob", caller=dst.caller
        )
    assert "nothing was imported" in err.value.message
    assert str(dest) in err.value.message
    assert snapshot(dst) == before


async def test_not_an_export_and_newer_format(dst: Core, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello, world")
    with pytest.raises(InvalidArgument, match="not an artifactfs checkpoint export"):
        await import_checkpoint(dst.fs, junk, parse_grid_path(COPY), actor="b", caller=dst.caller)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(InvalidArgument):
        await import_checkpoint(dst.fs, empty, parse_grid_path(COPY), actor="b", caller=dst.caller)
    newer = tmp_path / "newer"
    newer.write_bytes(cbor2.dumps({"format": portable.FORMAT, "version": 99}))
    with pytest.raises(InvalidArgument, match="newer"):
        await import_checkpoint(dst.fs, newer, parse_grid_path(COPY), actor="b", caller=dst.caller)
    with pytest.raises(NotFound):
        await import_checkpoint(
            dst.fs, tmp_path / "absent", parse_grid_path(COPY), actor="b", caller=dst.caller
        )
    assert find_namespace_or_none(dst, COPY) is None


def find_namespace_or_none(core: Core, path: str) -> NamespaceRow | None:
    try:
        return find_namespace(core.store.index, path)
    except NotFound:
        return None


async def test_block_size_mismatch_is_refused(src: Core, tmp_path: Path) -> None:
    await src.write_file(f"{WS}/f", b"x")
    await src.fs.checkpoints.create(await namespace(src), "base", "alice")
    dest = await exported(src, tmp_path)
    async with open_core(tmp_path / "big-blocks", block_size=8192) as other:
        with pytest.raises(InvalidArgument, match="block-size 4096"):
            await import_checkpoint(
                other.fs, dest, parse_grid_path(COPY), actor="b", caller=other.caller
            )


async def test_failure_after_checks_leaves_nothing_behind(
    src: Core, dst: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rich_tree(src)
    await src.fs.checkpoints.create(await namespace(src), "base", "alice")
    dest = await exported(src, tmp_path)
    before = snapshot(dst)

    async def broken_restore(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(portable, "restore", broken_restore)
    with pytest.raises(OSError, match="disk on fire"):
        await import_checkpoint(dst.fs, dest, parse_grid_path(COPY), actor="b", caller=dst.caller)
    after = snapshot(dst)
    # No namespace, sandbox, scope or checkpoint row remains (the blobs stay, for gc).
    for table in ("namespaces", "scopes", "sandboxes", "checkpoints"):
        assert after["tables"][table] == before["tables"][table], table  # type: ignore[index]
    assert find_namespace_or_none(dst, COPY) is None
    assert dst.store.index.lookup_child(1, b"other") is None


# ---- a hand-made file: shared subtrees -----------------------------------------------------------


def entry(t: str, **kw: Any) -> Entry:
    base: dict[str, Any] = dict(
        type=t, mode=(0o40755 if t == "d" else 0o100644), uid=os.getuid(), gid=os.getgid(),
        atime_ns=1, mtime_ns=2, ctime_ns=3, btime_ns=4,
    )
    base.update(kw)
    return Entry(**base)


def write_export(path: Path, root: bytes, blobs: list[tuple[str, bytes]], files: int,
                 nbytes: int, block_size: int) -> None:
    header = {
        "format": portable.FORMAT, "version": 1, "block_size": block_size,
        "checkpoint": {"name": "hand", "kind": "workspace", "created_ns": 5, "creator": "me",
                       "root": root, "files": files, "bytes": nbytes},
        "source": {}, "exported_ns": 6,
    }
    hb = cbor2.dumps(header, canonical=True)
    with open(path, "wb") as f:
        f.write(hb)
        for kind, data in blobs:
            cbor2.dump([kind, digest_of(data), data], f)
        cbor2.dump({"end": {
            "manifests": sum(k == "m" for k, _ in blobs), "blocks": sum(k == "b" for k, _ in blobs),
            "manifest_bytes": 0, "block_bytes": 0, "header_sha256": hashlib.sha256(hb).digest(),
        }}, f)


async def test_shared_subtree_is_counted_at_every_place(dst: Core, tmp_path: Path) -> None:
    block = b"shared content"
    f = entry("f", size=len(block), blocks=((0, digest_of(block)),),
              sha256=hashlib.sha256(block).digest())
    leaf = Manifest("dir", entry("d"), {b"file": f})
    leaf_data = encode(leaf)
    top = Manifest("dir", entry("d"), {
        b"a": entry("d", manifest=digest_of(leaf_data)),
        b"b": entry("d", manifest=digest_of(leaf_data)),
        b"c": f,
    })
    top_data = encode(top)
    path = tmp_path / "hand.afsckpt"
    blobs = [("m", top_data), ("m", leaf_data), ("b", block)]
    write_export(path, digest_of(top_data), blobs, 3, 3 * len(block), dst.bs)
    result = await import_checkpoint(
        dst.fs, path, parse_grid_path(COPY), actor="b", caller=dst.caller
    )
    assert (result.checkpoint.files, result.checkpoint.bytes) == (3, 3 * len(block))
    for p in ("a/file", "b/file", "c"):
        assert await dst.read_file(f"{COPY}/{p}") == block
    # A header that miscounts is refused.
    write_export(path, digest_of(top_data), blobs, 2, 2 * len(block), dst.bs)
    with pytest.raises(Corrupt, match="file count"):
        await import_checkpoint(
            dst.fs, path, parse_grid_path("other/user-bob/x"), actor="b", caller=dst.caller
        )
