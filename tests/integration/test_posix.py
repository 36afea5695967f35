"""POSIX semantics inside a workspace, as root: each test must also pass on a local ext4/tmpfs
directory (ARTIFACTFS_TEST_TARGET=plain), which is what proves the test itself is right."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import random
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276}


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) through libc (glibc >= 2.28), or the raw syscall where libc lacks it."""
    oldb, newb = os.fsencode(old), os.fsencode(new)
    if hasattr(_libc, "renameat2"):
        rc = _libc.renameat2(AT_FDCWD, oldb, AT_FDCWD, newb, ctypes.c_uint(flags))
    else:
        rc = _libc.syscall(
            ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]),
            AT_FDCWD,
            oldb,
            AT_FDCWD,
            newb,
            ctypes.c_uint(flags),
        )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


def c_getxattr(path: Path, name: str, size: int) -> int:
    """getxattr(2) with a caller-sized buffer; returns the length or raises OSError."""
    buf = ctypes.create_string_buffer(max(size, 1))
    rc = _libc.getxattr(
        os.fsencode(path), name.encode(), buf if size else None, ctypes.c_size_t(size)
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return rc


def c_listxattr(path: Path, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    rc = _libc.listxattr(os.fsencode(path), buf if size else None, ctypes.c_size_t(size))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return rc


_libc.getxattr.restype = ctypes.c_ssize_t
_libc.listxattr.restype = ctypes.c_ssize_t


def tick() -> None:
    """Let the clock move past the filesystem's timestamp granularity (coarse clock ticks)."""
    time.sleep(0.02)


# --- directories and names -----------------------------------------------------------------------


def test_nested_directories(ws: Path) -> None:
    deep = ws.joinpath(*[f"level{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_bytes(b"leaf")
    assert (deep / "leaf.txt").read_bytes() == b"leaf"
    walked = [Path(d).relative_to(ws) for d, _, _ in os.walk(ws)]
    assert len(walked) == 13
    assert os.listdir(ws / "level0") == ["level1"]


def test_directory_lists_every_entry(ws: Path) -> None:
    names = {f"file-{i:04d}-{'x' * (i % 200)}" for i in range(700)}
    for name in names:
        (ws / name).write_bytes(b"")
    assert set(os.listdir(ws)) == names
    assert {e.name for e in os.scandir(ws)} == names
    assert all(e.is_file() for e in os.scandir(ws))


def test_ls_a_shows_dot_entries_and_every_name_once_across_pages(ws: Path) -> None:
    """More entries than one readdir reply holds: the listing resumes at the right offset,
    and `.`/`..` come first, as on a local filesystem."""
    names = {f"n{i:04d}" for i in range(700)}
    for name in names:
        (ws / name).touch()
    out = subprocess.run(["ls", "-a", "-1", "-f", str(ws)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == [".", ".."]
    assert sorted(out[2:]) == sorted(names)
    dot = os.stat(ws / ".")
    assert (dot.st_ino, dot.st_dev) == (os.stat(ws).st_ino, os.stat(ws).st_dev)
    assert os.stat(ws / "..").st_ino == os.stat(ws.parent).st_ino


def test_name_of_255_bytes_is_accepted(ws: Path) -> None:
    name = "é" * 127 + "f"
    (ws / name).write_bytes(b"x")
    (ws / ("d" * 255)).mkdir()
    assert sorted(os.listdir(ws)) == sorted([name, "d" * 255])


def test_name_of_256_bytes_is_enametoolong(ws: Path) -> None:
    assert errno_of(os.open, ws / ("f" * 256), os.O_CREAT | os.O_WRONLY, 0o644) == (
        errno.ENAMETOOLONG
    )
    assert errno_of(os.mkdir, ws / ("d" * 256)) == errno.ENAMETOOLONG
    assert os.listdir(ws) == []


def test_mkdir_of_existing_name_is_eexist(ws: Path) -> None:
    (ws / "d").mkdir()
    (ws / "f").write_bytes(b"")
    assert errno_of(os.mkdir, ws / "d") == errno.EEXIST
    assert errno_of(os.mkdir, ws / "f") == errno.EEXIST


def test_rmdir_of_non_empty_directory_is_enotempty(ws: Path) -> None:
    (ws / "d").mkdir()
    (ws / "d" / "f").write_bytes(b"")
    assert errno_of(os.rmdir, ws / "d") == errno.ENOTEMPTY


def test_open_directory_for_writing_is_eisdir(ws: Path) -> None:
    (ws / "d").mkdir()
    assert errno_of(os.open, ws / "d", os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, ws / "d", os.O_RDWR) == errno.EISDIR


def test_unlink_of_directory_is_eisdir(ws: Path) -> None:
    (ws / "d").mkdir()
    assert errno_of(os.unlink, ws / "d") == errno.EISDIR


@pytest.mark.parametrize(
    "op",
    [
        lambda p: os.open(p / "x", os.O_RDONLY),
        lambda p: os.open(p / "x", os.O_CREAT | os.O_WRONLY, 0o644),
        lambda p: os.mkdir(p / "x"),
        lambda p: os.stat(p / "x"),
        lambda p: os.rmdir(p),
        lambda p: os.listdir(p),
    ],
    ids=["open", "create", "mkdir", "stat", "rmdir", "listdir"],
)
def test_file_used_as_directory_is_enotdir(ws: Path, op) -> None:
    (ws / "f").write_bytes(b"")
    assert errno_of(op, ws / "f") == errno.ENOTDIR


def test_missing_name_is_enoent(ws: Path) -> None:
    assert errno_of(os.stat, ws / "missing") == errno.ENOENT
    assert errno_of(os.open, ws / "missing", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.unlink, ws / "missing") == errno.ENOENT
    assert errno_of(os.open, ws / "nodir" / "f", os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENOENT


# --- rename --------------------------------------------------------------------------------------


def test_rename_over_existing_file_replaces_it(ws: Path) -> None:
    (ws / "a").write_bytes(b"new content")
    (ws / "b").write_bytes(b"old")
    ino = os.stat(ws / "a").st_ino
    os.rename(ws / "a", ws / "b")
    assert os.listdir(ws) == ["b"]
    assert (ws / "b").read_bytes() == b"new content"
    assert os.stat(ws / "b").st_ino == ino


def test_rename_over_open_file_keeps_its_old_content_readable(ws: Path) -> None:
    (ws / "a").write_bytes(b"new")
    (ws / "b").write_bytes(b"old content")
    with open(ws / "b", "rb") as old:
        os.rename(ws / "a", ws / "b")
        assert old.read() == b"old content"
    assert (ws / "b").read_bytes() == b"new"


def test_rename_over_hard_link_decrements_link_count(ws: Path) -> None:
    (ws / "target").write_bytes(b"t")
    os.link(ws / "target", ws / "alias")
    (ws / "src").write_bytes(b"s")
    os.rename(ws / "src", ws / "alias")
    assert os.stat(ws / "target").st_nlink == 1
    assert (ws / "target").read_bytes() == b"t"
    assert (ws / "alias").read_bytes() == b"s"


def test_rename_directory_over_empty_directory(ws: Path) -> None:
    (ws / "a").mkdir()
    (ws / "a" / "f").write_bytes(b"f")
    (ws / "b").mkdir()
    os.rename(ws / "a", ws / "b")
    assert os.listdir(ws) == ["b"]
    assert (ws / "b" / "f").read_bytes() == b"f"


def test_rename_directory_over_non_empty_directory_is_enotempty(ws: Path) -> None:
    (ws / "a").mkdir()
    (ws / "b").mkdir()
    (ws / "b" / "f").write_bytes(b"")
    assert errno_of(os.rename, ws / "a", ws / "b") == errno.ENOTEMPTY
    assert sorted(os.listdir(ws)) == ["a", "b"]


def test_rename_file_over_directory_is_eisdir(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    (ws / "d").mkdir()
    assert errno_of(os.rename, ws / "f", ws / "d") == errno.EISDIR


def test_rename_directory_over_file_is_enotdir(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    (ws / "d").mkdir()
    assert errno_of(os.rename, ws / "d", ws / "f") == errno.ENOTDIR


def test_rename_directory_into_itself_is_einval(ws: Path) -> None:
    (ws / "d" / "sub").mkdir(parents=True)
    assert errno_of(os.rename, ws / "d", ws / "d" / "sub" / "d") == errno.EINVAL


def test_rename_moves_subtree_between_directories(ws: Path) -> None:
    (ws / "a" / "tree" / "deep").mkdir(parents=True)
    (ws / "a" / "tree" / "deep" / "f").write_bytes(b"deep")
    (ws / "b").mkdir()
    os.rename(ws / "a" / "tree", ws / "b" / "tree2")
    assert os.listdir(ws / "a") == []
    assert (ws / "b" / "tree2" / "deep" / "f").read_bytes() == b"deep"


def test_rename_noreplace_onto_existing_is_eexist(ws: Path) -> None:
    (ws / "a").write_bytes(b"a")
    (ws / "b").write_bytes(b"b")
    assert errno_of(renameat2, ws / "a", ws / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert (ws / "a").read_bytes() == b"a"
    assert (ws / "b").read_bytes() == b"b"


def test_rename_noreplace_onto_free_name_renames(ws: Path) -> None:
    (ws / "a").write_bytes(b"a")
    renameat2(ws / "a", ws / "c", RENAME_NOREPLACE)
    assert os.listdir(ws) == ["c"]
    assert (ws / "c").read_bytes() == b"a"


def test_rename_exchange_swaps_two_files(ws: Path) -> None:
    (ws / "a").write_bytes(b"content of a")
    (ws / "b").write_bytes(b"b")
    ino_a, ino_b = os.stat(ws / "a").st_ino, os.stat(ws / "b").st_ino
    renameat2(ws / "a", ws / "b", RENAME_EXCHANGE)
    assert (ws / "a").read_bytes() == b"b"
    assert (ws / "b").read_bytes() == b"content of a"
    assert (os.stat(ws / "a").st_ino, os.stat(ws / "b").st_ino) == (ino_b, ino_a)


def test_rename_exchange_swaps_file_and_directory(ws: Path) -> None:
    (ws / "f").write_bytes(b"file")
    (ws / "d").mkdir()
    (ws / "d" / "inner").write_bytes(b"inner")
    renameat2(ws / "f", ws / "d", RENAME_EXCHANGE)
    assert (ws / "d").read_bytes() == b"file"
    assert (ws / "f" / "inner").read_bytes() == b"inner"


def test_rename_exchange_with_missing_target_is_enoent(ws: Path) -> None:
    (ws / "a").write_bytes(b"a")
    assert errno_of(renameat2, ws / "a", ws / "missing", RENAME_EXCHANGE) == errno.ENOENT
    assert os.listdir(ws) == ["a"]


# --- links ---------------------------------------------------------------------------------------


def test_hard_link_shares_inode_and_counts_links(ws: Path) -> None:
    (ws / "a").write_bytes(b"shared")
    os.link(ws / "a", ws / "b")
    (ws / "sub").mkdir()
    os.link(ws / "a", ws / "sub" / "c")
    sa, sb = os.stat(ws / "a"), os.stat(ws / "b")
    assert sa.st_ino == sb.st_ino == os.stat(ws / "sub" / "c").st_ino
    assert sa.st_nlink == sb.st_nlink == 3
    with open(ws / "b", "r+b") as f:
        f.write(b"SH")
    assert (ws / "sub" / "c").read_bytes() == b"SHared"


def test_unlink_of_one_hard_link_keeps_the_other(ws: Path) -> None:
    (ws / "a").write_bytes(b"data")
    os.link(ws / "a", ws / "b")
    os.unlink(ws / "a")
    assert os.stat(ws / "b").st_nlink == 1
    assert (ws / "b").read_bytes() == b"data"


def test_hard_link_onto_existing_name_is_eexist(ws: Path) -> None:
    (ws / "a").write_bytes(b"")
    (ws / "b").write_bytes(b"")
    assert errno_of(os.link, ws / "a", ws / "b") == errno.EEXIST


def test_hard_link_to_directory_is_eperm(ws: Path) -> None:
    (ws / "d").mkdir()
    assert errno_of(os.link, ws / "d", ws / "d2") == errno.EPERM


def test_symlink_readlink_and_lstat(ws: Path) -> None:
    (ws / "dir").mkdir()
    (ws / "dir" / "target").write_bytes(b"via link")
    target = "dir/target"
    os.symlink(target, ws / "link")
    st = os.lstat(ws / "link")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len(target)
    assert os.readlink(ws / "link") == target
    assert (ws / "link").read_bytes() == b"via link"
    assert os.stat(ws / "link").st_ino == os.stat(ws / "dir" / "target").st_ino


def test_symlink_to_directory_is_traversed(ws: Path) -> None:
    (ws / "real" / "sub").mkdir(parents=True)
    (ws / "real" / "sub" / "f").write_bytes(b"f")
    os.symlink("real", ws / "alias")
    assert (ws / "alias" / "sub" / "f").read_bytes() == b"f"
    assert os.listdir(ws / "alias") == ["sub"]


def test_dangling_symlink(ws: Path) -> None:
    os.symlink("/nonexistent/target/of/a/link", ws / "dangling")
    assert os.readlink(ws / "dangling") == "/nonexistent/target/of/a/link"
    assert errno_of(os.stat, ws / "dangling") == errno.ENOENT
    assert os.listdir(ws) == ["dangling"]


def test_long_symlink_target(ws: Path) -> None:
    target = "/".join(["component" + str(i) for i in range(300)])[:4000]
    os.symlink(target, ws / "long")
    assert os.readlink(ws / "long") == target


# --- modes, owners and times ---------------------------------------------------------------------


def test_chmod_sets_mode_bits(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    for mode in (0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000):
        os.chmod(ws / "f", mode)
        assert stat.S_IMODE(os.stat(ws / "f").st_mode) == mode
    (ws / "d").mkdir()
    os.chmod(ws / "d", 0o3710)
    assert stat.S_IMODE(os.stat(ws / "d").st_mode) == 0o3710


def test_create_honours_mode_and_umask(ws: Path) -> None:
    old = os.umask(0o027)
    try:
        fd = os.open(ws / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(ws / "d", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(ws / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(ws / "d").st_mode) == 0o750


def test_chown_sets_owner_and_group(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.chown(ws / "f", 1234, 5678)
    st = os.stat(ws / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(ws / "f", -1, 42)
    st = os.stat(ws / "f")
    assert (st.st_uid, st.st_gid) == (1234, 42)


def test_lchown_changes_the_link_not_the_target(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.symlink("f", ws / "l")
    os.chown(ws / "l", 1000, 1000, follow_symlinks=False)
    assert (os.lstat(ws / "l").st_uid, os.lstat(ws / "l").st_gid) == (1000, 1000)
    assert (os.stat(ws / "f").st_uid, os.stat(ws / "f").st_gid) == (0, 0)


def test_utime_with_nanoseconds(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    atime, mtime = 1_600_000_000_123_456_789, 1_700_000_000_987_654_321
    os.utime(ws / "f", ns=(atime, mtime))
    st = os.stat(ws / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)


def test_utime_on_directory_and_symlink(ws: Path) -> None:
    (ws / "d").mkdir()
    os.symlink("d", ws / "l")
    os.utime(ws / "d", ns=(1_000_000_001, 2_000_000_002))
    os.utime(ws / "l", ns=(3_000_000_003, 4_000_000_004), follow_symlinks=False)
    assert os.stat(ws / "d").st_mtime_ns == 2_000_000_002
    assert os.lstat(ws / "l").st_mtime_ns == 4_000_000_004
    assert os.lstat(ws / "l").st_atime_ns == 3_000_000_003


def test_utime_omit_keeps_the_other_time(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.utime(ws / "f", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_002))
    # touch -m sets only mtime: atime is passed as UTIME_OMIT.
    subprocess.run(["touch", "-m", "-d", "@1234567890.123456789", str(ws / "f")], check=True)
    st = os.stat(ws / "f")
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    assert st.st_atime_ns == 1_500_000_000_000_000_001


def test_utime_now_uses_current_time(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.utime(ws / "f", ns=(0, 0))
    before = time.time_ns()
    os.utime(ws / "f")
    st = os.stat(ws / "f")
    assert abs(st.st_mtime_ns - before) < 5 * 10**9


def test_mtime_nanoseconds_survive_reopen_and_close(ws: Path) -> None:
    (ws / "f").write_bytes(b"payload")
    mtime = 1_650_000_000_000_000_777
    os.utime(ws / "f", ns=(mtime, mtime))
    with open(ws / "f", "rb") as f:
        f.read()
    fd = os.open(ws / "f", os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    assert os.stat(ws / "f").st_mtime_ns == mtime


def test_mtime_set_on_open_fd_survives_close(ws: Path) -> None:
    # cp -a and tar write, then set times on the still-open descriptor, then close.
    fd = os.open(ws / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, os.urandom(300_000))
    mtime = 1_111_111_111_222_222_222
    os.utime(fd, ns=(mtime, mtime))
    os.close(fd)
    assert os.stat(ws / "f").st_mtime_ns == mtime


def test_write_moves_mtime_and_ctime(ws: Path) -> None:
    (ws / "f").write_bytes(b"x")
    os.utime(ws / "f", ns=(10**18, 10**18))
    before = os.stat(ws / "f")
    tick()
    with open(ws / "f", "ab") as f:
        f.write(b"y")
    after = os.stat(ws / "f")
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_read_does_not_move_mtime(ws: Path) -> None:
    (ws / "f").write_bytes(b"x" * 10_000)
    before = os.stat(ws / "f").st_mtime_ns
    tick()
    (ws / "f").read_bytes()
    assert os.stat(ws / "f").st_mtime_ns == before


def _no_setup(p: Path) -> None:
    pass


# name -> (setup, operation, the file whose ctime is checked)
CTIME_OPS = {
    "chmod": (_no_setup, lambda p: os.chmod(p / "f", 0o600), "f"),
    "chown": (_no_setup, lambda p: os.chown(p / "f", 1000, 1000), "f"),
    "link": (_no_setup, lambda p: os.link(p / "f", p / "f2"), "f"),
    "unlink-of-a-link": (lambda p: os.link(p / "f", p / "f2"), lambda p: os.unlink(p / "f2"), "f"),
    "rename": (_no_setup, lambda p: os.rename(p / "f", p / "g"), "g"),
    "truncate": (_no_setup, lambda p: os.truncate(p / "f", 1), "f"),
    "utime": (_no_setup, lambda p: os.utime(p / "f", ns=(5, 5)), "f"),
    "setxattr": (_no_setup, lambda p: os.setxattr(p / "f", "user.k", b"v"), "f"),
    "write": (_no_setup, lambda p: (p / "f").write_bytes(b"changed"), "f"),
}


@pytest.mark.parametrize("op", sorted(CTIME_OPS))
def test_ctime_moves_on_change(ws: Path, op: str) -> None:
    setup, operation, checked = CTIME_OPS[op]
    (ws / "f").write_bytes(b"content")
    setup(ws)
    before = os.stat(ws / "f").st_ctime_ns
    tick()
    operation(ws)
    assert os.stat(ws / checked).st_ctime_ns > before


DIR_OPS = {
    "create": lambda p: (p / "new").write_bytes(b""),
    "mkdir": lambda p: os.mkdir(p / "newdir"),
    "unlink": lambda p: os.unlink(p / "old"),
    "rename-in": lambda p: os.rename(p.parent / "outside", p / "moved"),
    "rename-out": lambda p: os.rename(p / "old", p.parent / "moved"),
    "symlink": lambda p: os.symlink("old", p / "lnk"),
}


@pytest.mark.parametrize("op", sorted(DIR_OPS))
def test_directory_mtime_moves_on_entry_change(ws: Path, op: str) -> None:
    (ws / "dir").mkdir()
    (ws / "dir" / "old").write_bytes(b"")
    (ws / "outside").write_bytes(b"")
    os.utime(ws / "dir", ns=(10**18, 10**18))
    before = os.stat(ws / "dir")
    tick()
    DIR_OPS[op](ws / "dir")
    after = os.stat(ws / "dir")
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


# --- file contents -------------------------------------------------------------------------------


def test_large_file_round_trip(ws: Path) -> None:
    data = random.Random(7).randbytes(9 * MiB + 333)
    with open(ws / "big", "wb") as f:
        for i in range(0, len(data), 777_777):
            f.write(data[i : i + 777_777])
    assert os.stat(ws / "big").st_size == len(data)
    assert (ws / "big").read_bytes() == data


def test_unaligned_overwrites_across_block_boundaries(ws: Path) -> None:
    rng = random.Random(8)
    model = bytearray(rng.randbytes(5 * MiB))
    (ws / "f").write_bytes(model)
    fd = os.open(ws / "f", os.O_RDWR)
    try:
        for boundary in (4096, 65536, 131072, MiB, 2 * MiB, 4 * MiB):
            for delta in (-3, -1, 0, 1):
                off = boundary + delta
                chunk = rng.randbytes(rng.choice((1, 2, 7, 4096, 5000)))
                os.pwrite(fd, chunk, off)
                model[off : off + len(chunk)] = chunk
        # Extend past the end with an overlapping write.
        tail = rng.randbytes(10_000)
        os.pwrite(fd, tail, len(model) - 5000)
        model[len(model) - 5000 :] = tail
        for off in (0, 4095, MiB - 2, 4 * MiB - 3):
            assert os.pread(fd, 9000, off) == bytes(model[off : off + 9000])
    finally:
        os.close(fd)
    assert (ws / "f").read_bytes() == bytes(model)


def test_truncate_down_then_up_reads_zeros(ws: Path) -> None:
    data = random.Random(9).randbytes(3 * MiB)
    (ws / "f").write_bytes(data)
    os.truncate(ws / "f", MiB + 7)
    assert os.stat(ws / "f").st_size == MiB + 7
    assert (ws / "f").read_bytes() == data[: MiB + 7]
    os.truncate(ws / "f", 3 * MiB)
    content = (ws / "f").read_bytes()
    assert content[: MiB + 7] == data[: MiB + 7]
    assert content[MiB + 7 :] == bytes(3 * MiB - MiB - 7)


def test_ftruncate_on_open_descriptor(ws: Path) -> None:
    fd = os.open(ws / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"abcdefghij")
        os.ftruncate(fd, 4)
        assert os.fstat(fd).st_size == 4
        os.ftruncate(fd, 8)
        assert os.pread(fd, 100, 0) == b"abcd\0\0\0\0"
        os.write(fd, b"Z")  # the file offset is still 10: a hole up to it
        assert os.pread(fd, 100, 0) == b"abcd\0\0\0\0\0\0Z"
    finally:
        os.close(fd)


def test_truncate_to_zero(ws: Path) -> None:
    (ws / "f").write_bytes(b"x" * 100_000)
    os.truncate(ws / "f", 0)
    assert os.stat(ws / "f").st_size == 0
    assert (ws / "f").read_bytes() == b""


def test_o_append_writes_at_the_end(ws: Path) -> None:
    (ws / "f").write_bytes(b"start-")
    fd1 = os.open(ws / "f", os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(ws / "f", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd1, b"one-")
        os.write(fd2, b"two-")
        os.lseek(fd1, 0, os.SEEK_SET)
        os.write(fd1, b"three")
    finally:
        os.close(fd1)
        os.close(fd2)
    assert (ws / "f").read_bytes() == b"start-one-two-three"


def test_o_trunc_empties_the_file(ws: Path) -> None:
    (ws / "f").write_bytes(b"x" * 50_000)
    fd = os.open(ws / "f", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert (ws / "f").read_bytes() == b"new"


def test_o_excl_on_existing_file_is_eexist(ws: Path) -> None:
    (ws / "f").write_bytes(b"keep")
    assert errno_of(os.open, ws / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644) == (
        errno.EEXIST
    )
    assert (ws / "f").read_bytes() == b"keep"


def test_o_excl_on_dangling_symlink_is_eexist(ws: Path) -> None:
    os.symlink("missing", ws / "l")
    assert errno_of(os.open, ws / "l", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644) == (
        errno.EEXIST
    )
    assert not (ws / "missing").exists()


def test_o_excl_creates_a_new_file(ws: Path) -> None:
    fd = os.open(ws / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"fresh")
    os.close(fd)
    assert (ws / "f").read_bytes() == b"fresh"


def test_sparse_file_reads_zeros_and_takes_less_space(ws: Path) -> None:
    hole = 256 * MiB
    with open(ws / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(hole)
        f.write(b"tail")
    size = hole + 4
    st = os.stat(ws / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < size // 4
    du = subprocess.run(
        ["du", "-B1", str(ws / "sparse")], check=True, capture_output=True, text=True
    ).stdout
    assert int(du.split()[0]) < size // 4
    with open(ws / "sparse", "rb") as f:
        assert f.read(MiB) == b"head" + bytes(MiB - 4)
        f.seek(hole // 2)
        assert f.read(MiB) == bytes(MiB)
        f.seek(hole - MiB)
        assert f.read() == bytes(MiB) + b"tail"


def test_hole_between_writes_reads_zeros(ws: Path) -> None:
    fd = os.open(ws / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * 1000, 0)
        os.pwrite(fd, b"b" * 1000, 10 * MiB + 123)
        assert os.pread(fd, 10 * MiB + 123 - 1000, 1000) == bytes(10 * MiB + 123 - 1000)
    finally:
        os.close(fd)
    data = (ws / "f").read_bytes()
    assert data == b"a" * 1000 + bytes(10 * MiB + 123 - 1000) + b"b" * 1000


def test_mmap_shared_write_is_read_through_fresh_descriptor(ws: Path) -> None:
    (ws / "f").write_bytes(bytes(3 * 4096 + 100))
    with open(ws / "f", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[0:5] = b"hello"
        m[4096 * 2 + 10 : 4096 * 2 + 15] = b"world"
        m[-3:] = b"end"
        with open(ws / "f", "rb") as g:
            data = g.read()
    assert data[0:5] == b"hello"
    assert data[4096 * 2 + 10 : 4096 * 2 + 15] == b"world"
    assert data[-3:] == b"end"
    assert (ws / "f").read_bytes() == data


def test_mmap_sees_data_written_with_write(ws: Path) -> None:
    data = random.Random(10).randbytes(200_000)
    (ws / "f").write_bytes(data)
    with open(ws / "f", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == data


def test_open_unlinked_file_stays_usable_until_close(ws: Path) -> None:
    fd = os.open(ws / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"before unlink;")
        os.unlink(ws / "f")
        assert os.listdir(ws) == []
        assert errno_of(os.stat, ws / "f") == errno.ENOENT
        assert os.fstat(fd).st_nlink == 0
        os.write(fd, b"after unlink")
        big = os.urandom(2 * MiB)
        os.pwrite(fd, big, 100)
        assert os.pread(fd, 100, 0) == b"before unlink;after unlink"[:26] + bytes(74)
        assert os.pread(fd, 2 * MiB, 100) == big
        os.ftruncate(fd, 50)
        assert os.fstat(fd).st_size == 50
    finally:
        os.close(fd)
    (ws / "f").write_bytes(b"a new file")
    assert (ws / "f").read_bytes() == b"a new file"


def test_fsync_and_fdatasync_of_files_and_directories(ws: Path) -> None:
    (ws / "d").mkdir()
    fd = os.open(ws / "d" / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 10_000)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(ws / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (ws / "d" / "f").read_bytes() == b"x" * 10_000


# --- extended attributes -------------------------------------------------------------------------


def test_user_xattr_set_get_list_remove(ws: Path) -> None:
    f = ws / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.colour", b"blue")
    os.setxattr(f, "user.binary", b"\0\xff\0 bytes")
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.colour") == b"blue"
    assert os.getxattr(f, "user.binary") == b"\0\xff\0 bytes"
    assert os.getxattr(f, "user.empty") == b""
    assert {"user.colour", "user.binary", "user.empty"} <= set(os.listxattr(f))
    os.setxattr(f, "user.colour", b"green")
    assert os.getxattr(f, "user.colour") == b"green"
    os.removexattr(f, "user.colour")
    assert "user.colour" not in os.listxattr(f)
    assert errno_of(os.getxattr, f, "user.colour") == errno.ENODATA


def test_user_xattr_on_directory(ws: Path) -> None:
    (ws / "d").mkdir()
    os.setxattr(ws / "d", "user.k", b"dir value")
    assert os.getxattr(ws / "d", "user.k") == b"dir value"


def test_user_xattr_of_3000_bytes(ws: Path) -> None:
    value = os.urandom(3000)
    (ws / "f").write_bytes(b"")
    os.setxattr(ws / "f", "user.big", value)
    assert os.getxattr(ws / "f", "user.big") == value


def test_xattr_create_flag_on_existing_is_eexist(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.setxattr(ws / "f", "user.k", b"1")
    assert errno_of(os.setxattr, ws / "f", "user.k", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert os.getxattr(ws / "f", "user.k") == b"1"


def test_xattr_replace_flag_on_missing_is_enodata(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    assert errno_of(os.setxattr, ws / "f", "user.k", b"2", os.XATTR_REPLACE) == errno.ENODATA


def test_missing_xattr_is_enodata(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    assert errno_of(os.getxattr, ws / "f", "user.missing") == errno.ENODATA
    assert errno_of(os.removexattr, ws / "f", "user.missing") == errno.ENODATA


def test_xattr_value_over_64k_is_e2big(ws: Path) -> None:
    # The kernel's generic limit (XATTR_SIZE_MAX = 65536) rejects this before any filesystem.
    (ws / "f").write_bytes(b"")
    assert errno_of(os.setxattr, ws / "f", "user.huge", b"x" * 65537) == errno.E2BIG
    assert "user.huge" not in os.listxattr(ws / "f")


def test_xattr_name_over_255_bytes_is_erange(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    assert errno_of(os.setxattr, ws / "f", "user." + "n" * 300, b"v") == errno.ERANGE


def test_getxattr_with_too_small_buffer_is_erange(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.setxattr(ws / "f", "user.k", b"v" * 100)
    assert c_getxattr(ws / "f", "user.k", 0) == 100  # size query
    assert c_getxattr(ws / "f", "user.k", 100) == 100
    assert errno_of(c_getxattr, ws / "f", "user.k", 4) == errno.ERANGE


def test_listxattr_with_too_small_buffer_is_erange(ws: Path) -> None:
    (ws / "f").write_bytes(b"")
    os.setxattr(ws / "f", "user.first", b"1")
    os.setxattr(ws / "f", "user.second", b"2")
    needed = c_listxattr(ws / "f", 0)
    assert needed >= len("user.first\0user.second\0")
    assert errno_of(c_listxattr, ws / "f", 3) == errno.ERANGE


def test_user_xattr_on_symlink_is_eperm(ws: Path) -> None:
    # Linux allows user.* only on regular files and directories (fs/xattr.c, for every fs).
    os.symlink("target", ws / "l")
    assert errno_of(os.setxattr, ws / "l", "user.k", b"v", follow_symlinks=False) == errno.EPERM


def test_xattrs_follow_a_hard_link(ws: Path) -> None:
    (ws / "a").write_bytes(b"")
    os.link(ws / "a", ws / "b")
    os.setxattr(ws / "a", "user.k", b"shared")
    assert os.getxattr(ws / "b", "user.k") == b"shared"


# --- special files and the filesystem ------------------------------------------------------------


def test_statvfs(ws: Path) -> None:
    st = os.statvfs(ws)
    assert st.f_bsize > 0 and st.f_frsize > 0
    assert st.f_blocks > 0
    assert st.f_blocks >= st.f_bfree >= st.f_bavail
    assert st.f_namemax == 255


def test_df_reports_the_filesystem(ws: Path) -> None:
    result = subprocess.run(
        ["df", "-P", "-B1", str(ws)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    fields = result.stdout.splitlines()[1].split()
    total, used, avail = int(fields[1]), int(fields[2]), int(fields[3])
    assert total > 0 and used >= 0 and avail >= 0
    assert (
        fields[-1]
        == subprocess.run(
            ["stat", "-c", "%m", str(ws)], capture_output=True, text=True, check=True
        ).stdout.strip()
    )


def test_mkfifo_passes_data(ws: Path) -> None:
    os.mkfifo(ws / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(ws / "fifo").st_mode)
    received: list[bytes] = []

    def reader() -> None:
        with open(ws / "fifo", "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=reader)
    thread.start()
    with open(ws / "fifo", "wb") as f:
        f.write(b"through the pipe")
    thread.join(10)
    assert received == [b"through the pipe"]


def test_unix_socket_can_be_bound_and_connected(ws: Path) -> None:
    path = str(ws / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    finally:
        server.close()
