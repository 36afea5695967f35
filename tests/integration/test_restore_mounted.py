"""Checkpoint and restore by another process while the namespace is mounted.

The test process opens the store directly (as `artifactfs checkpoint` does) while the daemon
serves it; after a restore returns, what the mount shows must already be the restored state:
the daemon follows the change feed, drops the kernel's cached entries, attributes and pages,
and acknowledges before the restore returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mountutil
import pytest
import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.restore import RestoreResult, restore
from artifactfs.store import Store


def _with_store(store_path: Path, fn_name: str, ns_id: str, name: str) -> object:
    async def run() -> object:
        store = Store(store_path)
        try:
            io = BlockIO(store.backend, store.config.block_size)
            cp = Checkpoints(store.index, io)
            ns = store.index.namespace_by_public_id(ns_id)
            assert ns is not None
            try:
                if fn_name == "create":
                    return await cp.create(ns, name, "test")
                return await restore(cp, ns, cp.get(ns.id, name).root, actor="test", name=name)
            finally:
                cp.close()
        finally:
            store.close()

    return trio.run(run)


def checkpoint(mount: mountutil.Mount, ws: Path, name: str) -> None:
    ns_id = os.getxattr(ws, "user.artifactfs.namespace").decode()
    _with_store(mount.store, "create", ns_id, name)


def restore_outside(mount: mountutil.Mount, ws: Path, name: str) -> RestoreResult:
    ns_id = os.getxattr(ws, "user.artifactfs.namespace").decode()
    result = _with_store(mount.store, "restore", ns_id, name)
    assert isinstance(result, RestoreResult)
    return result


def tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    out: dict[str, tuple[int, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            content = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return out


@pytest.fixture
def ws(mnt: mountutil.Mount) -> Path:
    path: Path = mountutil.workspace(mnt.mountpoint, "t", "shared", "ws")
    return path


def test_restore_shows_at_once_through_the_mount(mnt: mountutil.Mount, ws: Path) -> None:
    (ws / "src").mkdir()
    (ws / "src" / "main.py").write_text("print('v1')\n")
    (ws / "notes.txt").write_text("keep me\n")
    (ws / "gone").mkdir()
    (ws / "gone" / "inner").write_text("inner\n")
    os.symlink("src/main.py", ws / "link")
    before = tree(ws)
    checkpoint(mnt, ws, "base")
    # Change everything, and read it back so the kernel caches the new state.
    (ws / "src" / "main.py").write_text("print('v2, longer than before')\n")
    (ws / "notes.txt").unlink()
    subprocess.run(["rm", "-rf", str(ws / "gone")], check=True)
    (ws / "added").mkdir()
    (ws / "added" / "x").write_text("x")
    (ws / "src").chmod(0o700)
    assert (ws / "src" / "main.py").read_text().startswith("print('v2")
    assert tree(ws) != before
    result = restore_outside(mnt, ws, "base")
    assert result.mounts_acked
    # No sleep: the restore waited until the mount applied it.
    assert (ws / "src" / "main.py").read_text() == "print('v1')\n"
    assert tree(ws) == before
    assert not (ws / "added").exists()
    assert os.stat(ws / "src").st_mode & 0o777 == 0o755


def test_open_file_and_working_directory_survive_restore(
    mnt: mountutil.Mount, ws: Path
) -> None:
    (ws / "f").write_bytes(b"A" * 300_000)
    checkpoint(mnt, ws, "base")
    (ws / "f").write_bytes(b"B" * 200_000)
    (ws / "later").write_text("later")
    # A process working inside the namespace, and a reader holding the new file open.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; os.chdir(sys.argv[1]); sys.stdin.readline(); "
            "print(sorted(os.listdir('.'))); print(os.path.exists('later'))",
            str(ws),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with open(ws / "f", "rb") as held:
            first = held.read(1000)
            restore_outside(mnt, ws, "base")
            rest = held.read()
        out, _ = child.communicate("go\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The open file shows one state whole: the one it was opened on.
    assert first + rest == b"B" * 200_000
    assert (ws / "f").read_bytes() == b"A" * 300_000
    assert out.splitlines() == ["['f']", "False"]


def test_checkpoint_while_writing_sees_completed_writes(mnt: mountutil.Mount, ws: Path) -> None:
    (ws / "done").write_bytes(b"closed content")
    with open(ws / "busy", "wb") as f:
        f.write(b"first part")
        f.flush()
        os.fsync(f.fileno())
        f.write(b" unfinished")  # not yet fsynced or closed
        f.flush()
        checkpoint(mnt, ws, "mid")
    (ws / "done").write_bytes(b"changed later")
    restore_outside(mnt, ws, "mid")
    assert (ws / "done").read_bytes() == b"closed content"
    assert (ws / "busy").read_bytes() == b"first part"
