#!/usr/bin/env python3
"""Checkpoint benchmark: the costs that structural sharing is for (issue 4).

On a workspace of FILES files in DIRS directories, built through the filesystem core of a
fresh local store (the same `FileSystem` the daemon serves, without FUSE in the way):

  first checkpoint          time and manifest bytes written
  checkpoint after 10       the same after changing 10 files in 10 directories
  diff (10 changes)         `diff first second` (skips equal subtrees)
  full tree walk            encoding the whole live tree from scratch: what a diff or a
                            checkpoint without structural sharing would read
  restore (10 changes)      back to the first checkpoint after changing 10 files
  restore whole             materialising the checkpoint into an empty namespace

and prints the ratios the issue sets targets for: checkpoint-after-10 under 5% of the first's
time and under 1% of its metadata bytes; diff under 5% of a full walk.

    python scripts/bench_checkpoints.py [--files 100000 --dirs 1000] [--json FILE]

`scripts/bench.py` runs it after its own table (its --quick uses 10,000 files in 100 dirs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.diff import diff
from artifactfs.core.fs import FileSystem
from artifactfs.core.nodes import ROOT_INODE, Caller
from artifactfs.core.restore import restore
from artifactfs.store import Store, init_store

CALLER = Caller(uid=os.getuid(), gid=os.getgid())


async def _mkdir(fs: FileSystem, parent: int, name: str) -> int:
    return int((await fs.mkdir(parent, name.encode(), 0o755, CALLER)).ino)


async def _write(fs: FileSystem, parent: int, name: str, data: bytes) -> None:
    try:
        ino = (await fs.lookup(parent, name.encode(), CALLER)).ino
        fh = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, CALLER)
    except Exception:
        fh, _ = await fs.create(parent, name.encode(), 0o644, os.O_WRONLY, CALLER)
    try:
        await fs.write(fh, 0, data)
        await fs.flush(fh)
    finally:
        await fs.release(fh)


def _timed_log(msg: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


async def run(workdir: Path, files: int, dirs: int) -> dict[str, float]:
    store_path = workdir / "store"
    init_store(store_path)
    store = Store(store_path)
    out: dict[str, float] = {}
    try:
        io = BlockIO(store.backend, store.config.block_size)
        fs = FileSystem(store.index, io)
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            store.index.group_commit = True  # as the daemon runs it
            sb = await _mkdir(fs, ROOT_INODE, "bench")
            scope = await _mkdir(fs, sb, "shared")
            ws = await _mkdir(fs, scope, "ws")
            per_dir = max(files // dirs, 1)
            _timed_log(f"building {files:,} files in {dirs:,} directories")
            t0 = time.perf_counter()
            dir_inos: list[int] = []
            for d in range(dirs):
                top = await _mkdir(fs, ws, f"d{d % 10}") if d < 10 else dir_inos[d % 10]
                sub = top if d < 10 else await _mkdir(fs, top, f"sub{d}")
                dir_inos.append(sub)
                for f in range(per_dir):
                    await _write(fs, sub, f"f{f}.txt", f"file {d}/{f}\n".encode() * 8)
                store.index.flush()
            out["build s"] = time.perf_counter() - t0
            ns = store.index.namespace_by_root(ws)
            assert ns is not None
            cp = fs.checkpoints

            t0 = time.perf_counter()
            first = await cp.create(ns, "first", "bench")
            out["first checkpoint s"] = time.perf_counter() - t0
            out["first checkpoint bytes"] = first.manifest_bytes
            _timed_log(f"first checkpoint: {out['first checkpoint s']:.2f} s")

            for d in range(10):
                await _write(fs, dir_inos[d * (dirs // 10)], "f0.txt", b"changed\n")
            store.index.flush()
            t0 = time.perf_counter()
            second = await cp.create(ns, "second", "bench")
            out["second checkpoint s"] = time.perf_counter() - t0
            out["second checkpoint bytes"] = second.manifest_bytes

            t0 = time.perf_counter()
            changes = await diff(cp, ns, first.root, second.root)
            out["diff s"] = time.perf_counter() - t0
            assert len(changes) == 10, changes
            cp._cache.clear()  # a cold full walk, like a cold diff of unrelated trees
            t0 = time.perf_counter()
            await cp.build(ws, store_new=False, reuse=False)
            out["full walk s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            result = await restore(cp, ns, first.root, actor="bench", wait=False)
            out["restore 10 s"] = time.perf_counter() - t0
            assert result.changed == 10, result

            copy = await _mkdir(fs, scope, "copy")
            target = store.index.namespace_by_root(copy)
            assert target is not None
            t0 = time.perf_counter()
            await restore(cp, target, first.root, actor="bench", wait=False)
            out["restore whole s"] = time.perf_counter() - t0
            _timed_log(f"whole restore: {out['restore whole s']:.2f} s")
            await fs.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    return out


def render(r: dict[str, float], files: int, dirs: int) -> str:
    def pct(a: str, b: str) -> str:
        return f"{100 * r[a] / r[b]:.2f}%" if r.get(b) else "-"

    lines = [
        f"checkpoints ({files:,} files in {dirs:,} directories, local store, core API)",
        f"  build the workspace         {r['build s']:9.2f} s",
        f"  first checkpoint            {r['first checkpoint s']:9.3f} s "
        f"{int(r['first checkpoint bytes']):>12,} manifest bytes",
        f"  checkpoint after 10 changes {r['second checkpoint s']:9.3f} s "
        f"{int(r['second checkpoint bytes']):>12,} manifest bytes",
        f"      time vs first: {pct('second checkpoint s', 'first checkpoint s')} "
        f"(target < 5%); bytes vs first: "
        f"{pct('second checkpoint bytes', 'first checkpoint bytes')} (target < 1%)",
        f"  diff first..second          {r['diff s']:9.3f} s",
        f"  full tree walk              {r['full walk s']:9.3f} s",
        f"      diff vs full walk: {pct('diff s', 'full walk s')} (target < 5%)",
        f"  restore after 10 changes    {r['restore 10 s']:9.3f} s "
        f"({pct('restore 10 s', 'restore whole s')} of a whole restore)",
        f"  restore whole workspace     {r['restore whole s']:9.3f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--dirs", type=int, default=1_000)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="artifactfs-ckbench-", dir=args.workdir))
    try:
        results = trio.run(run, work, args.files, args.dirs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results, args.files, args.dirs))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
