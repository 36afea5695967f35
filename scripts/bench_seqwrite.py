#!/usr/bin/env python3
"""Split a sequential write through FUSE into where its time and CPU go, per target.

The bench's `seq write` is one figure; this tells its parts apart, the way the session that
wrote it found them: the 1 MiB writes and the fsync timed separately, the CPU each thread of
the FUSE daemon used meanwhile (its request thread against the rest: worker threads that
hash and store blocks), the writer's own CPU, and the page faults of the daemon's request
thread. Targets (`scripts/bench.py`'s passthrough and artifactfs) take turns in fresh
mounts; with `--warm` each mount first writes, fsyncs and removes a file of the same size,
so the figures are those of a daemon that has written before (the bench measures the first
write of a fresh one). Medians of `--runs` runs. Needs root (drops the page cache).

Examples:
  .venv/bin/python scripts/bench_seqwrite.py
  .venv/bin/python scripts/bench_seqwrite.py --runs 9 --warm
  PYTHONPATH=/tmp/other/src .venv/bin/python scripts/bench_seqwrite.py --only artifactfs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import bench  # a sibling script, not a package

MiB = 1 << 20
FIELDS = ("writes ms", "fsync ms", "daemon req. thread CPU ms", "daemon other CPU ms",
          "writer CPU ms", "req. thread faults")


def thread_cpu_ms(pid: int) -> tuple[float, float]:
    """CPU time so far of the daemon's main (request) thread and of all its other threads."""
    main = other = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            ns = int(f.read().split()[0])
        if int(tid) == pid:
            main += ns
        else:
            other += ns
    return main / 1e6, other / 1e6


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def write_file(path: Path, size: int, pool: memoryview, shift: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for k in range(size // MiB):
            s = (k + shift) % 4096
            os.write(fd, pool[s : s + MiB])
        os.fsync(fd)
    finally:
        os.close(fd)


def one_run(target: str, size: int, warm: bool, pool: memoryview) -> tuple[float, ...]:
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="seqwrite-"))
    try:
        with bench.open_target(target, root) as t:
            assert t.pid is not None
            if warm:
                write_file(t.workdir / "warm.bin", size, pool, 7)
                os.unlink(t.workdir / "warm.bin")
                time.sleep(1)
            bench.drop_caches()
            fd = os.open(t.workdir / "big.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                cpu0, faults0, me0 = thread_cpu_ms(t.pid), minor_faults(t.pid), time.thread_time()
                t0 = time.perf_counter()
                for k in range(size // MiB):
                    # A different window of the random pool every MiB, as the bench writes:
                    # no two blocks are equal.
                    os.write(fd, pool[k % 4096 : k % 4096 + MiB])
                t1 = time.perf_counter()
                cpu1, faults1, me1 = thread_cpu_ms(t.pid), minor_faults(t.pid), time.thread_time()
                os.fsync(fd)
                t2 = time.perf_counter()
            finally:
                os.close(fd)
            return ((t1 - t0) * 1e3, (t2 - t1) * 1e3, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1],
                    (me1 - me0) * 1e3, float(faults1 - faults0))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--runs", type=int, default=5, help="runs per target (median reported)")
    ap.add_argument("--size", type=int, default=64, help="MiB written per run")
    ap.add_argument("--warm", action="store_true",
                    help="each mount first writes and removes a file of the same size")
    ap.add_argument("--only", default="passthrough,artifactfs",
                    help="comma-separated targets out of passthrough,artifactfs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_seqwrite.py: error: needs root (it drops the page cache)")
    pool = memoryview(os.urandom(MiB + 4096))
    targets = args.only.split(",")
    results: dict[str, list[tuple[float, ...]]] = {t: [] for t in targets}
    for i in range(args.runs):
        for target in targets if i % 2 == 0 else targets[::-1]:
            results[target].append(one_run(target, args.size * MiB, args.warm, pool))
    print(f"{args.size} MiB in 1 MiB writes + fsync, {'warm' if args.warm else 'fresh'} "
          f"mounts, median of {args.runs}")
    print(f"{'':28s}" + "".join(f"{t:>14s}" for t in targets))
    for j, name in enumerate(FIELDS):
        cells = "".join(f"{statistics.median(r[j] for r in results[t]):14.1f}"
                        for t in targets)
        print(f"{name:28s}{cells}")
    for t in targets:
        total = statistics.median((r[0] + r[1]) / 1e3 for r in results[t])
        print(f"{t}: {args.size * MiB / total / 1e6:,.0f} MB/s (median of writes + fsync)")


if __name__ == "__main__":
    main()
