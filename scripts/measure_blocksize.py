#!/usr/bin/env python3
"""Measure what a block size costs on this machine with LocalBackend.

For each block size, a stream of random data (256 MiB by default) is cut into blocks, each block
hashed with SHA-256 and stored with a durable `LocalBackend.put` on 2 worker threads (as the
daemon does), into a fresh store. Then random 4 KiB reads through `LocalBackend.read`, first with
the blobs dropped from the page cache (posix_fadvise DONTNEED per blob file, so nothing else on
the machine is disturbed), then warm. Prints one table row per block size.

    .venv/bin/python scripts/measure_blocksize.py
    .venv/bin/python scripts/measure_blocksize.py --total-mib 64 --sizes 256K 1M --dir /var/tmp
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from artifactfs.blobs.local import LocalBackend

KIB = 1024
MIB = 1024 * KIB
READ_SIZE = 4 * KIB


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def store_all(backend: LocalBackend, stream: memoryview, block: int) -> list[bytes]:
    """Hash and put every block on 2 worker threads; the digests in stream order."""

    def store(offset: int) -> bytes:
        chunk = stream[offset : offset + block]
        digest = hashlib.sha256(chunk).digest()
        backend.put(digest, chunk)
        return digest

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(store, range(0, len(stream), block)))


def drop_from_page_cache(backend: LocalBackend, digests: list[bytes]) -> None:
    for d in digests:
        fd = os.open(backend.path_of(d), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def random_reads(backend: LocalBackend, digests: list[bytes], block: int, seconds: float) -> float:
    """Reads per second of random 4 KiB-aligned reads over all blobs, for `seconds`."""
    rng = random.Random(42)
    pages = block // READ_SIZE
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            d = digests[rng.randrange(len(digests))]
            got = backend.read(d, rng.randrange(pages) * READ_SIZE, READ_SIZE)
            assert len(got) == READ_SIZE
        n += 64
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total-mib", type=int, default=256, help="size of the stream (MiB)")
    ap.add_argument("--sizes", nargs="+", default=["64K", "256K", "1M", "4M"])
    ap.add_argument("--dir", default=None, help="where to create the scratch stores")
    ap.add_argument("--read-seconds", type=float, default=2.0, help="per read phase")
    args = ap.parse_args()

    stream = memoryview(os.urandom(args.total_mib * MIB))
    print(
        f"{args.total_mib} MiB random stream, durable puts on 2 threads (2 fsyncs each), "
        f"random {READ_SIZE // KIB} KiB reads on 1 thread ({args.read_seconds:g} s each)"
    )
    header = (
        f"{'block':>8} {'blobs':>6} {'write MB/s':>10} {'puts/s':>9} "
        f"{'cold reads/s':>12} {'warm reads/s':>12}"
    )
    print(header)
    print("-" * len(header))
    for size in map(parse_size, args.sizes):
        scratch = Path(tempfile.mkdtemp(prefix="artifactfs-blocksize-", dir=args.dir))
        try:
            backend = LocalBackend(scratch / "blobs")
            t0 = time.perf_counter()
            digests = store_all(backend, stream, size)
            elapsed = time.perf_counter() - t0
            write_mbs = len(stream) / elapsed / 1e6
            drop_from_page_cache(backend, digests)
            cold = random_reads(backend, digests, size, args.read_seconds)
            warm = random_reads(backend, digests, size, args.read_seconds)
            backend.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(
            f"{label(size):>8} {len(digests):>6} {write_mbs:>10.1f} {len(digests) / elapsed:>9.0f} "
            f"{cold:>12.0f} {warm:>12.0f}"
        )


if __name__ == "__main__":
    main()
