"""The daemon's malloc tuning: block buffers freed after a burst of writes keep their pages
for the next burst (fresh processes, since mallopt is process-wide), until writes pause
long enough for the daemon to give them back."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from artifactfs.blobs.local import LocalBackend
from artifactfs.core.blockio import BlockIO
from artifactfs.fuse import daemon

BURSTS = """
import resource, sys
from artifactfs.fuse.daemon import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc(128 << 20)
def burst():
    # 32 buffers of 1 MiB alive at once, as pyfuse3's WRITE copies are until stored.
    bufs = [b"x" * (1 << 20) for _ in range(32)]
    del bufs
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_burst_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", BURSTS, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_second_burst_of_buffers_reuses_pages() -> None:
    untuned = _second_burst_faults("default")
    if untuned < 4000:
        pytest.skip(f"this C library keeps freed buffers mapped by itself ({untuned} faults)")
    # 32 MiB is 8,192 pages: the tuned process faults hardly any of them in again.
    assert _second_burst_faults("tuned") < 500


KEPT_THEN_RELEASED = """
import os
from artifactfs.fuse.daemon import release_memory, tune_malloc
assert tune_malloc(128 << 20)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
bufs = [b"x" * (1 << 20) for _ in range(64)]
del bufs
kept = rss()
assert release_memory()
print(kept, rss())
"""


def test_memory_kept_for_buffers_is_released_on_demand() -> None:
    out = subprocess.run(
        [sys.executable, "-c", KEPT_THEN_RELEASED], check=True, capture_output=True, text=True
    )
    kept, after = map(int, out.stdout.split())
    assert kept - after > 48 << 20  # of the 64 MiB the burst had kept mapped


async def test_memory_is_released_once_writes_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(daemon, "release_memory", lambda: calls.append(True))
    io = BlockIO(LocalBackend(tmp_path / "blobs", durable=False), 4096)

    async def write(seed: int) -> None:
        await io.reserve(4096)
        assert io.stage_small(hashlib.sha256(str(seed).encode()).digest() * 10) is not None

    async def settle(seconds: float) -> None:
        mock_clock.jump(seconds)
        await trio.testing.wait_all_tasks_blocked()

    async def released(n: int) -> None:
        # The release runs in a worker thread, which wait_all_tasks_blocked does not wait for.
        deadline = time.monotonic() + 10
        while len(calls) < n and time.monotonic() < deadline:
            time.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert len(calls) == n

    async with trio.open_nursery() as n:
        n.start_soon(daemon.release_memory_when_idle, io, 30.0)
        await settle(100)
        assert calls == []  # nothing written yet: nothing kept
        await write(1)
        for i in range(2, 6):  # writes every 20 s: never idle for 30
            await settle(20)
            await write(i)
        assert calls == []
        await settle(29)
        assert calls == []
        await settle(2)
        await released(1)  # 30 s after the last write
        await settle(300)
        assert len(calls) == 1  # released once per pause
        await write(9)
        await settle(31)
        await released(2)
        n.cancel_scope.cancel()
