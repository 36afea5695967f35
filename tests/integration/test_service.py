"""Running artifactfs as the system does: the systemd unit (verified, and its command started
with a notify socket as systemd would), and /etc/fstab mounts through mount.artifactfs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mountutil
import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "artifactfs@.service"
BIN = Path(sys.executable).parent


def _unit_for_test(tmp: Path, env: Path) -> Path:
    text = UNIT.read_text()
    text = text.replace("/usr/local/bin/artifactfs", str(BIN / "artifactfs"))
    text = text.replace("/etc/artifactfs/%i.env", str(env))
    path = tmp / "artifactfs@srv-grid.service"
    path.write_text(text)
    return path


def test_unit_file_is_valid(tmp_path: Path) -> None:
    env = tmp_path / "grid.env"
    env.write_text(f"ARTIFACTFS_STORE={tmp_path / 'store'}\n")
    unit = _unit_for_test(tmp_path, env)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    problems = [ln for ln in (result.stdout + result.stderr).splitlines() if str(unit) in ln]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
    assert "Type=notify" in UNIT.read_text()


def test_unit_command_notifies_and_stops_cleanly(tmp_path: Path, public_dir: Path) -> None:
    """What systemd runs: ExecStart in the foreground with NOTIFY_SOCKET; READY=1 only once
    the grid answers; SIGTERM flushes, unmounts and exits 0."""
    store, mnt = tmp_path / "store", public_dir / "grid"
    mnt.mkdir()
    mountutil.init_store(store)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    proc = subprocess.Popen(
        [str(BIN / "artifactfs"), "mount", str(store), str(mnt), "--foreground"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg
        assert mountutil.is_mounted(mnt)  # ready means mounted
        ws = mountutil.workspace(mnt, "svc", "shared", "ws")
        (ws / "f").write_bytes(b"kept across a service stop")
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert proc.wait(60) == 0
        assert not mountutil.is_mounted(mnt)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mountutil.is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
    with mountutil.mounted(store, mnt, init=False) as m:
        assert (m.mountpoint / "svc/shared/ws/f").read_bytes() == b"kept across a service stop"


@pytest.fixture
def mount_helper() -> Iterator[None]:
    """mount(8) finds helpers in /sbin: link mount.artifactfs there for the test."""
    link = Path("/sbin/mount.artifactfs")
    if os.geteuid() != 0:
        pytest.skip("linking a mount helper into /sbin needs root")
    made = False
    if not link.exists():
        link.symlink_to(BIN / "mount.artifactfs")
        made = True
    try:
        yield
    finally:
        if made:
            link.unlink()


def test_fstab_mount_through_the_helper(
    tmp_path: Path, public_dir: Path, mount_helper: None
) -> None:
    store, mnt = tmp_path / "store", public_dir / "srv-grid"
    mnt.mkdir()
    mountutil.init_store(store)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{store}  {mnt}  artifactfs  defaults,allow_other,nofail  0  0\n")
    # mount(8) runs the helper with the daemon's PATH: make the venv's python findable.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    result = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True,
                            text=True, env=env, timeout=120)
    try:
        assert result.returncode == 0, result.stderr
        assert mountutil.mount_fstype(mnt) == "fuse.artifactfs"
        ws = mountutil.workspace(mnt, "fs", "shared", "ws")
        (ws / "f").write_text("via fstab")
        other = mountutil.run_as(1000, 1000, ["ls", str(mnt / "fs/shared/ws")],
                                 capture_output=True, text=True)
        assert other.returncode == 0 and other.stdout.split() == ["f"]  # allow_other passed on
    finally:
        if mountutil.is_mounted(mnt):
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    assert not mountutil.is_mounted(mnt)
    # The daemon saw the unmount and exited: its registration is gone.
    deadline = time.monotonic() + 30
    while True:
        rows = subprocess.run(
            ["sqlite3", str(store / "index.sqlite3"), "SELECT count(*) FROM mounts"],
            capture_output=True, text=True,
        ).stdout.strip()
        if rows == "0":
            break
        assert time.monotonic() < deadline, "the daemon did not exit after umount"
        time.sleep(0.2)


def test_helper_translates_mount_options() -> None:
    from artifactfs.cli.mount_helper import translate

    assert translate(["/s", "/m", "-o", "rw,defaults,allow_other,x-systemd.automount,"
                      "credential=/etc/a.cred,owner=1000:1000", "-n"]) == [
        "mount", "/s", "/m", "--credential", "/etc/a.cred", "--owner", "1000:1000",
        "-o", "allow_other",
    ]
