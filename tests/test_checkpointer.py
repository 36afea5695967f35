"""The daemon's checkpointer: the journal's stored segments are retired once writes pause (the
sync they wait for competes with the writes), or at the latest every RETIRE_MAX_WAIT seconds
of a long burst; the WAL is checkpointed every second regardless, after the blobs and the
journal are synced."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from artifactfs.blobs.journal import Journal
from artifactfs.blobs.local import LocalBackend
from artifactfs.core.blockio import BlockIO
from artifactfs.fuse import daemon


async def test_journal_is_retired_once_writes_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    checkpoints: list[bool] = []
    monkeypatch.setattr(
        daemon, "_sync_then_checkpoint", lambda sync, store: checkpoints.append(True)
    )
    io = BlockIO(LocalBackend(tmp_path / "blobs", durable=False), 4096)
    retired: list[float] = []

    async def retire() -> None:
        retired.append(trio.current_time())

    fs = SimpleNamespace(io=io, retire_journal=retire)

    async def write(seed: int) -> None:
        await io.reserve(4096)
        assert io.stage_small(hashlib.sha256(str(seed).encode()).digest() * 10) is not None

    async def settle(seconds: float) -> None:
        # In steps, each letting the checkpointer's worker-thread hop end (which
        # wait_all_tasks_blocked does not wait for), so that it wakes once per second.
        for _ in range(round(seconds / 0.25)):
            mock_clock.jump(0.25)
            for _ in range(3):
                await trio.testing.wait_all_tasks_blocked()
                time.sleep(0.001)

    async def writes_for(seconds: float, every: float = 0.25) -> None:
        for i in range(round(seconds / every)):
            await write(i)
            await settle(every)

    async with trio.open_nursery() as n:
        n.start_soon(daemon._checkpointer, None, fs, 1.0)
        await trio.testing.wait_all_tasks_blocked()
        await settle(2.5)
        assert len(retired) == 2  # nothing written: every second
        start = trio.current_time()
        await writes_for(10)
        assert [t for t in retired if t > start] == []  # never while writes go on
        assert len(checkpoints) >= 11  # the WAL is folded in meanwhile all the same
        await settle(0.5)
        assert [t for t in retired if t > start] == []  # 0.75 s since the last write
        await settle(1.0)
        assert len([t for t in retired if t > start]) == 1  # 1.75 s since: retired
        start = trio.current_time()
        await writes_for(65)  # a long burst: retired every RETIRE_MAX_WAIT all the same
        during = [t for t in retired if t > start]
        assert len(during) == 2
        assert during[1] - during[0] == pytest.approx(daemon.RETIRE_MAX_WAIT, abs=1.5)
        n.cancel_scope.cancel()


def test_a_wal_checkpoint_follows_the_sync_of_blobs_and_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index pages naming journalled blocks must not reach the disk before them."""
    journal = Journal(tmp_path / "journal")
    data = b"journalled" * 10
    journal.append(hashlib.sha256(data).digest(), data)
    assert journal.current is not None
    segment = os.fstat(journal.current.fd).st_ino
    order: list[object] = []
    real = os.fdatasync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (order.append(("journal", os.fstat(fd).st_ino)), real(fd))
    )
    backend = SimpleNamespace(sync=lambda: order.append("blobs"))
    io = BlockIO(backend, 4096, journal=journal)  # type: ignore[arg-type]
    store = SimpleNamespace(index=SimpleNamespace(checkpoint=lambda: order.append("wal")))
    daemon._sync_then_checkpoint(io.syncer(), store)  # type: ignore[arg-type]
    assert order == ["blobs", ("journal", segment), "wal"]
    journal.close()


async def test_the_checkpointer_hands_the_journal_to_the_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "journal")
    io = BlockIO(LocalBackend(tmp_path / "blobs", durable=False), 4096, journal=journal)
    await io.reserve(4096)
    assert io.stage_small(b"x" * 100) is not None
    synced: list[int] = []

    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    monkeypatch.setattr(daemon, "_sync_then_checkpoint", lambda sync, store: sync())

    async def retire() -> None:
        pass

    fs = SimpleNamespace(io=io, retire_journal=retire)
    with trio.move_on_after(1.5):
        await daemon._checkpointer(None, fs, 0.2)  # type: ignore[arg-type]
    assert journal.current is not None
    assert os.fstat(journal.current.fd).st_ino in synced
    journal.close()
