"""Running one mount: open the store, build the core, serve pyfuse3 on trio until unmounted.

Runs in the foreground of its process. `artifactfs mount` (without --foreground) starts this
in a child process and waits for the ready byte on `ready_fd`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from artifactfs.core import background
from artifactfs.core.blockio import BlockIO
from artifactfs.core.fs import FileSystem
from artifactfs.core.gc import destroy_scope
from artifactfs.core.nodes import Caller
from artifactfs.core.policy import ADMIN
from artifactfs.core.uploads import Uploader
from artifactfs.credentials import Credential, authenticate, still_valid
from artifactfs.errors import FsError
from artifactfs.fuse.adapter import FuseOperations
from artifactfs.fuse.changes import follow_changes
from artifactfs.index.db import GROUP_COMMIT_INTERVAL
from artifactfs.store import Store

log = logging.getLogger(__name__)


@dataclass
class MountSettings:
    store: Path
    mountpoint: Path
    fuse_options: list[str] = field(default_factory=list)
    entry_timeout: float = 5.0
    attr_timeout: float = 5.0
    read_ahead_kb: int = 1024
    blob_threads: int = 4
    max_tasks: int = 64
    credential_token: str | None = None  # a scoped mount; None: the administrative view
    owner: tuple[int, int] | None = None  # show every node as owned by this uid:gid
    upload_drain_timeout: float = 600.0  # remote stores: how long unmount waits for uploads
    dirty_budget: int = 128 << 20  # written bytes held in memory until stored (and hashed)
    # How often grouped changes are committed; closes in between are in the redo log.
    commit_interval: float = GROUP_COMMIT_INTERVAL


def tune_read_ahead(mountpoint: Path, kb: int) -> bool:
    """Raise the mount's read-ahead: 1 MiB reads instead of 128-256 KiB (FIELD-NOTES)."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(kb))
        return True
    except OSError as exc:
        log.info("could not set read_ahead_kb on %s: %s", mountpoint, exc)
        return False


def fuse_options(settings: MountSettings) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {"fsname=artifactfs", "subtype=artifactfs", "noatime"}
    for opt in settings.fuse_options:
        opts.add(opt)
    return opts


# A young-generation collection after this many allocations (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Fewer and cheaper garbage collections on the request path. Every request allocates
    some hundred objects and almost none form cycles, so young collections every 700
    allocations mostly walk live objects. What start-up made (modules, the store, pyfuse3)
    moves to the permanent generation, which no collection walks again. Measured with
    callgrind on scripts/bench_handlers.py: 2.0% fewer instructions per file (clone mix),
    1.8% (tar mix)."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


# After this long without a write, the memory kept for block buffers goes back to the kernel.
IDLE_RELEASE_AFTER = 30.0
# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest M_MMAP_THRESHOLD glibc takes on 64-bit (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 << 20


