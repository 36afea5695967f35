"""`artifactfs mount`: serve a store at a mountpoint (in the background unless --foreground)."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import trio
import typer

from artifactfs.cli import mounts
from artifactfs.cli.common import resolve_store, setup_logging
from artifactfs.cli.init_cmd import parse_size
from artifactfs.credentials import authenticate, read_credential_file
from artifactfs.errors import MountError, StoreMissing
from artifactfs.fuse.daemon import MountSettings, serve
from artifactfs.index.db import GROUP_COMMIT_INTERVAL
from artifactfs.store import (
    Store,
    check_store_bucket,
    default_store_path,
    init_store,
    is_store,
)

READY_TIMEOUT = 60.0


def default_mountpoint() -> Path:
    return Path.home() / "grid"


def check_mountpoint(mnt: Path, *, create: bool) -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: install fuse3 and load the fuse module")
    if mounts.is_mounted(mnt):
        raise MountError(
            f"{mnt} is already a mount point: unmount it first (artifactfs umount {mnt})"
        )
    if not mnt.exists():
        if not create:
            raise MountError(f"mountpoint {mnt} does not exist: create it (mkdir -p {mnt})")
        mnt.mkdir(parents=True)
    if not mnt.is_dir():
        raise MountError(f"mountpoint {mnt} is not a directory")
    if any(mnt.iterdir()):
        raise MountError(f"mountpoint {mnt} is not empty: choose an empty directory")


def mount(
    store_arg: Annotated[
        Path | None, typer.Argument(metavar="[STORE]", help="Store directory.")
    ] = None,
    mountpoint: Annotated[
        Path | None, typer.Argument(metavar="[MOUNTPOINT]", help="Where to mount (~/grid).")
    ] = None,
    store: Annotated[Path | None, typer.Option("--store", help="Store directory.")] = None,
    options: Annotated[
        list[str] | None,
        typer.Option(
            "-o", help="FUSE mount options, e.g. -o allow_other (repeatable, or comma-separated)."
        ),
    ] = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", "-f", help="Stay attached (for systemd).")
    ] = False,
    attr_timeout: Annotated[
        float, typer.Option(help="Seconds the kernel may cache attributes and entries.")
    ] = 5.0,
    credential: Annotated[
        Path | None,
        typer.Option(
            "--credential",
            help="Mount with this credential file: only its sandbox, user and session appear.",
        ),
    ] = None,
    owner: Annotated[
        str | None,
        typer.Option(
            "--owner",
            metavar="UID:GID",
            help="Show every file as owned by UID:GID (containers running as that uid).",
        ),
    ] = None,
    dirty_budget: Annotated[
        str,
        typer.Option(
            "--dirty-budget",
            metavar="SIZE",
            help="Memory for written data not yet in the block store or not yet hashed "
            "(writers wait, or get ENOSPC when the store refuses blocks, beyond it).",
        ),
    ] = "128M",
    commit_interval: Annotated[
        float,
        typer.Option(
            "--commit-interval",
            metavar="SECONDS",
            help="How often changes are committed to the index, where other processes see "
            "them; closes in between are kept in a redo log, which a crash does not lose.",
        ),
    ] = GROUP_COMMIT_INTERVAL,
    debug: Annotated[bool, typer.Option(help="Log every request.")] = False,
    ready_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Mount a store's grid.

    With no arguments, serves the default store (created if missing) at ~/grid. Returns once
    the mount answers; unmount with `artifactfs umount MOUNTPOINT`.

    """
    explicit = store_arg or store
    path = resolve_store(explicit)
    mnt = (mountpoint or default_mountpoint()).expanduser().absolute()
    if not is_store(path):
        if explicit is None or path == default_store_path():
            init_store(path)
        else:
            raise StoreMissing(f"no artifactfs store at {path}: run `artifactfs init {path}`")
    opts = [o for group in (options or []) for o in group.split(",") if o]
    if not 0 < commit_interval <= 3600:
        raise MountError(f"--commit-interval takes 0 < SECONDS <= 3600, not {commit_interval:g}")
    token = None
    if credential is not None:
        token = read_credential_file(credential)
        _check_credential(path, token)  # refused here, in one line, before any daemon
    if ready_fd is None:  # the spawned daemon's parent has checked all this
        check_mountpoint(mnt, create=mountpoint is None)
        # Wrong keys or a missing bucket would mount and then fail every upload in the
        # background: refuse in one line here, before any daemon, as init does.
        check_store_bucket(path)
    settings = MountSettings(
        store=path,
        mountpoint=mnt,
        fuse_options=opts,
        entry_timeout=attr_timeout,
        attr_timeout=attr_timeout,
        credential_token=token,
        owner=_parse_owner(owner),
        dirty_budget=parse_size(dirty_budget),
        commit_interval=commit_interval,
    )
    if foreground:
        setup_logging(debug)
        if not debug:
            logging.getLogger("artifactfs.fuse.adapter").setLevel(logging.INFO)
        try:
            trio.run(serve, settings, ready_fd)
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mnt}: {exc}") from None
        return
    _spawn(path, mnt, opts, attr_timeout, debug, credential, owner, dirty_budget,
           commit_interval)


def _parse_owner(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    uid, sep, gid = text.partition(":")
    if not (uid.isdigit() and (not sep or gid.isdigit())):
        raise MountError(f"--owner takes UID:GID in numbers (e.g. 1000:1000), not {text!r}")
    return int(uid), int(gid or uid)


def _check_credential(path: Path, token: str) -> None:
    store = Store(path)
    try:
        authenticate(path, store.config.store_id, store.index, token)
    finally:
        store.close()


def _spawn(
    path: Path,
    mnt: Path,
    opts: list[str],
    attr_timeout: float,
    debug: bool,
    credential: Path | None,
    owner: str | None,
    dirty_budget: str,
    commit_interval: float,
) -> None:
    log_path = path / "logs" / f"mount-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "artifactfs.cli.main",
        "mount",
        str(path),
        str(mnt),
        "--foreground",
        "--ready-fd",
        str(w),
        "--attr-timeout",
        str(attr_timeout),
        "--dirty-budget",
        dirty_budget,
        "--commit-interval",
        str(commit_interval),
    ]
    if debug:
        argv.append("--debug")
    if credential is not None:
        argv += ["--credential", str(credential.absolute())]
    if owner is not None:
        argv += ["--owner", owner]
    for o in opts:
        argv += ["-o", o]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(w,),
            start_new_session=True,
        )
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
        got = os.read(r, 1) if ready else b""
    finally:
        os.close(r)
    if got != b"1":
        if proc.poll() is None:
            proc.kill()
        tail = _last_error(log_path)
        raise MountError(f"mounting {mnt} failed: {tail} (log: {log_path})")
    mounts.record(mnt, proc.pid, path, log_path)
    typer.echo(f"mounted {path} at {mnt} (pid {proc.pid}); unmount with: artifactfs umount {mnt}")


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "the daemon exited"
    for line in reversed(lines):
        if line.startswith("artifactfs: error:"):
            return line.removeprefix("artifactfs: error:").strip()
    for line in reversed(lines):
        if line:
            return line
    return "the daemon exited without a message"
