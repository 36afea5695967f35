"""`.snapshots` through a real mount: take checkpoints with mkdir, browse them with ordinary
tools, EROFS for every change under them, invisible to tree walkers, blob checkpoints with
`: >` and `rm`, delete with rmdir."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mountutil
import pytest
import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.store import Store

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024
SNAPSHOTS = ".snapshots"
SHA = "user.artifactfs.sha256"


def run(argv: list[Any], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a program, failing the test with its output if it exits non-zero."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    kw.setdefault("stdin", subprocess.DEVNULL)
    result = subprocess.run([os.fspath(a) for a in argv], **kw)
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def fails(argv: list[Any], message: str = "Read-only file system") -> None:
    """A command that must fail, saying `message`."""
    result = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0, f"{argv} succeeded"
    assert message in result.stderr, (argv, result.stderr)


def errno_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno or 0


def take(ws: Path, name: str) -> Path:
    path = ws / SNAPSHOTS / name
    os.mkdir(path)
    return path


# ---- a tree with everything a checkpoint keeps -------------------------------------------------

FILES = [
    ("empty.bin", 0, 0o644),
    ("src/one.bin", 1, 0o600),
    ("src/pkg/mod.py", 4095, 0o755),
    ("src/pkg/deep/big.bin", 3 * MiB + 12345, 0o640),
    ("docs/readme.txt", 70_000, 0o444),
    ("with space/ü file.txt", 4097, 0o4750),
]
DIRS = ["src", "src/pkg", "src/pkg/deep", "docs", "with space", "emptydir", "private", "many"]


def make_tree(root: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    for d in DIRS:
        (root / d).mkdir()
    for rel, size, mode in FILES:
        (root / rel).write_bytes(rng.randbytes(size))
        os.chmod(root / rel, mode)
    # A directory big enough to be stored as a chunked manifest.
    for i in range(120):
        (root / "many" / f"n{i:03d}").write_text(f"entry {i}\n")
    (root / "many" / "subdir").mkdir()
    (root / "top.txt").write_text("top level\n" * 50)
    os.link(root / "top.txt", root / "docs" / "hardlink-to-top")
    (root / "docs" / "tagged").write_bytes(b"with xattrs")
    os.setxattr(root / "docs" / "tagged", "user.test", b"tag value")
    os.setxattr(root / "docs" / "tagged", "user.empty", b"")
    os.symlink("pkg/deep", root / "src" / "link-to-dir")
    os.symlink("../top.txt", root / "docs" / "relative-link")
    os.symlink("/nonexistent/absolute", root / "dangling")
    # A sparse file: a hole, data, a hole up to the end.
    with open(root / "sparse.bin", "wb") as f:
        f.seek(5 * MiB + 3)
        f.write(b"middle")
        f.truncate(9 * MiB + 7)
    os.chown(root / "src" / "one.bin", 1234, 5678)
    os.chown(root / "private", 4321, 8765)
    os.chmod(root / "private", 0o750)
    entries = sorted(
        (Path(d) / n for d, dirs, names in os.walk(root) for n in dirs + names),
        key=lambda p: len(p.parts),
        reverse=True,
    )
    for path in entries:
        t = rng.randrange(10**17, 17 * 10**17)
        os.utime(path, ns=(t, t + rng.randrange(10**9)), follow_symlinks=False)


def walk(root: Path) -> list[str]:
    out = []
    for d, dirs, names in os.walk(root):
        for n in dirs + names:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


def user_xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
        if n.startswith("user.") and not n.startswith("user.artifactfs.")
    }


def meta(root: Path) -> dict[str, tuple[object, ...]]:
    """What stat, readlink and getfattr show of every node below `root`, plus which names
    share an inode (as sets of names)."""
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[int, list[str]] = {}
    for rel in walk(root):
        p = root / rel
        st = os.lstat(p)
        common = (
            stat.S_IFMT(st.st_mode),
            oct(stat.S_IMODE(st.st_mode)),
            st.st_uid,
            st.st_gid,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_nlink,
        )
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (*common, os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = (*common, user_xattrs(p))
        else:
            out[rel] = (*common, st.st_size, user_xattrs(p))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault(st.st_ino, []).append(rel)
    out["<hard links>"] = tuple(sorted(tuple(sorted(g)) for g in groups.values()))
    return out


def diff_r(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["diff", "-r", "--no-dereference", os.fspath(a), os.fspath(b)],
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- taking, browsing, keeping the old state -----------------------------------------------------


def test_take_browse_and_diff_against_a_copy(ws: Path, tmp_path: Path) -> None:
    make_tree(ws)
    copy = tmp_path / "copy"
    run(["cp", "-a", ws, copy])
    before = meta(ws)
    snap = take(ws, "first")
    assert os.listdir(ws / SNAPSHOTS) == ["first"]
    assert SNAPSHOTS not in os.listdir(ws)
    # The snapshot is the tree: contents (diff -r), and every attribute stat shows.
    result = diff_r(copy, snap)
    assert result.returncode == 0, result.stdout + result.stderr
    assert meta(snap) == before
    root_live, root_snap = os.stat(ws), os.stat(snap)
    assert (root_snap.st_mode, root_snap.st_uid, root_snap.st_mtime_ns) == (
        root_live.st_mode,
        root_live.st_uid,
        root_live.st_mtime_ns,
    )
    # Change the live tree in every way; the snapshot still shows the old state.
    (ws / "top.txt").write_text("changed\n")
    (ws / "src" / "pkg" / "deep" / "big.bin").unlink()
    os.rename(ws / "docs", ws / "documents")
    os.chmod(ws / "src" / "one.bin", 0o777)
    os.setxattr(ws / "documents" / "tagged", "user.test", b"new value")
    (ws / "emptydir" / "new").write_text("new")
    with open(ws / "sparse.bin", "r+b") as f:
        f.seek(100)
        f.write(b"overwritten")
    assert diff_r(copy, ws).returncode == 1
    result = diff_r(copy, snap)
    assert result.returncode == 0, result.stdout + result.stderr
    assert meta(snap) == before
    # A second checkpoint shows the new state; the first one is unchanged.
    second = take(ws, "second")
    assert sorted(os.listdir(ws / SNAPSHOTS)) == ["first", "second"]
    assert diff_r(ws, second).returncode == 0
    assert (second / "top.txt").read_text() == "changed\n"
    assert (snap / "top.txt").read_text() == "top level\n" * 50
    assert os.stat(ws / SNAPSHOTS).st_nlink == 4


def test_stat_shows_the_recorded_attributes(ws: Path) -> None:
    f = ws / "f"
    f.write_bytes(b"content")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o4750)
    os.utime(f, ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    (ws / "d" / "a").mkdir(parents=True)
    (ws / "d" / "b").mkdir()
    os.mkfifo(ws / "fifo", 0o640)
    live = os.stat(f)
    take(ws, "c")
    fifo = os.stat(ws / SNAPSHOTS / "c" / "fifo")
    assert (fifo.st_mode, fifo.st_nlink) == (stat.S_IFIFO | 0o640, 1)
    os.chown(f, 1, 1)
    os.chmod(f, 0o600)
    os.utime(f, ns=(5, 5))
    got = os.stat(ws / SNAPSHOTS / "c" / "f")
    assert (got.st_mode, got.st_uid, got.st_gid) == (stat.S_IFREG | 0o4750, 1234, 5678)
    assert (got.st_atime_ns, got.st_mtime_ns) == (
        1_111_111_111_123_456_789,
        1_222_222_222_987_654_321,
    )
    assert got.st_ctime_ns == live.st_ctime_ns and got.st_size == 7
    out = run(["stat", "-c", "%a %u %g %s %Y", ws / SNAPSHOTS / "c" / "f"]).stdout.split()
    assert out == ["4750", "1234", "5678", "7", "1222222222"]
    # Directories: nlink is 2 + subdirectories.
    assert os.stat(ws / SNAPSHOTS / "c" / "d").st_nlink == 4
    assert os.stat(ws / SNAPSHOTS / "c").st_nlink == 3
    # .snapshots itself: a directory owned like the workspace root.
    s, root = os.stat(ws / SNAPSHOTS), os.stat(ws)
    assert stat.S_ISDIR(s.st_mode) and (s.st_uid, s.st_gid) == (root.st_uid, root.st_gid)
    assert stat.S_IMODE(s.st_mode) == 0o555 | (stat.S_IMODE(root.st_mode) & 0o222)
    assert s.st_nlink == 3
    assert s.st_ino >= 1 << 48 and s.st_dev == root.st_dev


def test_hard_links_and_xattrs_in_a_snapshot(ws: Path) -> None:
    (ws / "a").write_bytes(b"linked content")
    (ws / "d").mkdir()
    os.link(ws / "a", ws / "d" / "b")
    os.setxattr(ws / "a", "user.color", b"blue")
    os.setxattr(ws / "d", "user.dir", b"attr of a dir")
    snap = take(ws, "c")
    a, b = os.stat(snap / "a"), os.stat(snap / "d" / "b")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    assert os.stat(snap / "d").st_ino != a.st_ino
    out = run(["getfattr", "-d", "--absolute-names", snap / "d" / "b"]).stdout
    assert 'user.color="blue"' in out
    out = run(["getfattr", "-d", "--absolute-names", snap / "d"]).stdout
    assert 'user.dir="attr of a dir"' in out
    sha = run(["getfattr", "--only-values", "-n", SHA, snap / "a"]).stdout
    assert sha == hashlib.sha256(b"linked content").hexdigest()
    assert os.getxattr(snap / "a", SHA) == os.getxattr(ws / "a", SHA)
    assert errno_of(os.getxattr, snap / "a", "user.missing") == errno.ENODATA
    # cp -a of the snapshot keeps the link.
    out_dir = ws.parent / f"{ws.name}-out"
    try:
        run(["cp", "-a", snap, out_dir])
        assert os.stat(out_dir / "a").st_ino == os.stat(out_dir / "d" / "b").st_ino
        assert os.getxattr(out_dir / "a", "user.color") == b"blue"
    finally:
        run(["rm", "-rf", out_dir])


def test_sparse_and_large_files_read_back(ws: Path) -> None:
    rng = random.Random(7)
    big = rng.randbytes(5 * MiB + 1)
    (ws / "big").write_bytes(big)
    with open(ws / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 * MiB)
        f.write(b"tail")
        f.truncate(6 * MiB + 5)
    snap = take(ws, "c")
    assert (snap / "big").read_bytes() == big
    data = (snap / "sparse").read_bytes()
    assert data == b"head" + bytes(3 * MiB - 4) + b"tail" + bytes(3 * MiB + 1)
    assert os.stat(snap / "sparse").st_blocks == os.stat(ws / "sparse").st_blocks
    with open(snap / "big", "rb") as f:
        f.seek(MiB - 10)
        assert f.read(20) == big[MiB - 10 : MiB + 10]


# ---- read-only ---------------------------------------------------------------------------------


def test_every_write_path_is_erofs(ws: Path, tmp_path: Path) -> None:
    make_tree(ws)
    copy = tmp_path / "copy"
    run(["cp", "-a", ws, copy])
    snap = take(ws, "c")
    top, sub = snap / "top.txt", snap / "src"
    S = ws / SNAPSHOTS
    attempts: dict[str, Callable[[], Any]] = {
        "create": lambda: os.open(sub / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "create in checkpoint root": lambda: os.open(snap / "new", os.O_CREAT | os.O_WRONLY),
        "create exclusive": lambda: os.open(sub / "x", os.O_CREAT | os.O_EXCL | os.O_RDWR),
        "mknod": lambda: os.mknod(sub / "fifo2", stat.S_IFIFO | 0o600),
        "mkdir": lambda: os.mkdir(sub / "newdir"),
        "mkdir in checkpoint root": lambda: os.mkdir(snap / "newdir"),
        "symlink": lambda: os.symlink("target", sub / "sl"),
        "link into": lambda: os.link(ws / "top.txt", sub / "hl"),
        "link from": lambda: os.link(top, ws / "hl"),
        "unlink": lambda: os.unlink(top),
        "unlink symlink": lambda: os.unlink(snap / "dangling"),
        "rmdir": lambda: os.rmdir(snap / "emptydir"),
        "rename within": lambda: os.rename(top, snap / "top2.txt"),
        "rename dir within": lambda: os.rename(sub, snap / "src2"),
        "rename into": lambda: os.rename(ws / "top.txt", sub / "top.txt"),
        "rename out of": lambda: os.rename(top, ws / "out.txt"),
        "chmod": lambda: os.chmod(top, 0o777),
        "chmod dir": lambda: os.chmod(sub, 0o700),
        "chown": lambda: os.chown(top, 1, 1),
        "utimes": lambda: os.utime(top, ns=(1, 1)),
        "utimes now": lambda: os.utime(top),
        "truncate": lambda: os.truncate(top, 0),
        "setxattr": lambda: os.setxattr(top, "user.new", b"1"),
        "setxattr replace": lambda: os.setxattr(snap / "docs" / "tagged", "user.test", b"x"),
        "removexattr": lambda: os.removexattr(snap / "docs" / "tagged", "user.test"),
        "open O_WRONLY": lambda: os.open(top, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(top, os.O_RDWR),
        "open O_APPEND": lambda: os.open(top, os.O_WRONLY | os.O_APPEND),
        "open O_TRUNC": lambda: os.open(top, os.O_WRONLY | os.O_TRUNC),
        # .snapshots itself
        "create in .snapshots": lambda: os.open(S / "file", os.O_CREAT | os.O_WRONLY),
        "symlink in .snapshots": lambda: os.symlink("c", S / "alias"),
        "rmdir .snapshots": lambda: os.rmdir(S),
        "rename .snapshots": lambda: os.rename(S, ws / "renamed"),
        "rename a checkpoint": lambda: os.rename(snap, S / "c2"),
        "chmod .snapshots": lambda: os.chmod(S, 0o700),
        "setxattr .snapshots": lambda: os.setxattr(S, "user.x", b"1"),
    }
    wrong = {}
    for what, attempt in attempts.items():
        try:
            fd = attempt()
        except OSError as exc:
            if exc.errno != errno.EROFS:
                wrong[what] = errno.errorcode.get(exc.errno or 0, exc.errno)
        else:
            if isinstance(fd, int):
                os.close(fd)
            wrong[what] = "succeeded"
    assert wrong == {}
    # And through the shell tools people use.
    for argv in (
        ["touch", top],
        ["rm", "-f", top],
        ["rm", "-rf", sub],
        ["mv", top, ws / "moved"],
        ["cp", ws / "top.txt", sub / "copied"],
        ["chmod", "-R", "u+w", sub],
        ["setfattr", "-n", "user.x", "-v", "1", top],
        ["sh", "-c", f"echo more >> '{top}'"],
        ["sh", "-c", f"echo new > '{top}'"],
    ):
        fails(argv)
    # Nothing changed, and the live tree took nothing from those attempts.
    result = diff_r(copy, snap)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (ws / "hl").exists() and not (ws / "out.txt").exists()
    assert os.listdir(S) == ["c"]


def test_snapshots_name_is_reserved_in_the_workspace_root(ws: Path) -> None:
    # The kernel sees the virtual .snapshots, so most attempts fail before reaching the daemon.
    assert errno_of(os.mkdir, ws / SNAPSHOTS) == errno.EEXIST
    (ws / "dir").mkdir()
    (ws / "file").write_text("x")
    # Replacing it by a directory reaches the daemon: EINVAL.
    assert errno_of(os.rename, ws / "dir", ws / SNAPSHOTS) == errno.EINVAL
    assert errno_of(os.link, ws / "file", ws / SNAPSHOTS) == errno.EEXIST
    assert sorted(os.listdir(ws)) == ["dir", "file"]
    # Deeper directories may have a real .snapshots, and checkpoints keep it.
    (ws / "dir" / SNAPSHOTS).mkdir()
    (ws / "dir" / SNAPSHOTS / "f").write_text("real")
    assert os.listdir(ws / "dir") == [SNAPSHOTS]
    snap = take(ws, "c")
    assert (snap / "dir" / SNAPSHOTS / "f").read_text() == "real"
    assert os.listdir(snap / "dir") == [SNAPSHOTS]
    assert sorted(os.listdir(snap)) == ["dir", "file"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")
def test_other_users_see_the_recorded_permissions(ws: Path) -> None:
    alice = 1000

    def as_alice(script: str) -> subprocess.CompletedProcess[str]:
        return mountutil.run_as(
            alice, alice, ["sh", "-c", script], capture_output=True, text=True, cwd="/"
        )

    (ws / "secret").write_text("root only")
    os.chmod(ws / "secret", 0o600)
    (ws / "mine").write_text("alice's")
    os.chown(ws / "mine", alice, alice)
    # Whoever may write the workspace root (0777 here) may take checkpoints.
    result = as_alice(f"mkdir '{ws}/.snapshots/by-alice'")
    assert result.returncode == 0, result.stderr
    snap = ws / SNAPSHOTS / "by-alice"
    assert (snap / "mine").read_text() == "alice's"
    # The snapshot's modes and owners apply: the kernel checks them.
    result = as_alice(f"cat '{snap}/secret'")
    assert result.returncode != 0 and "Permission denied" in result.stderr
    result = as_alice(f"cat '{snap}/mine'")
    assert result.returncode == 0 and result.stdout == "alice's"
    # Her own file, writable by its mode, is still read-only in the snapshot.
    result = as_alice(f"echo x >> '{snap}/mine'")
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    # Once the workspace root is not hers to write, neither is .snapshots.
    os.chmod(ws, 0o755)
    assert stat.S_IMODE(os.stat(ws / SNAPSHOTS).st_mode) == 0o755
    result = as_alice(f"mkdir '{ws}/.snapshots/again'")
    assert result.returncode != 0 and "Permission denied" in result.stderr
    result = as_alice(f"rmdir '{snap}'")
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert os.listdir(ws / SNAPSHOTS) == ["by-alice"]


# ---- tools that walk trees -----------------------------------------------------------------------


def test_tree_walkers_never_see_snapshots(ws: Path, tmp_path: Path) -> None:
    make_tree(ws)
    take(ws, "one")
    (ws / "later.txt").write_text("later")
    take(ws, "two")
    expected = walk(ws)
    assert not any(SNAPSHOTS in p for p in expected)
    found = run(["find", ws]).stdout
    assert SNAPSHOTS not in found and "later.txt" in found
    du = run(["du", "-a", ws]).stdout
    assert SNAPSHOTS not in du and "later.txt" in du
    run(["cp", "-r", ws, tmp_path / "cp"])
    assert walk(tmp_path / "cp") == expected
    run(["rsync", "-a", f"{ws}/", f"{tmp_path / 'rsync'}/"])
    assert walk(tmp_path / "rsync") == expected
    run(["tar", "cf", tmp_path / "ws.tar", "-C", ws, "."])
    names = run(["tar", "tf", tmp_path / "ws.tar"]).stdout
    assert SNAPSHOTS not in names and "./later.txt" in names
    assert SNAPSHOTS not in run(["ls", "-aR", ws]).stdout
    # git status walks the work tree: no .snapshots among the untracked files.
    git = ["git", "-c", "safe.directory=*", "-C", ws]
    run([*git, "init", "-q"])
    status = run([*git, "status", "--porcelain", "--untracked-files=all"]).stdout
    assert SNAPSHOTS not in status and "later.txt" in status


# ---- deleting and names --------------------------------------------------------------------------


def test_rmdir_deletes_a_checkpoint(ws: Path) -> None:
    (ws / "f").write_text("v1")
    take(ws, "a")
    take(ws, "b")
    assert sorted(os.listdir(ws / SNAPSHOTS)) == ["a", "b"]
    os.rmdir(ws / SNAPSHOTS / "a")
    assert os.listdir(ws / SNAPSHOTS) == ["b"]
    assert errno_of(os.stat, ws / SNAPSHOTS / "a") == errno.ENOENT
    assert errno_of(os.rmdir, ws / SNAPSHOTS / "a") == errno.ENOENT
    # The name is free again, for a checkpoint of the current state.
    (ws / "f").write_text("v2")
    take(ws, "a")
    assert (ws / SNAPSHOTS / "a" / "f").read_text() == "v2"
    assert (ws / SNAPSHOTS / "b" / "f").read_text() == "v1"
    run(["rmdir", ws / SNAPSHOTS / "a", ws / SNAPSHOTS / "b"])
    assert os.listdir(ws / SNAPSHOTS) == []


def test_checkpoint_names(ws: Path) -> None:
    take(ws, "x")
    assert errno_of(os.mkdir, ws / SNAPSHOTS / "x") == errno.EEXIST
    assert errno_of(os.mkdir, os.fsencode(ws / SNAPSHOTS) + b"/bad\xff") == errno.EINVAL
    assert errno_of(os.mkdir, ws / SNAPSHOTS / ("n" * 256)) == errno.ENAMETOOLONG
    long_name = "é" * 127  # 254 bytes
    take(ws, long_name)
    assert sorted(os.listdir(ws / SNAPSHOTS)) == sorted(["x", long_name])


def test_checkpoint_taken_by_another_process_appears_at_once(
    mnt: mountutil.Mount,
) -> None:
    ws = mountutil.workspace(mnt.mountpoint, "t", "shared", "ws")
    (ws / "f").write_text("content")
    # Looked up (and missed) first, as a shell or a script would.
    assert not (ws / SNAPSHOTS / "ext").exists()
    assert os.listdir(ws / SNAPSHOTS) == []
    ns_id = os.getxattr(ws, "user.artifactfs.namespace").decode()

    async def outside(op: str) -> None:
        store = Store(mnt.store)
        try:
            cp = Checkpoints(store.index, BlockIO(store.backend, store.config.block_size))
            ns = store.index.namespace_by_public_id(ns_id)
            assert ns is not None
            try:
                if op == "create":
                    await cp.create(ns, "ext", "test")
                else:
                    await cp.delete(ns, "ext", "test")
            finally:
                cp.close()
        finally:
            store.close()

    trio.run(outside, "create")
    # No sleep: no negative entry was cached under .snapshots.
    assert (ws / SNAPSHOTS / "ext").is_dir()
    assert (ws / SNAPSHOTS / "ext" / "f").read_text() == "content"
    assert os.listdir(ws / SNAPSHOTS) == ["ext"]
    assert os.stat(ws / SNAPSHOTS).st_nlink == 3
    trio.run(outside, "delete")
    assert not (ws / SNAPSHOTS / "ext").exists()
    assert os.listdir(ws / SNAPSHOTS) == []


# ---- blob namespaces -----------------------------------------------------------------------------


def test_blob_checkpoints_with_colon_redirect_and_rm(ws: Path) -> None:
    scope = ws.parent
    blob = scope / f"{ws.name}.bin"
    content = random.Random(3).randbytes(2 * MiB + 77)
    blob.write_bytes(content)
    os.chmod(blob, 0o640)
    os.utime(blob, ns=(1_300_000_000_000_000_000, 1_400_000_000_000_000_001))
    live = os.stat(blob)
    ss = scope / SNAPSHOTS
    assert SNAPSHOTS not in os.listdir(scope)
    assert blob.name in os.listdir(ss)
    assert ws.name not in os.listdir(ss)  # workspaces have their own .snapshots
    assert stat.S_ISDIR(os.stat(ss).st_mode) and stat.S_IMODE(os.stat(ss).st_mode) == 0o555
    bdir = ss / blob.name
    assert stat.S_ISDIR(os.stat(bdir).st_mode) and os.listdir(bdir) == []
    # Take one with the shell's `: >`.
    run(["sh", "-c", f": > '{bdir}/v1'"])
    assert os.listdir(bdir) == ["v1"]
    got = os.stat(bdir / "v1")
    assert stat.S_ISREG(got.st_mode)
    assert (got.st_mode, got.st_uid, got.st_size, got.st_mtime_ns) == (
        live.st_mode,
        live.st_uid,
        live.st_size,
        live.st_mtime_ns,
    )
    blob.write_bytes(b"replaced")
    assert (bdir / "v1").read_bytes() == content
    assert os.getxattr(bdir / "v1", SHA).decode() == hashlib.sha256(content).hexdigest()
    # Creating with open(2) gives a handle that cannot write.
    fd = os.open(bdir / "v2", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert errno_of(os.write, fd, b"x") == errno.EROFS
    finally:
        os.close(fd)
    assert (bdir / "v2").read_bytes() == b"replaced"
    assert sorted(os.listdir(bdir)) == ["v1", "v2"]
    # Everything else is read-only.
    assert errno_of(os.open, bdir / "v1", os.O_WRONLY) == errno.EROFS
    assert errno_of(os.truncate, bdir / "v1", 0) == errno.EROFS
    assert errno_of(os.chmod, bdir / "v1", 0o600) == errno.EROFS
    assert errno_of(os.mkdir, bdir / "d") == errno.EROFS
    assert errno_of(os.rename, bdir / "v1", bdir / "v3") == errno.EROFS
    assert errno_of(os.mkdir, ss / "newblob") == errno.EROFS
    assert errno_of(os.open, ss / "newblob", os.O_CREAT | os.O_WRONLY) == errno.EROFS
    assert errno_of(os.rmdir, bdir) == errno.EROFS
    fails(["sh", "-c", f": > '{bdir}/v1'"])  # an existing checkpoint: truncate is refused
    # rm deletes.
    run(["rm", bdir / "v1"])
    assert os.listdir(bdir) == ["v2"]
    assert errno_of(os.stat, bdir / "v1") == errno.ENOENT
    run(["rm", "-f", bdir / "v2"])
    assert os.listdir(bdir) == []
    assert blob.read_bytes() == b"replaced"
