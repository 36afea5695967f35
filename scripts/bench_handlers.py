#!/usr/bin/env python3
"""Replay a tar-like or git-checkout-like stream of FUSE requests through the adapter, without
the kernel.

The mix per file is what a real program sends through a mount (counted with per-handler
counters in the daemon). `--mix tar` (`tar -xf` of the Django sdist): a negative lookup,
create, two writes each preceded by the kernel's `security.capability` probe, four setattrs
(owner, mode, times, mode again), two getattrs, flush and release. `--mix clone` (the checkout
of `git clone`): two negative lookups (the kernel revalidates a negative entry for O_EXCL),
create, one probe and write, flush, release and two getattrs. Both make a directory for every
tenth file. `--mix readdir` fills one directory with `--files` files (not timed), then lists
it 20 times as the adapter's readdir does for each entry (the core's page of entries, the
reply's attributes, the lookup reference) without the kernel's `readdir_reply`, and reports
the cost per listed entry. It runs on a real store with the
daemon's group commit and mover, so it measures exactly the Python and SQLite work of our
handlers, the part of a request the bare passthrough does not pay. It reports the trio
thread's CPU time (`time.thread_time`), which other load on the machine disturbs less than
the wall clock.

Examples:
  .venv/bin/python scripts/bench_handlers.py --files 3000
  .venv/bin/python scripts/bench_handlers.py --files 3000 --profile /tmp/handlers.prof
  .venv/bin/python scripts/bench_handlers.py --files 3000 --mix clone --size 4890
  .venv/bin/python scripts/bench_handlers.py --files 1000 --mix readdir
"""

from __future__ import annotations

import argparse
import cProfile
import errno
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.fs import FileSystem
from artifactfs.core.nodes import ROOT_INODE
from artifactfs.fuse.adapter import FuseOperations
from artifactfs.fuse.daemon import tune_gc
from artifactfs.store import Store, init_store

CTX: Any = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
NO_FIELDS = dict(
    update_mode=False, update_uid=False, update_gid=False, update_size=False,
    update_atime=False, update_mtime=False, update_ctime=False,
)


def fields(**set_: bool) -> Any:
    return SimpleNamespace(**{**NO_FIELDS, **set_})


async def replay(ops: FuseOperations, files: int, size: int, mix: str) -> None:
    async def mkdir(parent: int, name: bytes) -> int:
        e = await ops.mkdir(parent, name, 0o755, CTX)
        return int(e.st_ino)

    grid = ROOT_INODE
    for name in (b"b", b"shared", b"ws"):
        grid = await mkdir(grid, name)
    body = os.urandom(size)
    half = size // 2
    d = grid
    for i in range(files):
        if i % 10 == 0:
            d = await mkdir(grid, b"d%d" % i)
        name = b"file-%d.py" % i
        for _ in range(2 if mix == "clone" else 1):
            neg = await ops.lookup(d, name, CTX)
            assert neg.st_ino == 0
        fi, attr = await ops.create(d, name, stat.S_IFREG | 0o644, os.O_WRONLY, CTX)
        fh, ino = fi.fh, attr.st_ino
        if mix == "clone":
            try:
                await ops.getxattr(ino, b"security.capability", CTX)
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.ENODATA
            await ops.write(fh, 0, body)
            await ops.flush(fh)
            await ops.release(fh)
            await ops.getattr(ino, CTX)
            await ops.getattr(ino, CTX)
            continue
        for off, piece in ((0, body[:half]), (half, body[half:])):
            try:
                await ops.getxattr(ino, b"security.capability", CTX)
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.ENODATA
            await ops.write(fh, off, piece)
        a = pyfuse3.EntryAttributes()
        a.st_uid, a.st_gid, a.st_mode = 1000, 1000, stat.S_IFREG | 0o644
        a.st_atime_ns = a.st_mtime_ns = 1_700_000_000 * 10**9
        await ops.setattr(ino, a, fields(update_uid=True, update_gid=True), None, CTX)
        await ops.setattr(ino, a, fields(update_mode=True), None, CTX)
        await ops.setattr(ino, a, fields(update_atime=True, update_mtime=True), None, CTX)
        await ops.setattr(ino, a, fields(update_mode=True), None, CTX)
        await ops.getattr(ino, CTX)
        await ops.flush(fh)
        await ops.release(fh)
        await ops.getattr(ino, CTX)


LISTINGS = 20  # --mix readdir: listings of the directory per run


async def fill_directory(ops: FuseOperations, files: int, size: int) -> int:
    d: int = ROOT_INODE
    for name in (b"b", b"shared", b"ws", b"dir"):
        d = int((await ops.mkdir(d, name, 0o755, CTX)).st_ino)
    body = os.urandom(size)
    for i in range(files):
        fi, _ = await ops.create(d, b"file-%05d.py" % i, stat.S_IFREG | 0o644, os.O_WRONLY, CTX)
        await ops.write(fi.fh, 0, body)
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
    return d


async def list_directory(ops: FuseOperations, d: int, times: int) -> None:
    fh = await ops.opendir(d, CTX)
    for _ in range(times):
        after = 0
        while entries := await ops.fs.readdir(fh, after):
            for ent in entries:
                ops._entry(ent.attr)  # what readdir_reply is given for each entry
                ops.fs.remember(ent.attr.ino)
                after = ent.next_offset


async def run(store_path: Path, files: int, size: int, mix: str, profile: Path | None) -> float:
    init_store(store_path)
    store = Store(store_path)
    try:
        io = BlockIO(store.backend, store.config.block_size)
        fs = FileSystem(store.index, io)
        ops = FuseOperations(fs)
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            store.index.defer_checkpoints()
            store.index.group_commit = True
            store.index.enable_redo()
            tune_gc()  # as the daemon does before serving
            d = await fill_directory(ops, files, size) if mix == "readdir" else 0
            prof = cProfile.Profile() if profile else None
            t0 = time.thread_time()
            if prof:
                prof.enable()
            if mix == "readdir":
                await list_directory(ops, d, LISTINGS)
            else:
                await replay(ops, files, size, mix)
            if prof:
                prof.disable()
                prof.dump_stats(profile)  # type: ignore[arg-type]
            elapsed = time.thread_time() - t0
            if mix == "readdir":
                elapsed /= LISTINGS  # per file = per listed entry
            await fs.shutdown()
            nursery.cancel_scope.cancel()
        return elapsed
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=3000)
    p.add_argument("--size", type=int, default=6000, help="bytes per file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mix", choices=("tar", "clone", "readdir"), default="tar",
                   help="requests per file")
    p.add_argument("--profile", type=Path, help="write a cProfile of the last run here")
    a = p.parse_args(argv)
    best = []
    for rep in range(a.repeat):
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            prof = a.profile if rep == a.repeat - 1 else None
            t = trio.run(run, Path(tmp) / "store", a.files, a.size, a.mix, prof)
        best.append(t)
        print(f"run {rep + 1}: {t:.2f} s of trio-thread CPU, {t / a.files * 1e6:.0f} us per file",
              file=sys.stderr)
    m = min(best)
    print(f"best: {m / a.files * 1e6:.0f} us of trio-thread CPU per file "
          f"({a.files} files, {a.size} bytes each, {a.mix} mix)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
