"""Crash tests: data that was fsync'ed, or written and closed, survives `kill -9` of the daemon and
a remount, byte for byte. Only writes acknowledged before the crash are recorded, the daemon is
really killed (SIGKILL, checked), and the same store is mounted again by a new process.
Needs a real mount (skips with ARTIFACTFS_TEST_TARGET=plain)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
from mountutil import Mount, is_mounted, kill_daemon, mounted, workspace

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024
SIZES = [0, 1, 4095, 4096, 4097, 65_536 + 3, MiB - 1, MiB + 1, 3 * MiB + 12_345, 9 * MiB + 7]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_fsynced(path: Path, data: bytes, chunk: int = 300_001) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(data), chunk):
            os.write(fd, data[i : i + chunk])
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by name (metadata changes are durable once this returns)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash(mount: Mount) -> None:
    """kill -9 the daemon and check that the crash path was really taken."""
    assert mount.proc.poll() is None, "the daemon died before the crash was injected"
    returncode = kill_daemon(mount)
    assert returncode == -signal.SIGKILL
    assert mount.proc.returncode == -signal.SIGKILL
    assert not is_mounted(mount.mountpoint)


def verify(root: Path, recorded: dict[str, str]) -> None:
    for rel, expected in sorted(recorded.items()):
        data = (root / rel).read_bytes()
        assert digest(data) == expected, f"{rel}: {len(data)} bytes, content differs"


def test_fsynced_and_closed_files_survive_kill_9(mount_dirs: tuple[Path, Path]) -> None:
    store, mountpoint = mount_dirs
    rng = random.Random(11)
    recorded: dict[str, str] = {}
    with mounted(store, mountpoint) as first:
        ws = workspace(first.mountpoint)
        (ws / "sub" / "deeper").mkdir(parents=True)
        for i, size in enumerate(SIZES):
            data = rng.randbytes(size)
            rel = f"sub/deeper/synced-{i}" if i % 2 else f"synced-{i}"
            write_fsynced(ws / rel, data)
            recorded[rel] = digest(data)  # only after fsync returned
        for i, size in enumerate([10, 5000, 2 * MiB + 3]):
            data = rng.randbytes(size)
            with open(ws / f"closed-{i}", "wb") as f:
                f.write(data)
            recorded[f"closed-{i}"] = digest(data)  # only after close returned
        # An overwrite in the middle of an existing file, then fsync.
        old = bytearray(rng.randbytes(2 * MiB + 100))
        write_fsynced(ws / "overwritten", bytes(old))
        fd = os.open(ws / "overwritten", os.O_WRONLY)
        try:
            os.pwrite(fd, b"N" * 70_000, MiB - 35_000)
            os.fsync(fd)
        finally:
            os.close(fd)
        old[MiB - 35_000 : MiB + 35_000] = b"N" * 70_000
        recorded["overwritten"] = digest(bytes(old))
        # A truncated file.
        write_fsynced(ws / "truncated", rng.randbytes(3 * MiB))
        os.truncate(ws / "truncated", MiB + 5)
        fsync_path(ws / "truncated")
        with open(ws / "truncated", "rb") as f:
            recorded["truncated"] = digest(f.read())
        crash(first)

    with mounted(store, mountpoint, init=False) as second:
        ws = second.mountpoint / "t" / "shared" / "ws"
        verify(ws, recorded)
        assert sorted(p.name for p in ws.iterdir()) == sorted(
            {rel.split("/")[0] for rel in recorded}
        )


def test_closes_kept_only_in_the_redo_log_survive_kill_9(mount_dirs: tuple[Path, Path]) -> None:
    """With commits an hour apart, what was closed is only in the daemon's redo log when it
    is killed: the next mount applies it (and the metadata changes made before the close)."""
    store, mountpoint = mount_dirs
    rng = random.Random(5)
    recorded: dict[str, str] = {}
    redo_dir = store / "index.sqlite3-redo"
    with mounted(store, mountpoint, extra_args=["--commit-interval", "3600"]) as first:
        ws = workspace(first.mountpoint)
        (ws / "d").mkdir()
        for i, size in enumerate([0, 1, 5000, 70_000, MiB + 3]):
            data = rng.randbytes(size)
            with open(ws / "d" / f"closed-{i}", "wb") as f:
                f.write(data)
            recorded[f"d/closed-{i}"] = digest(data)
        os.rename(ws / "d" / "closed-0", ws / "d" / "renamed")
        recorded["d/renamed"] = recorded.pop("d/closed-0")
        os.setxattr(ws / "d" / "renamed", "user.k", b"v")
        os.chmod(ws / "d" / "closed-1", 0o600)
        with open(ws / "last", "wb") as f:  # this close carries the three changes above
            f.write(b"last")
        recorded["last"] = digest(b"last")
        [log_file] = redo_dir.iterdir()
        assert log_file.stat().st_size > 0
        crash(first)
        assert log_file.exists()  # nothing cleaned up: the crash path

    with mounted(store, mountpoint, init=False) as second:
        ws = second.mountpoint / "t" / "shared" / "ws"
        verify(ws, recorded)
        assert not (ws / "d" / "closed-0").exists()
        assert os.getxattr(ws / "d" / "renamed", "user.k") == b"v"
        assert stat.S_IMODE(os.stat(ws / "d" / "closed-1").st_mode) == 0o600
        assert not log_file.exists()  # applied once, then removed
    assert list(redo_dir.iterdir()) == []  # a clean unmount leaves no log


def test_a_live_mount_shows_at_once_what_a_killed_mount_closed(
    mount_dirs: tuple[Path, Path],
) -> None:
    """Two mounts of one store. A closes files (only in its redo log: commits an hour apart)
    and is killed. B, which only reads, applies A's log within a second or so, and drops
    its kernel's cached pages and attributes of what changed: B caches them for 60 s here,
    so a stale cache would show the old bytes for that long."""
    store, mountpoint = mount_dirs
    other = mountpoint.parent / "mnt-b"
    other.mkdir()
    old, new = b"old" * 3000, b"new" * 5000
    with mounted(store, other, extra_args=["--attr-timeout", "60"]) as b:
        wb = workspace(b.mountpoint)
        (wb / "x").write_bytes(old)
        assert (wb / "x").read_bytes() == old  # now in B's page cache (keep_cache)
        with mounted(
            store, mountpoint, init=False, extra_args=["--commit-interval", "3600"]
        ) as a:
            wa = a.mountpoint / "t" / "shared" / "ws"
            assert (wa / "x").read_bytes() == old
            (wa / "x").write_bytes(new)
            (wa / "y").write_bytes(b"y")
            crash(a)
        deadline = time.monotonic() + 15
        while (wb / "x").read_bytes() != new:
            assert time.monotonic() < deadline, "B still shows x as it was before A's close"
            time.sleep(0.1)
        assert (wb / "y").read_bytes() == b"y"
        assert os.stat(wb / "x").st_size == len(new)


def test_metadata_survives_kill_9(mount_dirs: tuple[Path, Path]) -> None:
    store, mountpoint = mount_dirs
    with mounted(store, mountpoint) as first:
        ws = workspace(first.mountpoint)
        write_fsynced(ws / "f", b"payload")
        os.chmod(ws / "f", 0o751)
        os.utime(ws / "f", ns=(1_600_000_000_000_000_001, 1_600_000_000_123_456_789))
        os.setxattr(ws / "f", "user.k", b"value")
        os.symlink("f", ws / "link")
        os.link(ws / "f", ws / "hard")
        os.mkdir(ws / "dir", 0o750)
        write_fsynced(ws / "renamed-from", b"moved")
        os.rename(ws / "renamed-from", ws / "renamed-to")
        for path in (ws / "f", ws / "dir", ws):
            fsync_path(path)
        crash(first)

    with mounted(store, mountpoint, init=False) as second:
        ws = second.mountpoint / "t" / "shared" / "ws"
        st = os.stat(ws / "f")
        assert stat.S_IMODE(st.st_mode) == 0o751
        assert st.st_mtime_ns == 1_600_000_000_123_456_789
        assert st.st_nlink == 2
        assert os.stat(ws / "hard").st_ino == st.st_ino
        assert os.getxattr(ws / "f", "user.k") == b"value"
        assert os.readlink(ws / "link") == "f"
        assert stat.S_IMODE(os.stat(ws / "dir").st_mode) == 0o750
        assert (ws / "renamed-to").read_bytes() == b"moved"
        assert not (ws / "renamed-from").exists()


def test_unsynced_block_write_is_old_or_new_never_torn(mount_dirs: tuple[Path, Path]) -> None:
    store, mountpoint = mount_dirs
    old = random.Random(12).randbytes(MiB)
    new_block = b"\xee" * 4096
    with mounted(store, mountpoint) as first:
        ws = workspace(first.mountpoint)
        write_fsynced(ws / "f", old)
        fd = os.open(ws / "f", os.O_WRONLY)
        os.pwrite(fd, new_block, 64 * 4096)  # not fsync'ed, not closed when the daemon dies
        crash(first)
        with contextlib.suppress(OSError):
            os.close(fd)  # the connection is gone: this only frees the descriptor

    new = old[: 64 * 4096] + new_block + old[65 * 4096 :]
    with mounted(store, mountpoint, init=False) as second:
        data = (second.mountpoint / "t" / "shared" / "ws" / "f").read_bytes()
        assert data in (old, new)


def test_crash_during_writes_keeps_every_synced_file(mount_dirs: tuple[Path, Path]) -> None:
    store, mountpoint = mount_dirs
    recorded: dict[str, str] = {}
    crashing = threading.Event()
    failures: list[BaseException] = []

    def writer(ws: Path) -> None:
        rng = random.Random(13)
        i = 0
        try:
            while not crashing.is_set():
                data = rng.randbytes(rng.choice([1, 4096, 70_000, MiB + 3, 3 * MiB - 1]))
                write_fsynced(ws / f"w-{i}", data)
                recorded[f"w-{i}"] = digest(data)
                i += 1
        except OSError as exc:
            # Once the daemon is killed, the dead connection answers ENOTCONN/ECONNABORTED
            # (ENOENT once the mountpoint is detached); any error before that is a failure.
            expected = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENOENT)
            if not crashing.is_set() or exc.errno not in expected:
                failures.append(exc)

    with mounted(store, mountpoint) as first:
        ws = workspace(first.mountpoint)
        thread = threading.Thread(target=writer, args=(ws,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while len(recorded) < 5 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert not failures, failures
        assert len(recorded) >= 5, "the writer made too little progress"
        crashing.set()
        crash(first)  # while the writer is in the middle of its next file
        thread.join(30)
        assert not thread.is_alive()
        assert not failures, failures

    with mounted(store, mountpoint, init=False) as second:
        ws = second.mountpoint / "t" / "shared" / "ws"
        verify(ws, recorded)


def test_store_is_usable_after_a_crash(mount_dirs: tuple[Path, Path]) -> None:
    store, mountpoint = mount_dirs
    with mounted(store, mountpoint) as first:
        ws = workspace(first.mountpoint)
        write_fsynced(ws / "before", b"before the crash")
        crash(first)

    with mounted(store, mountpoint, init=False) as second:
        ws = second.mountpoint / "t" / "shared" / "ws"
        data = os.urandom(2 * MiB + 1)
        (ws / "after").write_bytes(data)
        (ws / "dir").mkdir()
        os.rename(ws / "before", ws / "dir" / "moved")
        workspace(second.mountpoint, "t", "shared", "another")

    with mounted(store, mountpoint, init=False) as third:  # and cleanly again after that
        ws = third.mountpoint / "t" / "shared" / "ws"
        assert (ws / "after").read_bytes() == data
        assert (ws / "dir" / "moved").read_bytes() == b"before the crash"
        assert sorted(os.listdir(third.mountpoint / "t" / "shared")) == ["another", "ws"]
