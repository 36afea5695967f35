"""Mounted tests of scripts/passthrough.py, the reference FUSE file system of scripts/bench.py.

Each test mounts the passthrough on a fresh tmp dir; the fixture always unmounts in `finally`
(fusermount3 -u, then waits for the daemon and asserts it exited 0; on any trouble a lazy unmount
and a kill, so no test leaves a mount or a daemon behind).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "passthrough.py"
MOUNT_TIMEOUT = 30.0

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="needs /dev/fuse and fusermount3",
    ),
]


@dataclass
class Mount:
    src: Path
    mnt: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for_mount(m: Mount) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(m.mnt):
        if m.proc.poll() is not None:
            pytest.fail(f"passthrough exited with {m.proc.returncode}:\n{m.log_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"passthrough did not mount within {MOUNT_TIMEOUT} s:\n{m.log_text()}")
        time.sleep(0.05)


@pytest.fixture
def mount(request: pytest.FixtureRequest) -> Iterator[Mount]:
    extra: list[str] = list(getattr(request, "param", []))
    # Not under tmp_path: its 0700 parents would stop the other-uid test at the path walk.
    base = Path(tempfile.mkdtemp(prefix="passthrough-test-"))
    base.chmod(0o755)
    src, mnt = base / "src", base / "mnt"
    src.mkdir()
    mnt.mkdir()
    log = base / "passthrough.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(src), str(mnt), "-o", "allow_other", *extra],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
    m = Mount(src, mnt, proc, log)
    returncode: int | None = None
    text = ""
    try:
        _wait_for_mount(m)
        yield m
    finally:
        try:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30,
                               capture_output=True)
            returncode = proc.wait(timeout=30)
        finally:
            if proc.poll() is None or os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
                proc.kill()
                proc.wait()
            text = m.log_text()
            if not os.path.ismount(mnt):  # never delete through a live mount
                shutil.rmtree(base)
    assert returncode == 0, f"passthrough exited with {returncode}:\n{text}"
    assert "Traceback" not in text, text


@pytest.mark.parametrize("mount", [[], ["--threads"]], ids=["inline", "threads"], indirect=True)
def test_write_read_roundtrip(mount: Mount) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    f = mount.mnt / "big.bin"
    f.write_bytes(data)
    assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (mount.src / "big.bin").read_bytes() == data
    assert f.stat().st_size == len(data)

    with open(f, "r+b") as fh:  # overwrite in the middle, read back a range
        fh.seek(1000)
        fh.write(b"X" * 10)
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(995)
        assert fh.read(20) == data[995:1000] + b"X" * 10 + data[1010:1015]
    with open(f, "ab") as fh:
        fh.write(b"tail")
    assert f.read_bytes()[-4:] == b"tail"
    os.truncate(f, 10)
    assert f.read_bytes() == data[:10]


def test_rename_file_and_directory(mount: Mount) -> None:
    d = mount.mnt / "d" / "sub"
    d.mkdir(parents=True)
    (d / "f").write_text("hello")
    (mount.mnt / "other").write_text("replaced")
    assert (d / "f").stat().st_size == 5  # the kernel now knows d, sub and f

    (mount.mnt / "d").rename(mount.mnt / "e")
    # The daemon must follow the known inodes below the renamed directory.
    assert (mount.mnt / "e" / "sub" / "f").read_text() == "hello"
    (mount.mnt / "e" / "sub" / "f").write_text("changed")
    assert (mount.src / "e" / "sub" / "f").read_text() == "changed"
    assert not (mount.mnt / "d").exists()

    (mount.mnt / "e" / "sub" / "f").rename(mount.mnt / "other")  # replaces a file
    assert (mount.mnt / "other").read_text() == "changed"
    assert sorted(os.listdir(mount.mnt / "e" / "sub")) == []
    with pytest.raises(OSError) as exc:
        (mount.mnt / "e").rmdir()
    assert exc.value.errno == errno.ENOTEMPTY


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_exchange_and_noreplace(mount: Mount) -> None:
    rename_noreplace, rename_exchange = 1, 2
    for name in ("x", "y"):
        (mount.mnt / name).mkdir()
        (mount.mnt / name / "inner").write_text(name)
    assert (mount.mnt / "x" / "inner").read_text() == "x"  # known to the kernel
    assert (mount.mnt / "y" / "inner").read_text() == "y"

    _renameat2(mount.mnt / "x", mount.mnt / "y", rename_exchange)
    assert (mount.mnt / "x" / "inner").read_text() == "y"
    assert (mount.mnt / "y" / "inner").read_text() == "x"
    (mount.mnt / "x" / "inner").write_text("y2")
    assert (mount.src / "x" / "inner").read_text() == "y2"

    with pytest.raises(FileExistsError):
        _renameat2(mount.mnt / "x", mount.mnt / "y", rename_noreplace)
    _renameat2(mount.mnt / "x", mount.mnt / "z", rename_noreplace)
    assert (mount.mnt / "z" / "inner").read_text() == "y2"


def test_listing_matches_backing(mount: Mount) -> None:
    for i in range(10):
        sub = mount.mnt / f"dir{i}"
        sub.mkdir()
        for j in range(50):
            (sub / f"file{j}.txt").write_bytes(b"x" * j)
    names = sorted(os.listdir(mount.mnt))
    assert names == sorted(os.listdir(mount.src)) == [f"dir{i}" for i in range(10)]
    seen = {}
    for entry in os.scandir(mount.mnt / "dir3"):
        seen[entry.name] = entry.stat(follow_symlinks=False).st_size
    assert seen == {f"file{j}.txt": j for j in range(50)}
    walked = sum(len(files) for _, _, files in os.walk(mount.mnt))
    assert walked == 500
    for j in range(0, 50, 2):
        (mount.mnt / "dir3" / f"file{j}.txt").unlink()
    assert len(os.listdir(mount.mnt / "dir3")) == 25
    shutil.rmtree(mount.mnt / "dir4")
    assert not (mount.src / "dir4").exists()


def test_links_symlinks_xattrs(mount: Mount) -> None:
    a = mount.mnt / "a"
    a.write_text("data")
    os.link(a, mount.mnt / "b")
    assert a.stat().st_nlink == 2
    assert a.stat().st_ino == (mount.mnt / "b").stat().st_ino
    os.symlink("a", mount.mnt / "s")
    assert os.readlink(mount.mnt / "s") == "a"
    assert (mount.mnt / "s").read_text() == "data"
    a.unlink()
    assert (mount.mnt / "b").read_text() == "data"
    assert (mount.mnt / "b").stat().st_nlink == 1

    b = mount.mnt / "b"
    os.setxattr(b, "user.k", b"v")
    assert os.getxattr(b, "user.k") == b"v"
    assert "user.k" in os.listxattr(b)
    os.removexattr(b, "user.k")
    with pytest.raises(OSError) as exc:
        os.getxattr(b, "user.k")
    assert exc.value.errno == errno.ENODATA


def test_open_unlinked_file_and_errors(mount: Mount) -> None:
    f = mount.mnt / "tmp"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        f.unlink()
        assert os.pwrite(fd, b"still here", 0) == 10
        assert os.pread(fd, 10, 0) == b"still here"
        assert os.fstat(fd).st_size == 10
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not f.exists()
    with pytest.raises(FileNotFoundError):
        (mount.mnt / "missing").read_bytes()
    (mount.mnt / "dir").mkdir()
    with pytest.raises(FileExistsError):
        (mount.mnt / "dir").mkdir()
    assert (mount.mnt / "dir").is_dir()  # the daemon survived the errors


def test_o_direct_is_served(mount: Mount) -> None:
    buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT callers use
    buf.write(os.urandom(8192))
    fd = os.open(mount.mnt / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        assert os.pwrite(fd, buf, 0) == 8192
        back = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [back], 0) == 8192
        assert back[:] == buf[:]
    finally:
        os.close(fd)
    assert (mount.src / "direct").read_bytes() == buf[:]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv")
def test_other_user_owns_what_it_creates(mount: Mount) -> None:
    shared = mount.mnt / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "sh", "-c", f"echo hi > {shared}/mine && mkdir {shared}/mydir"],
        check=True,
    )
    for name in ("mine", "mydir"):
        st = (mount.src / "shared" / name).stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert (mount.src / "shared" / "mine").stat().st_mode & 0o777 == 0o644
