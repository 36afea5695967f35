"""The daemon's checkpointer: stored journal rows are retired once writes pause (their DELETE
runs on the trio thread), or at the latest every RETIRE_MAX_WAIT seconds of a long burst;
the WAL is checkpointed every second regardless."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from artifactfs.blobs.local import LocalBackend
from artifactfs.core.blockio import BlockIO
from artifactfs.fuse import daemon


async def test_journal_rows_are_retired_once_writes_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    checkpoints: list[bool] = []
    monkeypatch.setattr(daemon, "_sync_then_checkpoint", lambda store: checkpoints.append(True))
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
