"""Checkpoint verification in the core tier: a clean tree verifies clean; a corrupt or missing
block, a corrupt or missing manifest and a wrong whole-file digest are each found, with the
paths they affect; holes and short blocks hash as zeros; each distinct block is read for its
digest check once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from coreutil import Core, open_core

import artifactfs.core.verify as verify_mod
from artifactfs.core.manifest import Manifest, digest_of, encode
from artifactfs.core.nodes import AttrChanges
from artifactfs.core.verify import (
    CORRUPT_BLOCK,
    CORRUPT_MANIFEST,
    MISSING_BLOCK,
    MISSING_MANIFEST,
    WRONG_FILE_DIGEST,
    verify_tree,
)
from artifactfs.index.db import CheckpointRow, NamespaceRow

WS = "acme/shared/ws"


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    # check=False: these tests damage the blob store on purpose.
    async with open_core(tmp_path / "store", check=False) as c:
        await c.makedirs(WS)
        yield c


async def namespace(core: Core, path: str = WS) -> NamespaceRow:
    ns = core.store.index.namespace_by_root(await core.resolve(path))
    assert ns is not None
    return ns


async def tree(core: Core) -> CheckpointRow:
    """Files of several shapes: multi-block with a short last block, sparse (leading and
    trailing holes), empty, two names of one file, two files sharing a block, a symlink."""
    fs, caller, bs = core.fs, core.caller, core.bs
    await core.makedirs(f"{WS}/d/e")
    await core.write_file(f"{WS}/d/big", os.urandom(3 * bs + 100))
    await core.write_file(f"{WS}/d/e/sparse", b"tail", offset=4 * bs + 5)
    await core.write_file(f"{WS}/empty", b"")
    shared = b"S" * bs
    await core.write_file(f"{WS}/one", shared + b"one")
    await core.write_file(f"{WS}/two", shared + b"two!")
    f = await core.resolve(f"{WS}/one")
    d = await core.resolve(f"{WS}/d")
    await fs.link(f, d, b"one-again", caller)
    await fs.symlink(d, b"ln", b"../one", caller)
    # Grow a file past its last block: a hole at the end.
    ino = await core.resolve(f"{WS}/d/big")
    await fs.setattr(ino, AttrChanges(size=6 * bs), caller)
    row = await core.fs.checkpoints.create(await namespace(core), "c", "tester")
    await core.io.drained()  # every block in the backend, not only in the journal
    return row


def damage(core: Core, digest: bytes) -> None:
    path = core.store.backend.path_of(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))


async def block_of(core: Core, path: str, idx: int = 0) -> bytes:
    blocks = core.store.index.block_map(await core.resolve(path))
    return blocks[idx]


async def test_clean_tree(core: Core) -> None:
    row = await tree(core)
    report = await verify_tree(core.io, row.root)
    assert report.clean, [str(f) for f in report.findings]
    assert report.manifests == 3  # ws, d, d/e
    # big: 4 blocks; sparse: 1; one/two: the shared block + one tail each.
    assert report.blocks == 4 + 1 + 3
    # big, sparse, empty, one (= one-again), two.
    assert report.files == 5


async def test_corrupt_block_lists_every_file_using_it(core: Core) -> None:
    row = await tree(core)
    shared = await block_of(core, f"{WS}/one")
    damage(core, shared)
    report = await verify_tree(core.io, row.root)
    assert [(f.kind, f.digest) for f in report.findings] == [(CORRUPT_BLOCK, shared)]
    assert set(report.findings[0].paths) == {"one", "d/one-again", "two"}


async def test_missing_block(core: Core) -> None:
    row = await tree(core)
    digest = await block_of(core, f"{WS}/d/e/sparse", 4)
    assert core.store.backend.delete(digest)
    report = await verify_tree(core.io, row.root)
    assert [(f.kind, f.paths) for f in report.findings] == [(MISSING_BLOCK, ("d/e/sparse",))]


async def test_block_only_in_the_journal_is_not_missing(core: Core) -> None:
    row = await tree(core)
    digest = await block_of(core, f"{WS}/two", 1)
    data = core.store.backend.get(digest)
    core.store.backend.delete(digest)
    report = await verify_tree(core.io, row.root, journal={digest: data})
    assert report.clean
    core.store.backend.put(digest, data)


async def test_corrupt_and_missing_manifest(core: Core) -> None:
    row = await tree(core)
    top = await core.fs.checkpoints.manifest(row.root)
    d = top.entries[b"d"].manifest
    assert d is not None
    sub = await core.fs.checkpoints.manifest(d)
    e = sub.entries[b"e"].manifest
    assert e is not None
    damage(core, d)
    report = await verify_tree(core.io, row.root)
    # d is unreadable, so nothing below it is reached; the rest of the tree still is.
    assert [(f.kind, f.digest, f.paths) for f in report.findings] == [(CORRUPT_MANIFEST, d, ("d",))]
    assert report.files == 3  # empty, one, two
    core.store.backend.delete(d)
    report = await verify_tree(core.io, row.root)
    assert [(f.kind, f.paths) for f in report.findings] == [(MISSING_MANIFEST, ("d",))]
    # The root itself.
    damage(core, row.root)
    report = await verify_tree(core.io, row.root)
    assert [(f.kind, f.paths) for f in report.findings] == [(CORRUPT_MANIFEST, (".",))]
    assert report.files == 0


async def test_wrong_file_digest(core: Core) -> None:
    await core.write_file(f"{WS}/f", b"content" * 1000)
    row = await core.fs.checkpoints.create(await namespace(core), "c", "tester")
    await core.io.drained()
    m = await core.fs.checkpoints.manifest(row.root)
    good = m.entries[b"f"]
    bad = dataclasses.replace(good, sha256=b"\1" * 32)
    forged = Manifest("dir", m.self_entry, {**m.entries, b"f": bad, b"g": good})
    data = encode(forged)
    root = digest_of(data)
    core.store.backend.put(root, data)
    report = await verify_tree(core.io, root)
    assert [(f.kind, f.paths) for f in report.findings] == [(WRONG_FILE_DIGEST, ("f",))]


async def test_each_distinct_block_is_read_for_its_check_once(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    bs = core.bs
    shared = b"x" * bs
    for i in range(6):  # six different files, all starting with the same block
        await core.write_file(f"{WS}/f{i}", shared + bytes([i + 1]) * 10)
    row = await core.fs.checkpoints.create(await namespace(core), "c", "tester")
    await core.io.drained()
    hashed: list[bytes] = []
    real = verify_mod.hashlib.sha256

    def spy(data: bytes = b"") -> object:
        if data:
            hashed.append(bytes(data[:1]))
        return real(data)

    monkeypatch.setattr(verify_mod.hashlib, "sha256", spy)
    report = await verify_tree(core.io, row.root)
    assert report.clean and report.blocks == 7
    # Block digest checks hash whole blocks once each (the shared one once, not six times);
    # the whole-file hashes are fed with update(), not counted here.
    assert hashed.count(b"x") == 1


async def test_chunked_directory(core: Core) -> None:
    """A big directory is stored as a top manifest and chunks: each chunk is verified, and a
    corrupt one is reported at the directory's path while the other chunks' files still are
    checked."""
    await core.makedirs(f"{WS}/many")
    n = 150
    for i in range(n):
        await core.write_file(f"{WS}/many/f{i:03}", f"file {i}".encode())
    row = await core.fs.checkpoints.create(await namespace(core), "c", "tester")
    await core.io.drained()
    report = await verify_tree(core.io, row.root)
    assert report.clean and report.files == n
    top = await core.fs.checkpoints.manifest(row.root)
    many = top.entries[b"many"].manifest
    assert many is not None
    raw = await core.fs.checkpoints.raw(many)
    assert len(raw.chunks) > 1
    assert report.manifests == 2 + len(raw.chunks)
    chunk = raw.chunks[0]
    in_chunk = len((await core.fs.checkpoints.raw(chunk)).entries)
    damage(core, chunk)
    report = await verify_tree(core.io, row.root)
    assert [(f.kind, f.digest, f.paths) for f in report.findings] == [
        (CORRUPT_MANIFEST, chunk, ("many",))
    ]
    assert report.files == n - in_chunk
