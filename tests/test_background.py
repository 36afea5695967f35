"""The background pool (core/background.py): niced threads, results and errors handed back,
the caller's limiter respected, and a cancelled caller still waiting for what it started."""

from __future__ import annotations

import functools
import os
import threading
import time

import pytest
import trio

from artifactfs.core import background


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_jobs_run_niced_and_return_their_result() -> None:
    base = _nice()
    result, nice = await background.run(lambda x: (x * 2, _nice()), 21)
    assert result == 42
    assert nice == min(19, base + background.BACKGROUND_NICE)
    assert _nice() == base  # the trio thread keeps its priority


async def test_errors_reach_the_caller() -> None:
    def boom() -> None:
        raise ValueError("from the background")

    with pytest.raises(ValueError, match="from the background"):
        await background.run(boom)


async def test_the_limiter_bounds_how_many_run_at_once() -> None:
    limiter = trio.CapacityLimiter(2)
    lock = threading.Lock()
    running = peak = 0

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(functools.partial(background.run, job, limiter=limiter))
    assert peak == 2


async def test_a_cancelled_caller_still_waits_for_its_job() -> None:
    done = threading.Event()

    def job() -> None:
        time.sleep(0.1)
        done.set()

    with trio.move_on_after(0.01):
        await background.run(job)
    assert done.is_set()
