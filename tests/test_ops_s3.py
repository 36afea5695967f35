"""gc, fsck and stats on an S3 store, against a real SeaweedFS: gc deletes in the bucket (batched)
and leaves blocks not yet uploaded alone; fsck checks the bucket's keys against the index
(missing, orphaned, corrupt objects) and repairs what needs no guessing; stats shows the cache.
Commands run as a user runs them (the `artifactfs` CLI) where the outcome is visible from
outside; gc's batching and pinned blocks are checked in process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from coreutil import open_core, workspace
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.s3 import S3Credentials
from artifactfs.core.blockio import BlockIO
from artifactfs.core.fs import FileSystem
from artifactfs.core.fsck import CORRUPT_BLOB, MISSING_BLOB, NOT_IN_BUCKET, ORPHAN_BLOB, check
from artifactfs.core.gc import GcReport, collect
from artifactfs.core.grid import find_namespace
from artifactfs.core.uploads import Uploader
from artifactfs.store import S3Settings, Store, init_store

AFS = str(Path(sys.executable).parent / "artifactfs")
BS = 4096
WS = "acme/shared/ws"


@pytest.fixture
def s3_store(tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str) -> Path:
    path = tmp_path / "store"
    settings = S3Settings(endpoint=s3_server.endpoint, bucket=s3_bucket, prefix=s3_prefix,
                          region=REGION, cache_size=64 << 20)  # fmt: skip
    init_store(path, block_size=BS, s3=settings, credentials=S3Credentials(ACCESS_KEY, SECRET_KEY))
    return path


def afs(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the store's keys
    return subprocess.run([AFS, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=env)  # fmt: skip


def data_of(seed: str, blocks: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(blocks * BS)


def block_digests(data: bytes) -> set[bytes]:
    return {hashlib.sha256(data[i : i + BS]).digest() for i in range(0, len(data), BS)}


def key_of(prefix: str, digest: bytes) -> str:
    h = digest.hex()
    return f"{prefix}/sha256/{h[0:2]}/{h[2:4]}/{h}"


def bucket_keys(server: S3Server, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    pages = server.client().get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/sha256/"):
        keys |= {o["Key"] for o in page.get("Contents") or []}
    return keys


def cache_file(store: Path, digest: bytes) -> Path:
    h = digest.hex()
    return store / "cache" / "sha256" / h[0:2] / h[2:4] / h


async def upload_all(store_path: Path) -> None:
    """What a mount's uploader (or `artifactfs sync`) does: the whole queue to the bucket."""
    store = Store(store_path)
    try:
        assert isinstance(store.backend, CachedBackend)
        up = Uploader(store.index, store.backend, backup_interval=None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(up.run)
            assert await up.drain(60)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def run_gc(path: Path, **kw: Any) -> GcReport:
    store = Store(path)
    fs = FileSystem(store.index, BlockIO(store.backend, block_size=BS))
    try:
        return await collect(store.index, store.backend, fs=fs, **kw)
    finally:
        fs.checkpoints.close()
        store.close()


async def unlink(path: Path, *names: str) -> None:
    async with open_core(path, block_size=BS) as core:
        parent = await core.resolve(WS)
        for name in names:
            await core.fs.unlink(parent, name.encode(), core.caller)


async def test_gc_deletes_unreferenced_objects_in_the_bucket(
    s3_store: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    keep, gone = data_of("keep", 3), data_of("gone", 4)
    async with open_core(s3_store, block_size=BS) as core:
        await workspace(core, WS)
        await core.write_file(f"{WS}/keep", keep)
        await core.write_file(f"{WS}/gone", gone)
    await upload_all(s3_store)
    keep_keys = {key_of(s3_prefix, d) for d in block_digests(keep)}
    gone_keys = {key_of(s3_prefix, d) for d in block_digests(gone)}
    assert keep_keys | gone_keys <= bucket_keys(s3_server, s3_bucket, s3_prefix)
    await unlink(s3_store, "gone")
    # Two of the garbage blocks only in the bucket (evicted from the cache): their age is
    # the object's LastModified, a moment ago.
    evicted = sorted(block_digests(gone))[:2]
    for d in evicted:
        cache_file(s3_store, d).unlink()
    store = str(s3_store)

    res = afs("gc", "--store", store)  # default grace: an hour
    assert res.returncode == 0, res.stderr
    assert "freed 0 blobs" in res.stdout and "younger than the grace period" in res.stdout
    res = afs("gc", "--dry-run", "--grace", "0", "--store", store)
    assert res.returncode == 0, res.stderr
    assert "would free 4 blobs (16.0 KiB)" in res.stdout, res.stdout
    assert gone_keys <= bucket_keys(s3_server, s3_bucket, s3_prefix)
    assert all(cache_file(s3_store, d).exists() for d in block_digests(gone) - set(evicted))

    res = afs("gc", "--grace", "0", "--store", store)
    assert res.returncode == 0, res.stderr
    assert "freed 4 blobs (16.0 KiB)" in res.stdout, res.stdout
    left = bucket_keys(s3_server, s3_bucket, s3_prefix)
    assert not gone_keys & left
    assert keep_keys <= left
    assert not any(cache_file(s3_store, d).exists() for d in block_digests(gone))
    async with open_core(s3_store, block_size=BS) as core:
        assert await core.read_file(f"{WS}/keep") == keep
        (event,) = core.store.index.events(type_prefix="gc.run")[-1:]
        assert event.payload["blobs"] == 4


async def test_gc_keeps_blocks_not_yet_uploaded_and_deletes_in_batches(
    s3_store: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    live, dead = data_of("live", 2), data_of("dead", 3)
    uncommitted = b"u" * 700
    u_digest = hashlib.sha256(uncommitted).digest()
    async with open_core(s3_store, block_size=BS) as core:
        await workspace(core, WS)
        await core.write_file(f"{WS}/live", live)
        await core.write_file(f"{WS}/dead", dead)
        core.store.backend.put(u_digest, uncommitted)  # a put whose commit has not come yet
    await unlink(s3_store, "dead")  # garbage before its upload: its rows are still queued
    assert bucket_keys(s3_server, s3_bucket, s3_prefix) == set()

    report = await run_gc(s3_store, grace_s=0)
    assert report.blobs == 0 and report.kept_pinned == 3 + 1
    for d in block_digests(live) | block_digests(dead) | {u_digest}:
        assert cache_file(s3_store, d).exists()
    store = Store(s3_store)
    assert store.index.upload_queue_stats()[0] == 2 + 3  # the uploader still owns them
    store.close()

    # Uploaded (the uncommitted block as the uploader's reconcile does with old orphans),
    # the garbage goes from the bucket and the cache in one DeleteObjects request.
    await upload_all(s3_store)
    store = Store(s3_store)
    try:
        backend = store.backend
        assert isinstance(backend, CachedBackend)
        backend.upload(u_digest)
        calls: list[str] = []
        client = backend.remote.client
        for name in ("delete_objects", "delete_object", "head_object"):
            real = getattr(client, name)

            def spy(*a: Any, _name: str = name, _real: Any = real, **k: Any) -> Any:
                calls.append(_name)
                return _real(*a, **k)

            setattr(client, name, spy)
        fs = FileSystem(store.index, BlockIO(backend, block_size=BS))
        report = await collect(store.index, backend, fs=fs, grace_s=0)
        fs.checkpoints.close()
    finally:
        store.close()
    assert report.blobs == 3 + 1 and report.kept_pinned == 0
    assert calls == ["delete_objects"]
    left = bucket_keys(s3_server, s3_bucket, s3_prefix)
    assert left == {key_of(s3_prefix, d) for d in block_digests(live)}
    assert not any(cache_file(s3_store, d).exists() for d in block_digests(dead) | {u_digest})
    async with open_core(s3_store, block_size=BS) as core:
        assert await core.read_file(f"{WS}/live") == live


def fsck(path: Path, **kw: Any) -> list[tuple[str, str, bool]]:
    store = Store(path)
    try:
        report = check(store.index, store.backend, **kw)
    finally:
        store.close()
    return sorted((f.kind, f.message, f.repaired) for f in report.findings)


async def test_fsck_checks_the_bucket_against_the_index(
    s3_store: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    files = {name: data_of(name, 2) for name in ("a", "b", "c", "d")}
    async with open_core(s3_store, block_size=BS) as core:
        await workspace(core, WS)
        for name, data in files.items():
            await core.write_file(f"{WS}/{name}", data)
        await core.fs.checkpoints.create(find_namespace(core.store.index, WS), "one", "test")
    await upload_all(s3_store)
    async with open_core(s3_store, block_size=BS) as core:  # waits for upload: not missing
        await core.write_file(f"{WS}/queued", data_of("queued", 2))
    store = str(s3_store)
    res = afs("fsck", "--verify", "--store", store)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("clean:")
    assert "in the bucket" in res.stdout and " re-hashed" in res.stdout

    client = s3_server.client()
    a0, b0, c0, d0 = (min(block_digests(files[n])) for n in "abcd")
    # a: the object and the cached copy deleted (lost); b: the object deleted (the cache
    # still has it); c: other bytes under its key, no cached copy; d: other bytes, with a
    # good cached copy; and an object nothing knows.
    for d in (a0, b0):
        client.delete_object(Bucket=s3_bucket, Key=key_of(s3_prefix, d))
    cache_file(s3_store, a0).unlink()
    for d in (c0, d0):
        client.put_object(Bucket=s3_bucket, Key=key_of(s3_prefix, d), Body=b"not it" * 100)
    cache_file(s3_store, c0).unlink()
    orphan = b"orphan" * 50
    o_digest = hashlib.sha256(orphan).digest()
    client.put_object(Bucket=s3_bucket, Key=key_of(s3_prefix, o_digest), Body=orphan)

    res = afs("fsck", "--store", store)
    assert res.returncode == 4, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    (missing,) = [ln for ln in lines if ln.startswith(MISSING_BLOB)]
    assert a0.hex() in missing and f"{WS}/a" in missing and f"{WS}@one" in missing
    (not_there,) = [ln for ln in lines if ln.startswith(NOT_IN_BUCKET)]
    assert b0.hex() in not_there and f"{WS}/b" in not_there
    (orphaned,) = [ln for ln in lines if ln.startswith(ORPHAN_BLOB)]
    assert o_digest.hex() in orphaned and "in the bucket" in orphaned
    assert not [ln for ln in lines if ln.startswith(CORRUPT_BLOB)]  # only --verify re-hashes
    assert "problem(s) left (run with --repair to fix 1)" in res.stderr

    found = fsck(s3_store, verify=True)
    assert [k for k, _, _ in found] == [
        CORRUPT_BLOB, CORRUPT_BLOB, MISSING_BLOB, NOT_IN_BUCKET, ORPHAN_BLOB
    ]  # fmt: skip
    corrupt = {m.split()[3]: m for k, m, _ in found if k == CORRUPT_BLOB}
    assert f"{WS}/c" in corrupt[c0.hex()] and "good copy" not in corrupt[c0.hex()]
    assert f"{WS}/d" in corrupt[d0.hex()] and "the local cache has a good copy" in corrupt[d0.hex()]

    res = afs("fsck", "--repair", "--verify", "--grace", "0", "--store", store)
    assert res.returncode == 4, res.stdout + res.stderr  # a and c cannot be fixed
    assert "problem(s) left" in res.stderr and "--repair" not in res.stderr
    repaired = [ln for ln in res.stdout.splitlines() if ln.endswith("[repaired]")]
    assert len(repaired) == 3  # b uploaded again, d's object rewritten, the orphan deleted
    keys = bucket_keys(s3_server, s3_bucket, s3_prefix)
    assert key_of(s3_prefix, o_digest) not in keys and key_of(s3_prefix, b0) in keys
    body = client.get_object(Bucket=s3_bucket, Key=key_of(s3_prefix, d0))["Body"].read()
    assert hashlib.sha256(body).digest() == d0
    left = fsck(s3_store, verify=True)
    assert sorted((k, m.split()[3] if k == CORRUPT_BLOB else m.split()[1]) for k, m, _ in left) == [
        (CORRUPT_BLOB, c0.hex()), (MISSING_BLOB, a0.hex())
    ]  # fmt: skip


async def test_stats_json_reports_the_cache(s3_store: Path) -> None:
    async with open_core(s3_store, block_size=BS) as core:
        await workspace(core, WS)
        await core.write_file(f"{WS}/x", data_of("x", 3))
        await core.write_file(f"{WS}/y", data_of("y", 2))
    res = afs("stats", "--json", "--store", str(s3_store))
    assert res.returncode == 0, res.stderr
    cache = json.loads(res.stdout)["cache"]
    assert cache == {"blocks": 5, "used_bytes": 5 * BS, "budget_bytes": 64 << 20,
                     "pinned_bytes": 5 * BS}  # fmt: skip
    await upload_all(s3_store)
    res = afs("stats", "--store", str(s3_store))
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("cache")]
    assert "5 block(s), 20.0 KiB of 64.0 MiB (0%), 0 B not yet uploaded" in line, line
    res = afs("stats", "--json", "--store", str(s3_store))
    assert json.loads(res.stdout)["cache"]["pinned_bytes"] == 0
