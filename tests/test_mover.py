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
from coreutil import open_core, workspace

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
            assert self.io.put_many(batch) == len(batch)
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


async def test_a_batch_stops_when_a_writer_comes_back(io: BlockIO, tmp_path: Path) -> None:
    """put_many runs in a worker thread: a block sealed meanwhile (here by the first put)
    ends the batch after the blob being stored, unless the mover is hurried."""
    staged = [await seal(io, i) for i in range(5)]
    batch = [(d, io.pending[d]) for d in staged]
    backend = io.backend
    assert isinstance(backend, LocalBackend)
    put = backend.put

    def put_then_write(digest: bytes, data: bytes | memoryview) -> bool:
        io._writes += 1  # what stage_small does on the trio thread
        return put(digest, data)

    backend.put = put_then_write  # type: ignore[method-assign]
    assert io.put_many(batch) == 1
    assert [backend.has(d) for d in staged] == [True, False, False, False, False]
    io._hurry += 1  # drained() is awaited: the whole batch goes
    assert io.put_many(batch[1:]) == 4
    assert all(backend.has(d) for d in staged)


async def test_the_rest_of_a_stopped_batch_is_stored_later(tmp_path: Path) -> None:
    """FileSystem's mover puts back what a stopped batch left: every block reaches the
    backend, the journal is emptied, and each file reads back whole."""
    # A block lost on the way would keep drained() (and the unmount) waiting.
    with trio.fail_after(30):
        async with open_core(tmp_path / "store") as c:
            await workspace(c)
            files = {f"acme/shared/ws/f{i}": f"file {i}\n".encode() * (i + 1) for i in range(40)}
            put_many = c.io.put_many
            calls: list[int] = []

            def stop_after_one(batch: list[tuple[bytes, bytes]]) -> int:
                calls.append(len(batch))
                return put_many(batch[:1]) if len(calls) < 4 else put_many(batch)

            c.io.put_many = stop_after_one  # type: ignore[method-assign,assignment]
            for path, data in files.items():
                await c.write_file(path, data)
            await c.io.drained()
            assert calls[:4] == [40, 39, 38, 37]  # each stopped batch came back whole
            assert c.io.pending == {}
            await c.fs.retire_journal()
            assert list(c.store.journal_dir.glob("*.jnl")) == []
            for path, data in files.items():
                assert c.store.backend.has(hashlib.sha256(data).digest())
                assert await c.read_file(path) == data
