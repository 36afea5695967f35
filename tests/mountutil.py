"""Helpers for the mounted test tier: run `artifactfs mount --foreground`, wait until the mount
answers, and always unmount it again and check that the daemon exited cleanly.

This module owns the life cycle of test mounts (start, wait, unmount, crash) and running commands
as another uid. It knows nothing about what the filesystem contains beyond the grid layout used by
`workspace`, and it never touches the store directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ARTIFACTFS = Path(sys.executable).parent / "artifactfs"
FUSERMOUNT = "fusermount3"

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
UNMOUNT_ATTEMPTS = 10
LOG_TAIL_LINES = 60

T = TypeVar("T")


class MountError(RuntimeError):
    """The daemon did not mount, did not unmount, or did not exit cleanly."""


@dataclass
class Mount:
    mountpoint: Path
    store: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    # Set by kill_daemon(): the daemon was crashed on purpose, so its exit status is not checked.
    killed: bool = field(default=False)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {log_path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _unescape_mountinfo(field_: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field_):
        code = field_[i + 1 : i + 4]
        if field_[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mount_fstype(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at `mountpoint`, from /proc/self/mountinfo.

    Reading mountinfo never blocks on the FUSE daemon, unlike stat() of the mountpoint.
    """
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == target:
                found = right.split()[0]  # the last mount on a path is the visible one
    return found


def is_mounted(mountpoint: Path) -> bool:
    return mount_fstype(mountpoint) is not None


def _call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run fn in a daemon thread so a hung FUSE request cannot hang the test run forever."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise MountError(f"{what} did not answer within {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0]


def _next_log_path(store: Path) -> Path:
    n = 1
    while True:
        candidate = store.parent / f"{store.name}.mount{n}.log"
        if not candidate.exists():
            return candidate
        n += 1


