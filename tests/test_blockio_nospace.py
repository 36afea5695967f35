"""Small writes when the block store is out of space (the core, a real CachedBackend over a real
SeaweedFS that the test pauses): once the cache budget is all blocks not yet uploaded and the
store has not taken any for `full_wait`, writers over the dirty budget fail with NoSpace
(ENOSPC) instead of waiting for ever, with one log line; once the store is back and uploads
free the cache, writes go on by themselves and nothing written before is lost."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import trio
from coreutil import Core, open_core, workspace
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.s3 import S3Credentials
from artifactfs.core.uploads import Uploader
from artifactfs.errors import NoSpace
from artifactfs.store import S3Settings, init_store

CREDS = S3Credentials(ACCESS_KEY, SECRET_KEY)
BS = 4096
FULL_WAIT = 1.0
CACHE = 32 * BS  # about 40 small blocks fill it
DIRTY_BUDGET = 16 * BS  # about 20 journalled small blocks more fill this
SMALL = 3000  # every file one small block: journalled, stored by the mover


def data_of(seed: str, size: int = SMALL) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


@pytest.fixture
def s3_store(tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str) -> Path:
    path = tmp_path / "store"
    s3 = S3Settings(endpoint=s3_server.endpoint, bucket=s3_bucket, prefix=s3_prefix,
                    region=REGION, cache_size=CACHE, full_wait=FULL_WAIT,
                    connect_timeout=1.0, read_timeout=1.0, fetch_timeout=2.0)  # fmt: skip
    init_store(path, block_size=BS, s3=s3, credentials=CREDS)
    return path


async def write_until_refused(core: Core, written: dict[str, bytes], start: int) -> int:
    """Write one small file after another until a write fails with NoSpace; returns the
    number of the refused one. Every file written before it is recorded in `written`."""
    for i in range(start, start + 10_000):
        path, data = f"acme/shared/ws/s{i}", data_of(f"small-{i}")
        try:
            await core.write_file(path, data)
        except NoSpace:
            return i
        written[path] = data
    raise AssertionError("10,000 small writes went through a full cache with the store away")


async def test_small_writes_fail_with_enospc_while_the_store_is_away_then_recover(
    s3_store: Path, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="artifactfs")
    async with (
        open_core(s3_store, block_size=BS, dirty_budget=DIRTY_BUDGET) as core,
        trio.open_nursery() as nursery,
    ):
        backend = core.store.backend
        assert isinstance(backend, CachedBackend)
        up = Uploader(core.store.index, backend, backoff_max=1.0, backup_interval=None)
        nursery.start_soon(up.run)
        await workspace(core)
        written: dict[str, bytes] = {}
        s3_server.pause()
        try:
            t = time.monotonic()
            refused = await write_until_refused(core, written, 0)
            took = time.monotonic() - t
            # The cache filled, then the budget; the writer waited for the store, bounded.
            assert len(written) * SMALL > CACHE
            assert FULL_WAIT * 0.9 < took < FULL_WAIT + 20
            assert backend.cache_usage()[1] > CACHE - 2 * SMALL  # all pinned
            # Still away: the next writes fail at once, not after another wait.
            for i in range(3):
                t = time.monotonic()
                with pytest.raises(NoSpace):
                    await core.write_file(f"acme/shared/ws/again{i}", data_of(f"again-{i}"))
                assert time.monotonic() - t < 0.5
            # What was written before reads back (cache and journal); nothing was lost.
            for path in list(written)[:: max(1, len(written) // 10)]:
                assert await core.read_file(path) == written[path]
        finally:
            s3_server.resume()
        blockio_log = [r for r in caplog.records if r.name == "artifactfs.core.blockio"]
        refusals = [r for r in blockio_log if "ENOSPC" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert refusals[0].levelno == logging.WARNING
        assert "not yet uploaded" in refusals[0].getMessage()

        # The store is back: uploads free the cache and writes go on by themselves.
        # More than the cache and the budget together. A cache of two blocks is full again
        # at every moment the uploader has not caught up: a write may still be refused
        # after `full_wait` now and then, but every one goes in within a bound.
        for j in range(refused, refused + 60):
            path, data = f"acme/shared/ws/s{j}", data_of(f"small-{j}")
            deadline = time.monotonic() + 60
            while True:
                try:
                    await core.write_file(path, data)
                    written[path] = data
                    break
                except NoSpace:
                    assert time.monotonic() < deadline, "writes did not resume"
                    await trio.sleep(0.2)
        assert any("writes go on" in r.getMessage() for r in caplog.records)
        await core.io.drained()  # the mover has stored every journalled block
        assert await up.drain(60)
        for path, data in written.items():
            assert await core.read_file(path) == data
        in_bucket = {d for d, _, _ in backend.remote.iterate()}
        for path, data in written.items():
            assert hashlib.sha256(data).digest() in in_bucket, path
        nursery.cancel_scope.cancel()
