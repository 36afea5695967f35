"""gc in the core tier: what it reclaims, what it must keep (live files, open-unlinked files,
the journal, checkpoints, clean directories' manifests, young blobs), expired sessions, and a
race of gc against a writer."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from coreutil import Core, open_core, workspace

from artifactfs.blobs.journal import Journal, remove_segments
from artifactfs.core.blockio import BlockIO
from artifactfs.core.fs import FileSystem
from artifactfs.core.gc import GcReport, References, _delete_batch, collect
from artifactfs.core.grid import find_namespace
from artifactfs.core.verify import verify_tree
from artifactfs.store import Store

WS = "acme/shared/ws"


@asynccontextmanager
async def gc_store(path: Path) -> AsyncIterator[tuple[Store, FileSystem]]:
    """gc's own connection and backend, as the `artifactfs gc` process has them."""
    store = Store(path)
    io = BlockIO(store.backend, block_size=store.config.block_size)
    fs = FileSystem(store.index, io)
    try:
        yield store, fs
    finally:
        fs.checkpoints.close()
        store.close()


async def run_gc(path: Path, **kw: object) -> GcReport:
    async with gc_store(path) as (store, fs):
        return await collect(store.index, store.backend, fs=fs, **kw)  # type: ignore[arg-type]


def backend_digests(core: Core) -> set[bytes]:
    return {d for d, _, _ in core.store.backend.iterate()}


async def settle(core: Core) -> None:
    """Let the mover store every journalled block and retire its rows."""
    await core.io.drained()
    await core.fs.retire_journal()


async def test_gc_frees_garbage_and_keeps_what_is_referenced(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core, WS)
        old = os.urandom(3 * core.bs)
        await core.write_file(f"{WS}/a", old)
        await core.write_file(f"{WS}/keep", os.urandom(2 * core.bs + 7))
        ns = find_namespace(core.store.index, WS)
        await core.fs.checkpoints.create(ns, "one", "test")
        # Superseded blocks are still referenced by checkpoint "one".
        await core.write_file(f"{WS}/a", os.urandom(3 * core.bs))
        # A file removed after the checkpoint: its blocks stay referenced by "one".
        gone = os.urandom(core.bs)
        await core.write_file(f"{WS}/gone", gone)
        parent = await core.resolve(WS)
        await core.fs.unlink(parent, b"gone", core.caller)
        # An orphan: put, never committed (a crash between put and commit).
        orphan = os.urandom(100)
        orphan_d = hashlib.sha256(orphan).digest()
        core.store.backend.put(orphan_d, orphan)
        await settle(core)
        old_digests = {hashlib.sha256(old[i : i + core.bs]).digest() for i in (0, 4096, 8192)}
        gone_d = hashlib.sha256(gone).digest()
        assert old_digests <= backend_digests(core)

    # Dry run: reports, deletes nothing.
    report = await run_gc(path, grace_s=0, dry_run=True)
    assert report.blobs >= 2 and report.nbytes >= 100 + 4096
    async with open_core(path) as core:
        assert orphan_d in backend_digests(core)

    report = await run_gc(path, grace_s=0)
    # the orphan, and the block of "gone" (never in a checkpoint)
    assert report.blobs == 2 and report.nbytes == 100 + 4096
    async with open_core(path) as core:
        have = backend_digests(core)
        assert orphan_d not in have and gone_d not in have
        assert old_digests <= have  # checkpoint "one" still names them
        ns = find_namespace(core.store.index, WS)
        row = core.fs.checkpoints.get(ns.id, "one")
        assert (await verify_tree(core.io, row.root)).clean
        await core.fs.checkpoints.delete(ns, "one", "test")
        events = core.store.index.events(type_prefix="gc.run")
        assert len(events) == 1 and events[0].payload["blobs"] == 2

    report = await run_gc(path, grace_s=0)
    assert report.blobs >= 3  # the superseded blocks of "a", "one"'s root manifest
    async with open_core(path) as core:
        have = backend_digests(core)
        assert not (old_digests & have)
        # The live files are intact (open_core's invariant check reads every block too).
        assert len(await core.read_file(f"{WS}/a")) == 3 * core.bs
        # The clean directory's manifest was kept: the next checkpoint reuses it unread.
        ns = find_namespace(core.store.index, WS)
        row = await core.fs.checkpoints.create(ns, "two", "test")
        assert (await verify_tree(core.io, row.root)).clean


async def test_grace_period_keeps_young_blobs(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        data = os.urandom(50)
        core.store.backend.put(hashlib.sha256(data).digest(), data)
    report = await run_gc(path)  # default grace: an hour
    assert report.blobs == 0 and report.kept_young == 1
    report = await run_gc(path, grace_s=0)
    assert report.blobs == 1 and report.nbytes == 50


async def test_open_unlinked_file_and_journal_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core, WS)
        data = os.urandom(2 * core.bs)
        await core.write_file(f"{WS}/f", data)
        fh = await core.open(f"{WS}/f")
        parent = await core.resolve(WS)
        await core.fs.unlink(parent, b"f", core.caller)
        await settle(core)
        report = await run_gc(path, grace_s=0)
        assert report.blobs == 0
        assert await core.read_fh(fh) == data
        await core.fs.release(fh)
        # A blob only the journal names (committed, its put not yet retired) is kept.
        data = os.urandom(77)
        digest = hashlib.sha256(data).digest()
        core.store.backend.put(digest, data)
        other = Journal(core.store.journal_dir)  # another daemon's journal
        other.append(digest, data)
        report = await run_gc(path, grace_s=0)
        assert report.blobs == 0 and core.store.backend.has(digest)
        other.stored(digest)
        remove_segments(other.drop(other.retirable()))
        other.close()
        report = await run_gc(path, grace_s=0)
        assert report.blobs == 1 and not core.store.backend.has(digest)


