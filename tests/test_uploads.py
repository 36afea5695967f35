"""The write-back upload queue of an S3 store, driven through the core (no FUSE) against a real
SeaweedFS: uploads drain, the queue survives a kill, the store going away and coming back,
the cache budget when uploads cannot go, reconcile, and index backup + restore-from-bucket."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
import trio
from coreutil import Core, crashing_core, open_core, workspace
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.s3 import S3Credentials
from artifactfs.core.uploads import Uploader, backup_index
from artifactfs.errors import NoSpace, StorageError
from artifactfs.store import S3Settings, Store, init_store, restore_store

CREDS = S3Credentials(ACCESS_KEY, SECRET_KEY)
BS = 4096


def settings(server: S3Server, bucket: str, prefix: str, **kw: object) -> S3Settings:
    base: dict[str, object] = {
        "endpoint": server.endpoint, "bucket": bucket, "prefix": prefix, "region": REGION,
        "connect_timeout": 1.0, "read_timeout": 2.0, "fetch_timeout": 3.0, "full_wait": 2.0,
    }  # fmt: skip
    base.update(kw)
    return S3Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def s3_store(tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str) -> Path:
    path = tmp_path / "store"
    init_store(path, block_size=BS, s3=settings(s3_server, s3_bucket, s3_prefix),
               credentials=CREDS)  # fmt: skip
    return path


def data_of(seed: str, size: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


FILES = {f"acme/shared/ws/f{i}": data_of(f"file-{i}", 1000 + i * 7000) for i in range(8)}


async def write_files(core: Core, files: dict[str, bytes] = FILES) -> None:
    await workspace(core)
    for path, data in files.items():
        await core.write_file(path, data)


def cached_backend(core_or_store: Core | Store) -> CachedBackend:
    store = core_or_store.store if isinstance(core_or_store, Core) else core_or_store
    assert isinstance(store.backend, CachedBackend)
    return store.backend


def bucket_digests(backend: CachedBackend) -> set[bytes]:
    return {d for d, _, _ in backend.remote.iterate()}


def index_digests(store: Store) -> set[bytes]:
    return {bytes(d) for (d,) in store.index.conn.execute("SELECT digest FROM blobs")}


async def test_uploads_drain(s3_store: Path) -> None:
    async with open_core(s3_store, block_size=BS) as core, trio.open_nursery() as nursery:
        backend = cached_backend(core)
        assert core.store.index.remote
        await write_files(core)
        await core.fs.shutdown()  # the mover has stored every journalled block
        n, size = core.store.index.upload_queue_stats()
        assert n > 0 and size > 0
        assert bucket_digests(backend) == set()  # writes went to the cache only
        up = Uploader(core.store.index, backend, backup_interval=None)
        nursery.start_soon(up.run)
        assert await up.drain(30)
        assert core.store.index.upload_queue_stats() == (0, 0)
        assert bucket_digests(backend) == index_digests(core.store)
        assert backend.pinned() == []
        nursery.cancel_scope.cancel()


async def test_queue_survives_kill_and_bucket_serves_reads(s3_store: Path) -> None:
    async with crashing_core(s3_store, block_size=BS) as core:
        await write_files(core)  # closed files are committed; the uploader never ran
    store = Store(s3_store)
    try:
        n, _ = store.index.upload_queue_stats()
        assert n > 0
        backend = cached_backend(store)
        assert bucket_digests(backend) == set()
        async with trio.open_nursery() as nursery:
            up = Uploader(store.index, backend, backup_interval=None)
            nursery.start_soon(up.run)
            assert await up.drain(30)
            nursery.cancel_scope.cancel()
        assert index_digests(store) <= bucket_digests(backend)
    finally:
        store.close()
    # A lost cache: every block comes back from the bucket, verified.
    shutil.rmtree(s3_store / "cache")
    (s3_store / "cache").mkdir()
    store = Store(s3_store)
    try:
        backend = cached_backend(store)
        digests = index_digests(store)
        for d in digests:
            assert hashlib.sha256(backend.get(d)).digest() == d
        assert backend.misses == len(digests)
    finally:
        store.close()
    async with open_core(s3_store, block_size=BS) as core:
        for path, data in FILES.items():
            assert await core.read_file(path) == data


async def test_store_away_then_back(s3_store: Path, s3_server: S3Server) -> None:
    async with open_core(s3_store, block_size=BS) as core, trio.open_nursery() as nursery:
        backend = cached_backend(core)
        up = Uploader(core.store.index, backend, backoff_max=1.0, backup_interval=None)
        nursery.start_soon(up.run)
        s3_server.pause()
        try:
            await write_files(core)  # writes go on into the cache
            await core.fs.shutdown()
            with trio.move_on_after(25):
                while not up.store_away:
                    await trio.sleep(0.1)
            assert up.store_away
            assert core.store.index.upload_queue_stats()[0] > 0
        finally:
            s3_server.resume()
        t = time.monotonic()
        assert await up.drain(30)  # resumed by itself
        assert time.monotonic() - t < 20
        assert not up.store_away
        assert index_digests(core.store) <= bucket_digests(backend)
        nursery.cancel_scope.cancel()


async def test_full_cache_gives_nospace_while_store_away(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    # Blocks above 64 KiB: they are stored on the commit path, so the writer sees NoSpace.
    # (Smaller ones are journalled in the index and stored by the mover, which retries.)
    bs = 128 * 1024
    path = tmp_path / "small"
    init_store(path, block_size=bs, credentials=CREDS,
               s3=settings(s3_server, s3_bucket, s3_prefix, cache_size=4 * bs,
                           full_wait=1.0))  # fmt: skip
    s3_server.pause()
    try:
        with trio.fail_after(60):
            async with open_core(path, block_size=bs, check=False) as core:
                await workspace(core)
                fits = data_of("fits", 3 * bs)
                await core.write_file("acme/shared/ws/fits", fits)
                t = time.monotonic()
                with pytest.raises(NoSpace):
                    await core.write_file("acme/shared/ws/big", data_of("big", 8 * bs))
                assert 0.9 < time.monotonic() - t < 30
                assert await core.read_file("acme/shared/ws/fits") == fits
    finally:
        s3_server.resume()


async def test_read_of_bucket_only_block_fails_within_bound(
    s3_store: Path, s3_server: S3Server
) -> None:
    async with open_core(s3_store, block_size=BS) as core, trio.open_nursery() as nursery:
        backend = cached_backend(core)
        await write_files(core, {"acme/shared/ws/x": data_of("x", 5 * BS)})
        await core.fs.shutdown()
        up = Uploader(core.store.index, backend, backup_interval=None)
        nursery.start_soon(up.run)
        assert await up.drain(30)
        nursery.cancel_scope.cancel()
    shutil.rmtree(s3_store / "cache")
    (s3_store / "cache").mkdir()
    s3_server.pause()
    try:
        async with open_core(s3_store, block_size=BS, check=False) as core:
            t = time.monotonic()
            with pytest.raises(StorageError):
                await core.read_file("acme/shared/ws/x")
            assert time.monotonic() - t < 15
    finally:
        s3_server.resume()


async def test_reconcile_unpins_blocks_the_bucket_has(s3_store: Path) -> None:
    store = Store(s3_store)
    try:
        backend = cached_backend(store)
        data = data_of("reconcile", 3000)
        d = hashlib.sha256(data).digest()
        backend.remote.put_object(d, data)  # in the bucket already ...
        backend.put(d, data)  # ... and put again into the cache: pinned
        store.index.remote = False
        with store.index.txn():
            store.index.record_blobs([(d, len(data))], time.time_ns())  # recorded uploaded
        store.index.remote = True
        up = Uploader(store.index, backend, backup_interval=None)
        assert await up.reconcile(min_age=60) == 0  # too young: its commit may be on its way
        assert await up.reconcile(min_age=0) == 1
        assert backend.pinned() == []
        assert os.stat(backend.local.path_of(d)).st_mode & 0o777 == 0o400
    finally:
        store.close()


async def test_backup_and_restore_from_bucket(
    s3_store: Path, tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    async with open_core(s3_store, block_size=BS) as core, trio.open_nursery() as nursery:
        backend = cached_backend(core)
        await write_files(core)
        await core.fs.shutdown()
        core.store.index.flush()
        up = Uploader(core.store.index, backend, backup_interval=None)
        nursery.start_soon(up.run)
        assert await up.drain(30)
        for _ in range(3):
            name = await backup_index(core.store.index, backend.remote, keep=2)
        assert backend.remote.list_named() == sorted(backend.remote.list_named())
        assert len(backend.remote.list_named()) == 2
        assert backend.remote.list_named()[-1] == name
        nursery.cancel_scope.cancel()
    original = Store(s3_store)
    store_id = original.config.store_id
    original.close()

    restored = tmp_path / "restored"
    config, report = restore_store(restored, settings(s3_server, s3_bucket, s3_prefix), CREDS)
    assert config.store_id == store_id
    assert config.block_size == BS
    assert report.lost == 0
    assert os.stat(restored / "s3-credentials.json").st_mode & 0o777 == 0o600
    assert ACCESS_KEY not in (restored / "store.json").read_text()
    async with open_core(restored, block_size=BS) as core:
        for path, data in FILES.items():
            assert await core.read_file(path) == data
        assert core.store.index.mounts() == []


def test_restore_without_backup_is_one_line(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    from artifactfs.errors import StoreError

    with pytest.raises(StoreError) as info:
        restore_store(tmp_path / "r", settings(s3_server, s3_bucket, s3_prefix), CREDS)
    assert "no index backup" in info.value.message


async def test_journalled_block_is_stored_then_uploaded_and_lost_one_reported(
    s3_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(s3_store)
    try:
        backend = cached_backend(store)
        journalled = data_of("journalled", 2000)
        jd = hashlib.sha256(journalled).digest()
        lost = data_of("lost", 2000)
        ld = hashlib.sha256(lost).digest()
        store.open_journal().append(jd, journalled)  # journalled; the mover never ran
        with store.index.txn():
            store.index.record_blobs([(jd, len(journalled)), (ld, len(lost))], time.time_ns())
        assert store.index.upload_queue_stats()[0] == 2
        async with trio.open_nursery() as nursery:
            up = Uploader(store.index, backend, backup_interval=None)
            nursery.start_soon(up.run)
            with caplog.at_level("ERROR"):
                assert not await up.drain(20)  # the lost one can never go
            nursery.cancel_scope.cancel()
        assert backend.remote.get(jd) == journalled
        assert store.index.upload_queue(10) == [(ld, len(lost))]
        assert up.lost == {ld}
        assert "neither in the local cache nor in the bucket" in caplog.text
    finally:
        store.close()


async def test_block_stored_by_the_mover_meanwhile_is_not_reported_lost(
    s3_store: Path,
) -> None:
    """The race of a queued small block: the uploader finds it neither in the cache nor
    journalled only because the mover stored it (and its journal row went) in between. It is
    uploaded from the cache next round, not written off as lost."""
    store = Store(s3_store)
    try:
        backend = cached_backend(store)
        data = data_of("moved meanwhile", 3000)
        digest = hashlib.sha256(data).digest()
        with store.index.txn():
            store.index.record_blobs([(digest, len(data))], time.time_ns())
        backend.put(digest, data)  # the mover's put; no journal row any more
        up = Uploader(store.index, backend, backup_interval=None)
        assert await up._not_cached(digest) is False
        assert up.lost == set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(up.run)
            assert await up.drain(20)
            nursery.cancel_scope.cancel()
        assert backend.remote.get(digest) == data
    finally:
        store.close()


async def test_uploader_puts_a_journalled_block_without_waiting_for_room(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    """A cache full of pinned blocks: the uploader's put of a journalled block fails at once
    (it would wait for itself) and switches to uploading the pinned blocks first."""
    path = tmp_path / "store"
    init_store(path, block_size=BS, credentials=CREDS,
               s3=settings(s3_server, s3_bucket, s3_prefix, cache_size=64 * 1024,
                           full_wait=30.0))  # fmt: skip
    store = Store(path)
    try:
        backend = cached_backend(store)
        pinned = [data_of(f"pinned-{i}", 16 * 1024) for i in range(4)]
        journalled = data_of("journalled", 16 * 1024)
        jd = hashlib.sha256(journalled).digest()
        store.open_journal().append(jd, journalled)
        with store.index.txn():  # the journalled block is the oldest row of the queue
            store.index.record_blobs([(jd, len(journalled))], time.time_ns() - 10**9)
            store.index.record_blobs(
                [(hashlib.sha256(p).digest(), len(p)) for p in pinned], time.time_ns()
            )
        for p in pinned:  # the cache is now full of blocks not yet uploaded
            backend.put(hashlib.sha256(p).digest(), p)
        up = Uploader(store.index, backend, batch=1, backup_interval=None)
        t = time.monotonic()
        assert await up._not_cached(jd) is False
        assert time.monotonic() - t < 5, "waited for room the uploader itself must make"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(up.run)
            assert await up.drain(60)
            nursery.cancel_scope.cancel()
        assert backend.remote.get(jd) == journalled
        for p in pinned:
            assert backend.remote.get(hashlib.sha256(p).digest()) == p
    finally:
        store.close()
