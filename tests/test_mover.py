"""When the mover stores journalled small blocks (core/blockio.py): not while files are being
written (it waits for writers to pause for MOVER_QUIET), at once when half the dirty budget is
used or someone awaits `drained`. A real LocalBackend, trio's MockClock for the time."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from artifactfs.blobs.local import LocalBackend
from artifactfs.core.blockio import MOVER_LINGER, MOVER_QUIET, BlockIO

BS = 4096


class Mover:
    """The mover loop of FileSystem._mover, its put made inline, recording each batch."""

    def __init__(self, io: BlockIO) -> None:
        self.io = io
        self.batches: list[list[bytes]] = []

    async def run(self) -> None:
        while True:
            batch = await self.io.next_batch()
            self.io.put_many(batch)
            self.batches.append([d for d, _ in batch])
            self.io.moved(batch, ok=True)

    @property
    def moved(self) -> list[bytes]:
        return [d for b in self.batches for d in b]


@pytest.fixture
async def io(tmp_path: Path) -> BlockIO:
    return BlockIO(LocalBackend(tmp_path / "blobs", durable=False), BS, dirty_budget=16 * BS)


@pytest.fixture
async def mover(io: BlockIO) -> AsyncIterator[Mover]:
    m = Mover(io)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.run)
        yield m
        nursery.cancel_scope.cancel()


async def seal(io: BlockIO, seed: int) -> bytes:
    """One small block written and sealed, as a close does: reserved, then staged."""
    await io.reserve(BS)
    digest = io.stage_small(hashlib.sha256(str(seed).encode()).digest() * 10)
    assert digest is not None
    return digest


async def settle(clock: trio.testing.MockClock, seconds: float) -> None:
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def test_blocks_wait_until_writers_pause(
    io: BlockIO, mover: Mover, mock_clock: trio.testing.MockClock
) -> None:
    first = await seal(io, 0)
    written = [first]
    # A writer sealing a block every 0.8 * MOVER_QUIET keeps the mover waiting, however long.
    for i in range(1, 10):
        await settle(mock_clock, 0.8 * MOVER_QUIET)
        assert mover.moved == []
        written.append(await seal(io, i))
    assert io.backend.has(first) is False
    assert io.pending.keys() == set(written)  # served from memory meanwhile
    # The writer stops: one pause later (and the batching linger) all of it goes at once.
    await settle(mock_clock, 0.8 * MOVER_QUIET)
    assert mover.moved == []
    await settle(mock_clock, 0.3 * MOVER_QUIET)
    await settle(mock_clock, MOVER_LINGER)
    assert mover.batches == [written]
    assert all(io.backend.has(d) for d in written)
    assert io.pending == {}


async def test_half_the_budget_used_moves_blocks_while_writing(
    io: BlockIO, mover: Mover, mock_clock: trio.testing.MockClock
) -> None:
    staged = [await seal(io, i) for i in range(3)]
    await settle(mock_clock, 0.5 * MOVER_QUIET)
    assert mover.moved == []
    # A large file's unsealed blocks take the dirty bytes to half the budget: the mover must
    # not wait for a pause that memory cannot afford.
    await io.reserve(io.dirty_budget // 2)
    await settle(mock_clock, 0)  # the mover wakes now, then lingers to batch
    await settle(mock_clock, MOVER_LINGER)
    assert mover.moved == staged


async def test_drained_does_not_wait_for_a_pause(
    io: BlockIO, mover: Mover, mock_clock: trio.testing.MockClock
) -> None:
    staged = [await seal(io, i) for i in range(2)]
    await settle(mock_clock, 0.5 * MOVER_QUIET)
    assert mover.moved == []
    done = trio.Event()

    async def drain() -> None:
        await io.drained()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await settle(mock_clock, 0)
        await settle(mock_clock, MOVER_LINGER)
        assert done.is_set()
    assert mover.moved == staged
    # Later writes wait for a pause again.
    later = await seal(io, 99)
    await settle(mock_clock, 0.5 * MOVER_QUIET)
    assert later not in mover.moved
    await settle(mock_clock, 0.5 * MOVER_QUIET)
    await settle(mock_clock, MOVER_LINGER)
    assert later in mover.moved
