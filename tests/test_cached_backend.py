"""CachedBackend (local write-back cache over a real SeaweedFS bucket): the blob contract, the
budget and LRU, eviction only after upload, verified fetches, prefetch, and the store away."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blob_contract import BackendFactory, BlobBackendContract, blob
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, closed_port

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.s3 import S3Backend, S3Credentials, S3Location
from artifactfs.errors import Corrupt, NoSpace, StorageError

CREDS = S3Credentials(ACCESS_KEY, SECRET_KEY)
KB = 1024


def remote(endpoint: str, bucket: str, prefix: str, **kw: float) -> S3Backend:
    kw.setdefault("connect_timeout", 2)
    kw.setdefault("read_timeout", 5)
    return S3Backend(S3Location(endpoint, bucket, prefix, REGION), CREDS, attempts=1, **kw)  # type: ignore[arg-type]


def cached(
    cache: Path, endpoint: str, bucket: str, prefix: str, budget: int = 1 << 30, **kw: float
) -> CachedBackend:
    r = remote(endpoint, bucket, prefix)
    return CachedBackend(cache, r, budget=budget, **kw)  # type: ignore[arg-type]


class TestCachedContract(BlobBackendContract):
    @pytest.fixture
    def backend_factory(
        self, tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
    ) -> BackendFactory:
        return lambda: cached(tmp_path / "cache", s3_server.endpoint, s3_bucket, s3_prefix)


@pytest.fixture
def make(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> Iterator[object]:
    made: list[CachedBackend] = []

    def factory(budget: int = 1 << 30, **kw: float) -> CachedBackend:
        c = cached(tmp_path / "cache", s3_server.endpoint, s3_bucket, s3_prefix, budget, **kw)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


def bucket_digests(c: CachedBackend) -> set[bytes]:
    return {d for d, _, _ in c.remote.iterate()}


def test_put_lands_in_cache_only_until_uploaded(make) -> None:  # type: ignore[no-untyped-def]
    c: CachedBackend = make()
    d, data = blob("wb", 50 * KB)
    assert c.put(d, data) is True
    assert bucket_digests(c) == set()
    assert c.pinned()[0][0] == d
    assert os.stat(c.local.path_of(d)).st_mode & 0o777 == 0o444
    assert c.upload(d) == len(data)
    assert bucket_digests(c) == {d}
    assert c.pinned() == []
    assert os.stat(c.local.path_of(d)).st_mode & 0o777 == 0o400
    assert c.remote.get(d) == data


def test_eviction_only_after_upload_and_lru(make) -> None:  # type: ignore[no-untyped-def]
    c: CachedBackend = make(budget=400 * KB, full_wait=0.5)
    blocks = [blob(f"lru-{i}", 100 * KB) for i in range(4)]
    for d, data in blocks:
        c.put(d, data)
    extra, extra_data = blob("lru-extra", 100 * KB)
    t = time.monotonic()
    with pytest.raises(NoSpace, match=r"\(400\.0 KiB\)"):  # all four pinned: nothing may go
        c.put(extra, extra_data)
    assert 0.4 < time.monotonic() - t < 5
    for d, _ in blocks:
        c.upload(d)
    c.get(blocks[0][0])  # most recently used now; blocks[1] is the oldest
    assert c.put(extra, extra_data) is True
    assert not c.is_cached(blocks[1][0])
    assert not c.local.has(blocks[1][0])
    assert c.is_cached(blocks[0][0])
    assert c.cache_usage()[0] <= 400 * KB
    # The evicted block comes back from the bucket, verified.
    assert c.get(blocks[1][0]) == blocks[1][1]
    assert c.misses == 1


def test_working_set_bigger_than_cache(make) -> None:  # type: ignore[no-untyped-def]
    c: CachedBackend = make(budget=300 * KB)
    blocks = [blob(f"ws-{i}", 64 * KB) for i in range(20)]
    for d, data in blocks:
        c.put(d, data)
        c.upload(d)
    for _ in range(2):
        for d, data in blocks:
            assert c.read(d, 1000, 5000) == data[1000:6000]
            assert c.cache_usage()[0] <= 300 * KB
    assert c.misses >= 20
    assert c.evicted >= 20


def test_waiting_put_resumes_when_a_block_is_uploaded(make) -> None:  # type: ignore[no-untyped-def]
    import threading

    c: CachedBackend = make(budget=200 * KB, full_wait=20)
    a, adata = blob("wait-a", 100 * KB)
    b, bdata = blob("wait-b", 100 * KB)
    c.put(a, adata)
    c.put(b, bdata)
    threading.Timer(0.5, c.upload, args=(a,)).start()
    t = time.monotonic()
    d, data = blob("wait-c", 100 * KB)
    assert c.put(d, data) is True
    assert 0.3 < time.monotonic() - t < 10
    assert not c.is_cached(a)


def test_state_survives_restart(make) -> None:  # type: ignore[no-untyped-def]
    c: CachedBackend = make()
    up, updata = blob("restart-up", 10 * KB)
    pin, pindata = blob("restart-pin", 20 * KB)
    c.put(up, updata)
    c.put(pin, pindata)
    c.upload(up)
    c.close()
    again: CachedBackend = make()
    assert [d for d, _ in again.pinned()] == [pin]
    assert again.cache_usage()[:2] == (30 * KB, 20 * KB)
    assert again.get(up) == updata
    assert again.hits == 1


def test_corrupt_object_is_an_error_and_logged(
    make, s3_server: S3Server, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    c: CachedBackend = make()
    d, data = blob("corrupt", 30 * KB)
    c.put(d, data)
    c.upload(d)
    c.local.delete(d)  # as if evicted
    bad = bytearray(data)
    bad[1234] ^= 1
    s3_server.client().put_object(Bucket=c.remote.bucket, Key=c.remote.key_of(d), Body=bytes(bad))
    with caplog.at_level(logging.ERROR), pytest.raises(Corrupt):
        c.read(d, 0, 10)
    assert "does not match its digest" in caplog.text
    assert not c.local.has(d)  # never cached, never returned


def test_prefetch(make) -> None:  # type: ignore[no-untyped-def]
    c: CachedBackend = make()
    blocks = [blob(f"pf-{i}", 200 * KB) for i in range(6)]
    for d, data in blocks:
        c.remote.put_object(d, data)
    assert c.prefetch([d for d, _ in blocks]) == 6
    deadline = time.monotonic() + 10
    while not all(c.is_cached(d) for d, _ in blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(c.is_cached(d) for d, _ in blocks)
    before = c.misses
    for d, data in blocks:
        assert c.get(d) == data
    assert c.misses == before
    assert c.prefetch([d for d, _ in blocks]) == 0


# -- the object store away -------------------------------------------------------------------------


def test_endpoint_refusing(tmp_path: Path, s3_bucket: str) -> None:
    c = cached(
        tmp_path / "cache", f"http://127.0.0.1:{closed_port()}", s3_bucket, "p",
        budget=300 * KB, full_wait=1.0, fetch_timeout=1.0,
    )  # fmt: skip
    try:
        for i in range(3):  # writes keep landing in the cache
            d, data = blob(f"away-{i}", 100 * KB)
            assert c.put(d, data) is True
        t = time.monotonic()
        with pytest.raises(NoSpace):
            c.put(*blob("away-full", 100 * KB))
        assert 0.9 < time.monotonic() - t < 5
        with pytest.raises(StorageError):
            c.upload(d)
        t = time.monotonic()
        with pytest.raises(StorageError):
            c.read(blob("only-in-bucket")[0], 0, 10)
        assert time.monotonic() - t < 8
        assert c.get(d) == data  # cached blocks still read
    finally:
        c.close()


def test_endpoint_hanging_reads_fail_within_bound(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    r = remote(s3_server.endpoint, s3_bucket, s3_prefix, connect_timeout=1, read_timeout=1)
    c = CachedBackend(tmp_path / "cache", r, budget=1 << 20, fetch_timeout=2)
    d, data = blob("hang", 10 * KB)
    r.put_object(d, data)
    s3_server.pause()
    try:
        t = time.monotonic()
        with pytest.raises(StorageError):
            c.get(d)
        assert time.monotonic() - t < 8
        c.put(*blob("hang-write", 10 * KB))  # writes still work
    finally:
        s3_server.resume()
    assert c.get(d) == data  # back: the same read works
    assert hashlib.sha256(c.get(d)).digest() == d
    c.close()


def test_gc_delete_keeps_pinned_and_reused_blocks(make) -> None:  # type: ignore[no-untyped-def]
    """`delete_many_if_older` (gc): a pinned block stays, one a put used again after the cutoff
    stays, the rest leave the cache and the bucket; a put in another process whose entry
    went stale (deleted by gc) stores the block again instead of trusting its entry."""
    gc_side: CachedBackend = make()
    writer: CachedBackend = make()  # another process on the same cache directory
    blocks = {name: blob(name, 3 * KB) for name in ("pinned", "reused", "old", "evicted")}
    for name, (d, data) in blocks.items():
        assert writer.put(d, data)
        if name != "pinned":
            writer.upload(d)
    cutoff = time.time_ns()
    for d, _ in blocks.values():  # written before the cutoff
        os.utime(writer.local.path_of(d), ns=(cutoff - 10**9, cutoff - 10**9))
    gc_side.local.delete(blocks["evicted"][0])  # only in the bucket now
    d_reused, data_reused = blocks["reused"]
    assert writer.put(d_reused, data_reused) is False  # a dedup hit: refreshes its mtime
    digests = [d for d, _ in blocks.values()]
    gone = gc_side.delete_many_if_older(digests, cutoff)
    assert sorted(gone) == sorted([blocks["old"][0], blocks["evicted"][0]])
    assert bucket_digests(gc_side) == {d_reused}  # the pinned block never went there
    assert writer.local.has(blocks["pinned"][0]) and writer.local.has(d_reused)
    d_old, data_old = blocks["old"]
    assert not writer.local.has(d_old)
    assert writer.put(d_old, data_old) is True  # its entry was stale: stored again, pinned
    assert writer.local.has(d_old) and d_old in dict(writer.pinned())