@functools.cache
def _libc_function(name: str, argtypes: tuple[Any, ...]) -> Any:
    """`name` from the C library the process runs with, or None where it has none (not
    glibc). Looked up once: `find_library` would run `ldconfig` each time."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


def tune_malloc(keep: int) -> bool:
    """Keep the memory of freed block buffers mapped, up to `keep` bytes, for the next ones.

    pyfuse3 copies every 1 MiB WRITE into a new bytes object, which lives until its block is
    stored. With glibc's defaults such buffers come from their own mmap, or from a heap whose
    free top is returned to the kernel past 2 MiB, so a burst of writes faults every page in
    again (4 KiB at a time, zeroed) on the trio thread: about 6,400 faults per 64 MiB written.
    Heap allocations up to 32 MiB and a trim threshold of `keep` (the dirty budget) make the
    next burst reuse the pages (`release_memory_when_idle` gives them back once writes
    pause). Measured on a second 64 MiB write + fsync through one mount:
    trio-thread faults 6,376 -> 265, its CPU 48 -> 37 ms, the write 98 -> 86 ms (the
    passthrough: 48 ms). False where the C library has no mallopt (not glibc).
    """
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, min(keep, 2**31 - 1)))


def release_memory() -> bool:
    """Hand the free memory malloc keeps (see tune_malloc) back to the kernel (malloc_trim).
    Walks the heaps: run it in a worker thread. True if some was released."""
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    return trim is not None and bool(trim(0))


async def release_memory_when_idle(io: BlockIO, idle: float = IDLE_RELEASE_AFTER) -> None:
    """Once no block was sealed for `idle` seconds after some were, give the memory their
    buffers kept back to the kernel: a mount that is not being written holds no more than
    it uses."""
    released_at = io.writes  # nothing to give back before the first write
    while True:
        wait = io.last_write + idle - trio.current_time()
        await trio.sleep(max(wait, 0) if io.writes != released_at else idle)
        if io.writes != released_at and trio.current_time() - io.last_write >= idle:
            released_at = io.writes
            await trio.to_thread.run_sync(release_memory)


async def serve(settings: MountSettings, ready_fd: int | None = None) -> None:
    store = Store(settings.store)
    try:
        store.check_private()
        io = BlockIO(
            store.backend,
            store.config.block_size,
            threads=settings.blob_threads,
            dirty_budget=settings.dirty_budget,
            journal=store.open_journal(),
        )
        cred = None
        view = ADMIN
        if settings.credential_token is not None:
            cred = authenticate(
                store.path, store.config.store_id, store.index, settings.credential_token
            )
            view = cred.view()
        fs = FileSystem(store.index, io, view=view)
        ops = FuseOperations(
            fs,
            entry_timeout=settings.entry_timeout,
            attr_timeout=settings.attr_timeout,
            owner=settings.owner,
        )
        mnt = str(settings.mountpoint)
        pyfuse3.init(ops, mnt, fuse_options(settings))
        mount_id: int | None = None
        try:
            with store.index.txn():
                store.index.append_event(
                    "mount.start",
                    {
                        "mountpoint": mnt,
                        "pid": os.getpid(),
                        "view": "admin" if cred is None else "credential",
                        "credential": None if cred is None else cred.id,
                        "user": None if cred is None else cred.user,
                        "session": None if cred is None else cred.session,
                    },
                    sandbox=None if cred is None else cred.sandbox,
                )
                store.index.drop_dead_mounts()
                others = bool(store.index.mounts())
                seen = store.index.max_change_seq()
                mount_id = store.index.register_mount(
                    os.getpid(), mnt, seen, credential=None if cred is None else cred.id
                )
            # With other mounts running, publish this one's changes for them to follow.
            store.index.publish_changes(mount_id)
            async with trio.open_nursery() as nursery:
                fs.start(nursery, reclaim_orphans=not others)
                store.index.defer_checkpoints()
                store.index.group_commit = True
                store.index.enable_redo()  # closes append to a log; the committer commits
                nursery.start_soon(_checkpointer, store, fs)
                nursery.start_soon(_group_committer, store, settings.commit_interval)
                nursery.start_soon(follow_changes, store.index, fs, mount_id, seen)
                if cred is not None:
                    nursery.start_soon(_watch_credential, store, fs, cred)
                nursery.start_soon(_sweep_sessions, store, io)
                uploader = Uploader(store.index, store.remote) if store.remote else None
                if uploader is not None:
                    nursery.start_soon(uploader.run)  # uploads, reconcile, index backups
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                nursery.start_soon(_announce_ready, settings, store, ready_fd)
                tune_gc()
                if tune_malloc(settings.dirty_budget):
                    nursery.start_soon(release_memory_when_idle, io)
                await pyfuse3.main(min_tasks=4, max_tasks=settings.max_tasks)
                await fs.shutdown()  # commits everything, the group transaction included
                if uploader is not None:
                    # Unmount waits for the upload queue (bounded), then backs the index up.
                    if not await uploader.drain(settings.upload_drain_timeout):
                        log.warning("unmounting with blocks not yet uploaded: "
                                    "`artifactfs sync` uploads them")
                    await uploader.backup()
                    store.index.flush()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            with store.index.txn():
                if mount_id is not None:
                    store.index.unregister_mount(mount_id)
                store.index.append_event("mount.stop", {"mountpoint": mnt, "pid": os.getpid()})
            log.info("unmounted %s", mnt)
    finally:
        store.close()


async def _announce_ready(settings: MountSettings, store: Store, ready_fd: int | None) -> None:
    """Once the mount answers (a stat through it returns), tune it and tell the parent.

    The stat is a FUSE request to ourselves, so it runs in a worker thread while pyfuse3.main
    serves it on the trio thread.
    """
    await trio.to_thread.run_sync(tune_read_ahead, settings.mountpoint, settings.read_ahead_kb)
    log.info("serving %s at %s", settings.store, settings.mountpoint)
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    sd_notify(f"READY=1\nSTATUS=serving {settings.store} at {settings.mountpoint}")
    # After the parent is told: this walks the whole blob tree. Temp files of puts cut short
    # by a crash; an hour old so no live put is touched.
    swept = await trio.to_thread.run_sync(store.backend.sweep_temp, 3600.0)
    if swept:
        log.info("removed %d temporary blob files left by a crash", swept)


async def _watch_credential(
    store: Store, fs: FileSystem, cred: Credential, interval: float = 1.0
) -> None:
    """Once the credential expires or is revoked, refuse every write (reads go on until
    unmount); checked every second, so within the issue's 5 s."""
    while True:
        await trio.sleep(interval)
        why = still_valid(store.index, cred)
        if why is not None:
            fs.view = dataclasses.replace(fs.view, writable=False)
            log.warning("%s: this mount refuses writes from now on", why)
            return


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how the service is doing; a no-op outside systemd. The
    protocol is one datagram to $NOTIFY_SOCKET (an abstract socket when it starts with @)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


