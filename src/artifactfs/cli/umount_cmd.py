"""`artifactfs umount`: unmount and wait until the daemon has flushed and exited."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer

from artifactfs.cli import mounts
from artifactfs.errors import MountError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def umount(
    mountpoint: Annotated[Path, typer.Argument(help="The mountpoint to unmount.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the daemon.")] = 120.0,
    lazy: Annotated[bool, typer.Option(help="Detach now even if busy (umount -l).")] = False,
) -> None:
    """Unmount a grid; returns once everything is flushed and the daemon has exited."""
    mnt = mountpoint.expanduser().absolute()
    entry = mounts.lookup(mnt)
    if not mounts.is_mounted(mnt):
        mounts.forget(mnt)
        raise MountError(f"{mnt} is not mounted")
    argv = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mnt)]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "fusermount3 failed"
        if "busy" in msg.lower():
            raise MountError(f"{mnt} is busy: close the files and shells using it, or use --lazy")
        raise MountError(f"cannot unmount {mnt}: {msg}")
    if entry is not None:
        pid = int(str(entry["pid"]))
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"the daemon (pid {pid}) is still flushing after {timeout:.0f}s")
            time.sleep(0.05)
    mounts.forget(mnt)
    typer.echo(f"unmounted {mnt}")
