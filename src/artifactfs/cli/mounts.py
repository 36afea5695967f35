"""Which daemon serves which mountpoint: a small registry in the user's runtime directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


def _registry() -> Path:
    # XDG_RUNTIME_DIR is unset for root and in CI; fall back to a per-user directory in /tmp.
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "artifactfs" if base else Path(f"/tmp/artifactfs-{os.getuid()}")
    path = root / "mounts"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _entry(mountpoint: Path) -> Path:
    key = hashlib.sha256(str(mountpoint.absolute()).encode()).hexdigest()[:32]
    return _registry() / f"{key}.json"


def record(mountpoint: Path, pid: int, store: Path, log: Path) -> None:
    _entry(mountpoint).write_text(
        json.dumps(
            {"mountpoint": str(mountpoint), "pid": pid, "store": str(store), "log": str(log)}
        )
    )


def lookup(mountpoint: Path) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads(_entry(mountpoint).read_text())
        return data
    except (FileNotFoundError, ValueError):
        return None


def forget(mountpoint: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_entry(mountpoint))


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.absolute())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and parts[1].replace("\\040", " ") == target:
                return True
    return False
