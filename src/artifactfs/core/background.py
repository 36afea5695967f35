"""Worker threads for background work, at a lower CPU priority than the request path.

Block stores, the mover's puts, the whole-file hasher and the daemon's WAL checkpoints (with
the syncs before them) run in threads of their own whose
nice value is raised by `BACKGROUND_NICE` (Linux gives each thread its own nice value), so that
when the CPUs are busy the trio thread, which answers the kernel's requests, runs first and
the background work takes what is left. Work a request waits for (reads, syncs, a digest asked
for by getfattr) stays in trio's own worker threads at the daemon's priority.

Measured on 64 MiB written in 1 MiB writes + fsync on 2 cores: with four workers hashing and
storing at the same priority as the trio thread, each 1 MiB write waited ~1.5 ms for a reply
that takes the trio thread ~0.6 ms of CPU (the write phase 100 ms against the passthrough's
45 ms); niced, see docs/ARCHITECTURE.md "Session 12 measured".

Block stores are background only until a close or fsync waits for them; niced too, because
the measured gain was theirs (64 MiB + fsync: 527 MB/s with the stores at the trio thread's
priority, 608 MB/s niced, the passthrough 823). The niceness orders the daemon's own threads:
`artifactfs mount` starts the daemon in a session of its own, and with the kernel's
autogroups (on by default, and on this machine) or a systemd service's cgroup, other
programs compete with the daemon's group as a whole. Without either, a busy machine's
normal-priority programs come before the daemon's background threads.

A niced thread cannot be given its priority back without privilege, hence a pool of its own
rather than trio's thread cache. One pool per process, made on first use; its size bounds
nothing by itself: callers hold a `trio.CapacityLimiter` (BlockIO's) around each job.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import trio

T = TypeVar("T")

BACKGROUND_NICE = 10
MAX_THREADS = 16

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lower_priority() -> None:
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):  # not Linux, or not permitted: same priority then
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + BACKGROUND_NICE))


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                MAX_THREADS, thread_name_prefix="artifactfs-bg", initializer=_lower_priority
            )
        return _pool


async def run(
    fn: Callable[..., T], *args: object, limiter: trio.CapacityLimiter | None = None
) -> T:
    """Run `fn(*args)` in a background thread (under `limiter`, if any) and return its
    result. Like `trio.to_thread.run_sync`, the wait is not cancellable: the caller learns
    the outcome of what it started."""
    async with limiter if limiter is not None else contextlib.nullcontext():
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def finished(_: Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = _get_pool().submit(fn, *args)
        future.add_done_callback(finished)
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()
