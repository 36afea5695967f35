"""The command line: init, mount and umount, and a one-line error for every bad situation."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

AFS = str(Path(sys.executable).parent / "artifactfs")


def run(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([AFS, *args], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("artifactfs: error:")]
    assert len(errs) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return errs[0]


@pytest.mark.parametrize("cmd", [[], ["init"], ["mount"], ["umount"]])
def test_help_on_every_command(cmd: list[str]) -> None:
    res = run(*cmd, "--help", check=True)
    assert "Usage" in res.stdout


def test_init_creates_private_store_and_is_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = run("init", str(store), check=True)
    assert "created store" in first.stdout
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert (store / "index.sqlite3").is_file()
    assert (store / "store.json").is_file()
    again = run("init", str(store), check=True)
    assert "already exists" in again.stdout


def test_init_refuses_non_empty_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("x")
    msg = one_line_error(run("init", str(tmp_path)))
    assert "not an artifactfs store" in msg


def test_mount_missing_store(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    msg = one_line_error(run("mount", str(tmp_path / "nostore"), str(tmp_path / "mnt")))
    assert "no artifactfs store" in msg and "artifactfs init" in msg


def test_mount_non_empty_mountpoint(tmp_path: Path) -> None:
    run("init", str(tmp_path / "store"), check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "file").write_text("x")
    msg = one_line_error(run("mount", str(tmp_path / "store"), str(mnt)))
    assert "not empty" in msg


@pytest.mark.parametrize("interval", ["0", "-1", "7200"])
def test_mount_commit_interval_out_of_range(tmp_path: Path, interval: str) -> None:
    run("init", str(tmp_path / "store"), check=True)
    (tmp_path / "mnt").mkdir()
    msg = one_line_error(run("mount", str(tmp_path / "store"), str(tmp_path / "mnt"),
                             "--commit-interval", interval))
    assert "--commit-interval takes 0 < SECONDS <= 3600" in msg


def test_mount_missing_mountpoint(tmp_path: Path) -> None:
    run("init", str(tmp_path / "store"), check=True)
    msg = one_line_error(run("mount", str(tmp_path / "store"), str(tmp_path / "nope")))
    assert "does not exist" in msg


def test_mount_store_of_newer_schema(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run("init", str(store), check=True)
    conn = sqlite3.connect(store / "index.sqlite3")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    (tmp_path / "mnt").mkdir()
    msg = one_line_error(run("mount", str(store), str(tmp_path / "mnt")))
    assert "newer" in msg or "upgrade" in msg


def test_mount_store_readable_by_others(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run("init", str(store), check=True)
    os.chmod(store, 0o755)
    (tmp_path / "mnt").mkdir()
    msg = one_line_error(run("mount", str(store), str(tmp_path / "mnt")))
    assert "chmod 700" in msg


def test_background_mount_then_already_mounted_then_umount(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run("init", str(store), check=True)
    res = run("mount", str(store), str(mnt), check=True)
    try:
        assert "mounted" in res.stdout
        assert os.path.ismount(mnt)
        (mnt / "acme").mkdir()
        assert os.listdir(mnt) == ["acme"]
        msg = one_line_error(run("mount", str(store), str(mnt)))
        assert "already a mount point" in msg
    finally:
        out = run("umount", str(mnt))
        if out.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert out.returncode == 0, out.stderr
    assert not os.path.ismount(mnt)
    # The daemon is gone: nothing still serves this store.
    ps = subprocess.run(["pgrep", "-f", f"artifactfs.cli.main mount {store}"],
                        capture_output=True, text=True)
    assert ps.stdout.strip() == ""
    msg = one_line_error(run("umount", str(mnt)))
    assert "not mounted" in msg


def test_umount_busy_mount_says_so(tmp_path: Path) -> None:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    run("init", str(store), check=True)
    run("mount", str(store), str(mnt), check=True)
    holder = None
    try:
        (mnt / "acme").mkdir()
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "acme")
        msg = one_line_error(run("umount", str(mnt)))
        assert "busy" in msg
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        out = run("umount", str(mnt))
        if out.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    assert out.returncode == 0, out.stderr