def init_store(store: Path) -> None:
    result = subprocess.run(
        [str(ARTIFACTFS), "init", str(store)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise MountError(
            f"`artifactfs init {store}` exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )


def _fusermount(mountpoint: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FUSERMOUNT, *flags, str(mountpoint)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _force_cleanup(mount: Mount) -> None:
    """Last resort after a failure: detach the mount and kill the daemon, never raise."""
    if is_mounted(mount.mountpoint):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _fusermount(mount.mountpoint, "-u", "-z")
    if mount.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            mount.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            mount.proc.wait(EXIT_TIMEOUT)


def _wait_until_mounted(mount: Mount, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if mount.proc.poll() is not None:
            raise MountError(
                f"artifactfs mount exited with status {mount.proc.returncode} before "
                f"{mount.mountpoint} was mounted; log tail:\n{mount.log_tail()}"
            )
        if (mount_fstype(mount.mountpoint) or "").startswith("fuse"):
            # The kernel has the mount; now prove that the daemon answers requests.
            remaining = max(deadline - time.monotonic(), 1.0)
            if _call_with_timeout(
                lambda: os.path.ismount(mount.mountpoint), remaining, "stat of the mountpoint"
            ):
                return
        if time.monotonic() > deadline:
            raise MountError(
                f"{mount.mountpoint} was not mounted within {timeout:.0f} s; "
                f"log tail:\n{mount.log_tail()}"
            )
        time.sleep(0.05)


def _unmount_and_check(mount: Mount) -> None:
    """Unmount, wait for the daemon and check it exited 0 without a traceback."""
    if mount.killed:
        if is_mounted(mount.mountpoint):
            _fusermount(mount.mountpoint, "-u", "-z")
        if mount.proc.poll() is None:
            mount.proc.kill()
            mount.proc.wait(EXIT_TIMEOUT)
        return

    last = None
    for attempt in range(UNMOUNT_ATTEMPTS):
        if not is_mounted(mount.mountpoint):
            break
        last = _fusermount(mount.mountpoint, "-u")
        if last.returncode == 0:
            break
        if "busy" not in last.stderr.lower():
            raise MountError(f"`fusermount3 -u {mount.mountpoint}` failed: {last.stderr.strip()}")
        time.sleep(0.1 * (attempt + 1))  # a process may still be leaving the mount
    else:
        raise MountError(
            f"{mount.mountpoint} stayed busy after {UNMOUNT_ATTEMPTS} attempts: "
            f"{last.stderr.strip() if last else ''}"
        )

    try:
        returncode = mount.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MountError(
            f"artifactfs did not exit within {EXIT_TIMEOUT:.0f} s of the unmount; "
            f"log tail:\n{mount.log_tail()}"
        ) from None
    log = mount.log_path.read_text(errors="replace")
    if returncode != 0:
        raise MountError(
            f"artifactfs exited with status {returncode} after the unmount; "
            f"log tail:\n{mount.log_tail()}"
        )
    if "Traceback" in log:
        raise MountError(f"artifactfs logged a traceback; log tail:\n{mount.log_tail()}")


@contextlib.contextmanager
def mounted(
    store: Path,
    mountpoint: Path,
    options: Sequence[str] = ("allow_other",),
    *,
    init: bool = True,
    timeout: float = MOUNT_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> Iterator[Mount]:
    """Mount `store` at `mountpoint` with `artifactfs mount --foreground` for the block's duration.

    The daemon's output goes to `<store>.mountN.log` beside the store. On leaving the block the
    filesystem is always unmounted; a daemon that does not exit 0, or that logged a traceback,
    fails the test. After any failure the mount is lazily detached and the daemon killed.
    """
    store, mountpoint = Path(store), Path(mountpoint)
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    if init:
        init_store(store)
    log_path = _next_log_path(store)
    argv = [str(ARTIFACTFS), "mount", str(store), str(mountpoint), "--foreground"]
    if options:
        argv += ["-o", ",".join(options)]
    argv += list(extra_args)
    with open(log_path, "wb") as log:
        # A new session: a Ctrl-C of pytest must not kill the daemon before the unmount in finally.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    mount = Mount(mountpoint=mountpoint, store=store, proc=proc, log_path=log_path)
    try:
        _wait_until_mounted(mount, timeout)
    except BaseException:
        _force_cleanup(mount)
        raise
    try:
        yield mount
    finally:
        try:
            _unmount_and_check(mount)
        except BaseException:
            _force_cleanup(mount)
            raise


def kill_daemon(mount: Mount) -> int:
    """Crash the daemon with SIGKILL and detach its dead mount; return the exit status (-9)."""
    if mount.proc.poll() is not None:
        raise MountError(
            f"the daemon had already exited with {mount.proc.returncode} before kill_daemon"
        )
    mount.killed = True
    mount.proc.send_signal(signal.SIGKILL)
    returncode = mount.proc.wait(EXIT_TIMEOUT)
    if is_mounted(mount.mountpoint):
        result = _fusermount(mount.mountpoint, "-u", "-z")
        if result.returncode != 0 and is_mounted(mount.mountpoint):
            raise MountError(f"`fusermount3 -u -z` failed: {result.stderr.strip()}")
    return returncode


def workspace(root: Path, sandbox: str = "t", scope: str = "shared", namespace: str = "ws") -> Path:
    """Create (as needed) `root/sandbox/scope` and a new workspace namespace in it, by mkdir."""
    path = Path(root)
    for name in (sandbox, scope):
        path = path / name
        if not path.is_dir():
            path.mkdir()
    path = path / namespace
    path.mkdir()
    return path


def run_as(
    uid: int, gid: int, argv: Sequence[str | os.PathLike[str]], **kw: Any
) -> subprocess.CompletedProcess[Any]:
    """Run argv as uid/gid with no supplementary groups (numeric ids need no system user).

    HOME defaults to /tmp, so tools do not try to read root's home directory.
    """
    if "env" not in kw:
        env = dict(os.environ)
        env["HOME"] = "/tmp"
        kw["env"] = env
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("timeout", 120)
    return subprocess.run([os.fspath(a) for a in argv], user=uid, group=gid, extra_groups=[], **kw)