async def test_recheck_keeps_a_blob_referenced_after_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core, WS)
        data = os.urandom(300)
        digest = hashlib.sha256(data).digest()
        core.store.backend.put(digest, data)  # garbage as gc's snapshot sees it
        refs = References()
        # ... then a writer commits a file whose only block is that blob.
        await core.write_file(f"{WS}/late", data)
        async with gc_store(path) as (store, _):
            gone, _ = await _delete_batch(store.index, store.backend, [digest], refs, 0, None)
        assert gone == []
        assert core.store.backend.has(digest)
        # A checkpoint recorded after the snapshot is walked before anything is deleted.
        ns = find_namespace(core.store.index, WS)
        row = await core.fs.checkpoints.create(ns, "late", "test")
        parent = await core.resolve(WS)
        await core.fs.unlink(parent, b"late", core.caller)
        await settle(core)
        async with gc_store(path) as (store, _):
            gone, _ = await _delete_batch(
                store.index, store.backend, [digest, row.root], refs, 0, None
            )
        assert gone == [] and row.root in refs.roots


async def test_expired_session_is_destroyed(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core, "acme/sess-s1/ws")
        await workspace(core, "acme/sess-s2/ws")
        await core.write_file("acme/sess-s1/ws/f", os.urandom(3 * core.bs))
        await core.makedirs("acme/sess-s1/ws/d/e")
        await core.write_file("acme/sess-s1/ws/d/e/g", b"deep")
        await core.write_file("acme/sess-s1/blob", b"a blob namespace")
        ns = find_namespace(core.store.index, "acme/sess-s1/ws")
        await core.fs.checkpoints.create(ns, "c", "test")
        now = time.time_ns()
        core.store.index.conn.execute(
            "UPDATE scopes SET expires_ns = ? WHERE name = 'sess-s1'", (now - 1,)
        )
        core.store.index.conn.execute(
            "UPDATE scopes SET expires_ns = ? WHERE name = 'sess-s2'", (now + 10**12,)
        )
        await settle(core)
    report = await run_gc(path, grace_s=0, dry_run=True)
    assert report.sessions == ["acme/sess-s1"] and report.namespaces == 2
    report = await run_gc(path, grace_s=0)
    assert report.sessions == ["acme/sess-s1"] and report.namespaces == 2
    assert report.blobs >= 4  # the files' blocks and the checkpoint's manifests
    async with open_core(path) as core:
        assert await core.listdir("acme") == [b"sess-s2"]
        assert core.store.index.ops_expired_sessions(time.time_ns()) == []
        assert core.store.index.count_namespaces() == 1
        types = [e.type for e in core.store.index.events()]
        assert types.count("namespace.destroy") == 2 and "scope.destroy" in types
        destroyed = [e.payload for e in core.store.index.events(type_prefix="namespace.destroy")]
        assert ["c"] in [p["checkpoints_deleted"] for p in destroyed]
        assert core.store.index.ops_checkpoints() == []


async def test_gc_races_a_writer(tmp_path: Path) -> None:
    """A writer creates, rewrites and removes files and takes checkpoints while gc runs over
    and over with a grace period far shorter than the run: by the end, blobs that live files
    and checkpoints use are much older than the grace period, so only the references keep
    them. Every live file and every checkpoint must be intact, and gc must have freed the
    superseded blocks."""
    path = tmp_path / "s"
    grace = 0.2
    expected: dict[str, bytes] = {}
    reports: list[GcReport] = []
    async with open_core(path) as core:
        await workspace(core, WS)
        ns = find_namespace(core.store.index, WS)
        started = time.monotonic()
        done = trio.Event()

        async def writer() -> None:
            try:
                i = 0
                while time.monotonic() - started < 4.0:
                    name = f"{WS}/f{i % 40}"
                    data = os.urandom((i * 2311) % (5 * core.bs) + 1)
                    if name in expected:  # replace: its old blocks become garbage
                        parent = await core.resolve(WS)
                        await core.fs.unlink(parent, name.rsplit("/", 1)[1].encode(), core.caller)
                    await core.write_file(name, data)
                    expected[name] = data
                    if i % 7 == 3:
                        victim = f"{WS}/f{(i * 13) % 40}"
                        if victim in expected:
                            parent = await core.resolve(WS)
                            await core.fs.unlink(
                                parent, victim.rsplit("/", 1)[1].encode(), core.caller
                            )
                            del expected[victim]
                    if i % 25 == 0:
                        await core.fs.checkpoints.create(ns, f"c{i}", "test")
                    if i % 50 == 49:
                        oldest = core.fs.checkpoints.list(ns.id)[0]
                        await core.fs.checkpoints.delete(ns, oldest.name, "test")
                    i += 1
                    await trio.sleep(0)
            finally:
                done.set()

        async def collector() -> None:
            async with gc_store(path) as (store, fs):
                while not done.is_set():
                    reports.append(await collect(store.index, store.backend, fs=fs, grace_s=grace))
                    await trio.sleep(0.01)
                await settle(core)
                reports.append(await collect(store.index, store.backend, fs=fs, grace_s=grace))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(collector)

        assert len(reports) >= 5
        assert sum(r.blobs for r in reports) > 0, "gc never freed anything: the race is vacuous"
        assert all(not r.lost for r in reports)
        for name, data in expected.items():
            assert await core.read_file(name) == data, name
        for row in core.fs.checkpoints.list(ns.id):
            assert (await verify_tree(core.io, row.root)).clean, row.name