async def _sweep_sessions(store: Store, io: BlockIO) -> None:
    """The store's sweeper in every running daemon: session scopes past their expiry are
    removed with their namespaces, as `artifactfs gc` does (every minute by default;
    ARTIFACTFS_SESSION_SWEEP_S sets the interval)."""
    interval = float(os.environ.get("ARTIFACTFS_SESSION_SWEEP_S", "60"))
    # An administrative core of its own: this mount's view may not see the scope. Inodes it
    # removes are announced as orphans in the change feed, and every mount, this one
    # included, reclaims those it does not hold.
    sweeper = FileSystem(store.index, io)
    root = Caller(uid=0, gid=0)
    while True:
        await trio.sleep(interval)
        # A session's own mounts may read on until they unmount: theirs waits till then.
        busy = set()
        for m in store.index.live_mounts():
            c = store.index.credential(m.credential) if m.credential else None
            if c is not None:
                busy.add((c.sandbox, c.session))
        for scope, sandbox in store.index.ops_expired_sessions(time.time_ns()):
            if (sandbox, scope.owner) in busy:
                continue
            try:
                n = await destroy_scope(sweeper, scope, root)
            except FsError as exc:  # another daemon or gc got there first
                log.info("sweeping %s/%s: %s", sandbox, scope.name, exc)
                continue
            log.info("removed expired session %s/%s (%d namespaces)", sandbox, scope.name, n)
        store.index.flush()


async def _group_committer(store: Store, interval: float) -> None:
    """Commit grouped metadata operations at least every `interval` seconds."""
    while True:
        await trio.sleep(interval)
        store.index.flush()


async def _checkpointer(store: Store, fs: FileSystem, interval: float = 1.0) -> None:
    """Every second: retire stored journal segments (see `retire_due`), then fold the WAL into
    the database in a worker thread, off the request path."""
    retired = trio.current_time()
    while True:
        await trio.sleep(interval)
        try:
            now = trio.current_time()
            if retire_due(now, fs.io.last_write, retired):
                retired = now
                await fs.retire_journal()
            await background.run(_sync_then_checkpoint, fs.io.syncer(), store)
        except Exception as exc:  # a busy database is retried next time
            log.warning("WAL checkpoint failed: %s", exc)


# Stored journal segments are retired once writes pause this long (or at the latest after
# RETIRE_MAX_WAIT): the sync they wait for competes with the writes for the disk, and the
# segments are harmless meanwhile (after a crash the next start stores their blocks again,
# a no-op for a stored blob). While the journal was a table of the index, retiring mid-burst
# ran DELETE slices on the trio thread: waiting for the pause made `git clone` of 3,000
# files after `tar -xf` and `cp -a` 3.41-3.71 s against 3.75-3.93 s.
RETIRE_QUIET = 1.0
RETIRE_MAX_WAIT = 30.0


def retire_due(now: float, last_write: float, retired: float) -> bool:
    """Whether to retire stored journal segments now: no block sealed for RETIRE_QUIET seconds,
    or none retired for RETIRE_MAX_WAIT (a long burst of writes)."""
    return now - last_write >= RETIRE_QUIET or now - retired >= RETIRE_MAX_WAIT


def _sync_then_checkpoint(sync: Callable[[], None], store: Store) -> None:
    # Blobs and journalled blocks (`BlockIO.syncer`) reach stable storage before the index
    # pages that name them (the checkpoint fsyncs the database), as ext4's ordered mode puts
    # data before metadata.
    sync()
    store.index.checkpoint()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    # SIGTERM/SIGINT: leave pyfuse3.main cleanly; the fs is then flushed and unmounted.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("received signal %d: unmounting", sig)
            sd_notify("STOPPING=1\nSTATUS=flushing and unmounting")
            pyfuse3.terminate()
            return
