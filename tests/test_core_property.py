"""The core against a reference model: random operation sequences applied both to a workspace
of the core and to a plain directory (real system calls), comparing after every step the two
trees (names, types, sizes, contents, link counts and hard-link groups, symlink targets, user
xattrs) and the outcome of the step (success, or the same errno).

The core is driven as the kernel drives it through FUSE: paths are walked with `lookup`, files
are opened, written and released, and checks the kernel's VFS makes before it calls a
filesystem at all are made here (`vfs_precheck`), so that only what reaches the core is
compared. After every step the kernel "forgets" every inode (as it may under memory pressure)
and the index invariants are checked.

Hypothesis drives plain `trio.run` calls from a sync test (pytest-trio only runs `async def`
tests itself).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import trio
from coreutil import BLOCK, Core, check_invariants, open_core, workspace
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from artifactfs.core.nodes import AttrChanges
from artifactfs.errors import FsError, NotADirectory, NotFound
from artifactfs.fuse.errno_map import errno_for

WS = "acme/shared/ws"
NAMES = ("a", "b", "c")
PATHS = (
    list(NAMES)
    + [f"{x}/{y}" for x in NAMES for y in NAMES]
    + ["a/a/a", "a/b/c", "b/a/b"]
)
OFFSETS = [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 5, 3 * BLOCK, 5 * BLOCK + 7]
LENGTHS = [1, 10, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3]
SIZES = [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 10, 4 * BLOCK]
XNAMES = [b"user.x", b"user.y"]
XVALUES = [b"", b"1", b"value" * 20]
RENAME_FLAGS = [0, 1, 2]  # 0, RENAME_NOREPLACE, RENAME_EXCHANGE
# More examples for a longer hunt: ARTIFACTFS_PROP_EXAMPLES=5000 pytest tests/test_core_property.py
EXAMPLES = int(os.environ.get("ARTIFACTFS_PROP_EXAMPLES", "100"))

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def data_for(seed: int, n: int) -> bytes:
    """Seed 0 writes zeros (holes); others a pattern with no zero byte."""
    if seed == 0:
        return bytes(n)
    return bytes((seed * 31 + i * 7) % 255 + 1 for i in range(n))


path_st = st.sampled_from(PATHS)
OP = st.one_of(
    st.tuples(st.just("create"), path_st),
    st.tuples(st.just("write"), path_st, st.sampled_from(OFFSETS), st.sampled_from(LENGTHS),
              st.integers(0, 5)),
    st.tuples(st.just("truncate"), path_st, st.sampled_from(SIZES)),
    st.tuples(st.just("rename"), path_st, path_st, st.sampled_from(RENAME_FLAGS)),
    st.tuples(st.just("link"), path_st, path_st),
    st.tuples(st.just("unlink"), path_st),
    st.tuples(st.just("mkdir"), path_st),
    st.tuples(st.just("rmdir"), path_st),
    st.tuples(st.just("symlink"), path_st, st.integers(0, 3)),
    st.tuples(st.just("setxattr"), path_st, st.sampled_from(XNAMES), st.sampled_from(XVALUES)),
    st.tuples(st.just("removexattr"), path_st, st.sampled_from(XNAMES)),
)


# ---- the reference: real system calls ------------------------------------------------------


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src))


def apply_real(root: Path, op: tuple[Any, ...]) -> int:
    """Apply `op` under `root`; 0 or the errno."""
    kind, path = op[0], root / op[1]
    try:
        if kind == "create":
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        elif kind == "write":
            _, _, off, n, seed = op
            fd = os.open(path, os.O_WRONLY)
            try:
                assert os.pwrite(fd, data_for(seed, n), off) == n
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(path, op[2])
        elif kind == "rename":
            renameat2(path, root / op[2], op[3])
        elif kind == "link":
            os.link(path, root / op[2], follow_symlinks=False)
        elif kind == "unlink":
            os.unlink(path)
        elif kind == "mkdir":
            os.mkdir(path, 0o755)
        elif kind == "rmdir":
            os.rmdir(path)
        elif kind == "symlink":
            os.symlink(f"/nonexistent/target-{op[2]}", path)
        elif kind == "setxattr":
            os.setxattr(path, op[2], op[3])
        elif kind == "removexattr":
            os.removexattr(path, op[2])
        else:
            raise AssertionError(kind)
    except OSError as exc:
        return exc.errno or -1
    return 0


# ---- the core, driven as the kernel drives it ----------------------------------------------


async def lookup_opt(core: Core, parent: int, name: bytes) -> int | None:
    try:
        return (await core.fs.lookup(parent, name, core.caller)).ino
    except NotFound:
        return None


async def vfs_precheck(core: Core, op: tuple[Any, ...], base: str) -> None:
    """What the kernel's VFS refuses before it calls the filesystem, in the kernel's order.

    - link/mkdir/symlink: an existing target name is EEXIST (filename_create), before vfs_link
      looks at the source (a directory source is EPERM only when the name is free);
    - rename: "target is an ancestor of the source" is ENOTEMPTY (EINVAL for
      RENAME_EXCHANGE), checked in do_renameat2 before vfs_rename compares the types.
    """
    kind = op[0]
    if kind in ("link", "mkdir", "symlink"):
        target = op[2] if kind == "link" else op[1]
        if kind == "link":
            await core.resolve(f"{base}/{op[1]}")  # linkat walks the source path first
        parent, name = await core.parent(f"{base}/{target}")
        if await lookup_opt(core, parent, name) is not None:
            raise FileExistsError(errno.EEXIST, "exists")
    if kind == "rename":
        src, dst, flags = op[1], op[2], op[3]
        await core.parent(f"{base}/{src}")
        await core.parent(f"{base}/{dst}")
        await core.resolve(f"{base}/{src}")
        if flags & 1 and await core.exists(f"{base}/{dst}"):
            raise FileExistsError(errno.EEXIST, "exists")
        src_parent = src.rsplit("/", 1)[0] if "/" in src else ""
        if src_parent != dst and (src_parent + "/").startswith(dst + "/"):
            code = errno.EINVAL if flags & 2 else errno.ENOTEMPTY
            raise OSError(code, "target is an ancestor of the source")


async def apply_core(core: Core, op: tuple[Any, ...], base: str) -> int:
    """Apply `op` to the core; 0 or the errno the FUSE adapter would answer."""
    kind, path = op[0], f"{base}/{op[1]}"
    fs, caller = core.fs, core.caller
    try:
        await vfs_precheck(core, op, base)
        if kind == "create":
            parent, name = await core.parent(path)
            fh, _ = await fs.create(parent, name, 0o644, os.O_WRONLY, caller)
            await fs.release(fh)
        elif kind == "write":
            _, _, off, n, seed = op
            fh = await core.open(path, os.O_WRONLY)
            try:
                assert await fs.write(fh, off, data_for(seed, n)) == n
                await fs.flush(fh)
            finally:
                await fs.release(fh)
        elif kind == "truncate":
            ino = await core.resolve(path, follow=True)
            await fs.setattr(ino, AttrChanges(size=op[2]), caller)
        elif kind == "rename":
            op_, oname = await core.parent(path)
            np_, nname = await core.parent(f"{base}/{op[2]}")
            await fs.rename(op_, oname, np_, nname, op[3], caller)
        elif kind == "link":
            ino = await core.resolve(path)
            np_, nname = await core.parent(f"{base}/{op[2]}")
            await fs.link(ino, np_, nname, caller)
        elif kind == "unlink":
            parent, name = await core.parent(path)
            await fs.unlink(parent, name, caller)
        elif kind == "mkdir":
            parent, name = await core.parent(path)
            await fs.mkdir(parent, name, 0o755, caller)
        elif kind == "rmdir":
            parent, name = await core.parent(path)
            await fs.rmdir(parent, name, caller)
        elif kind == "symlink":
            parent, name = await core.parent(path)
            await fs.symlink(parent, name, f"/nonexistent/target-{op[2]}".encode(), caller)
        elif kind == "setxattr":
            await fs.setxattr(await core.resolve(path, follow=True), op[2], op[3], caller)
        elif kind == "removexattr":
            await fs.removexattr(await core.resolve(path, follow=True), op[2], caller)
        else:
            raise AssertionError(kind)
    except FsError as exc:
        return errno_for(exc)
    except OSError as exc:  # from vfs_precheck
        return exc.errno or -1
    return 0


# ---- the two trees --------------------------------------------------------------------------


Tree = dict[str, tuple[Any, ...]]


def real_tree(root: Path) -> tuple[Tree, set[frozenset[str]], int]:
    tree: Tree = {}
    groups: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st_ = os.lstat(full)
            groups.setdefault(st_.st_ino, set()).add(rel)
            if stat.S_ISLNK(st_.st_mode):
                tree[rel] = ("symlink", st_.st_nlink, st_.st_size, os.readlink(full).encode())
                continue
            xattrs = {
                n.encode(): os.getxattr(full, n)
                for n in os.listxattr(full)
                if n.startswith("user.")
            }
            if stat.S_ISDIR(st_.st_mode):
                tree[rel] = ("dir", st_.st_nlink, xattrs)
            else:
                tree[rel] = ("file", st_.st_nlink, st_.st_size, full.read_bytes(), xattrs)
    links = {frozenset(g) for g in groups.values() if len(g) > 1}
    return tree, links, os.lstat(root).st_nlink


async def core_tree(core: Core, top: int) -> tuple[Tree, set[frozenset[str]], int]:
    fs = core.fs
    tree: Tree = {}
    groups: dict[int, set[str]] = {}

    async def xattrs_of(ino: int) -> dict[bytes, bytes]:
        return {
            n: await fs.getxattr(ino, n)
            for n in await fs.listxattr(ino)
            if n.startswith(b"user.") and not n.startswith(b"user.artifactfs.")
        }

    async def walk(ino: int, prefix: str) -> None:
        after = 0
        while True:
            entries = await fs.readdir(ino, after)
            if not entries:
                return
            for ent in entries:
                after = ent.next_offset
                rel = prefix + os.fsdecode(ent.name)
                a = await fs.getattr(ent.attr.ino)
                groups.setdefault(a.ino, set()).add(rel)
                if stat.S_ISLNK(a.mode):
                    tree[rel] = ("symlink", a.nlink, a.size, await fs.readlink(a.ino))
                elif stat.S_ISDIR(a.mode):
                    tree[rel] = ("dir", a.nlink, await xattrs_of(a.ino))
                    await walk(a.ino, rel + "/")
                else:
                    fh = await fs.open(a.ino, os.O_RDONLY, core.caller)
                    try:
                        content = await core.read_fh(fh)
                    finally:
                        await fs.release(fh)
                    tree[rel] = ("file", a.nlink, a.size, content, await xattrs_of(a.ino))

    await walk(top, "")
    links = {frozenset(g) for g in groups.values() if len(g) > 1}
    return tree, links, (await fs.getattr(top)).nlink


def describe(tree: Tree) -> dict[str, tuple[Any, ...]]:
    """The tree with contents shortened, for readable failure messages."""
    out = {}
    for k, v in tree.items():
        if v[0] == "file":
            out[k] = (*v[:3], f"<{len(v[3])} bytes, {sum(1 for b in v[3] if b)} non-zero>", v[4])
        else:
            out[k] = v
    return out


async def run_ops(tmp: Path, ops: list[tuple[Any, ...]]) -> None:
    real = tmp / "real"
    real.mkdir()
    async with open_core(tmp / "store") as core:
        top = await workspace(core, WS)
        for i, op in enumerate(ops):
            note(f"step {i}: {op}")
            want = apply_real(real, op)
            got = await apply_core(core, op, WS)
            assert errno.errorcode.get(got, got) == errno.errorcode.get(want, want), (
                f"step {i} {op}: core answered {errno.errorcode.get(got, got)}, "
                f"a real directory {errno.errorcode.get(want, want)}"
            )
            # The kernel may drop every unused inode at any time.
            core.fs.forget(list(core.fs.lookups.items()))
            check_invariants(core.store, busy=set(core.fs.files))
            r_tree, r_links, r_nlink = real_tree(real)
            c_tree, c_links, c_nlink = await core_tree(core, top)
            if c_tree != r_tree:
                assert describe(c_tree) == describe(r_tree), f"trees differ after step {i} {op}"
                assert c_tree == r_tree, f"file contents differ after step {i} {op}"
            assert c_links == r_links, f"hard-link groups differ after step {i} {op}"
            assert c_nlink == r_nlink, f"workspace root nlink differs after step {i} {op}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(OP, max_size=30))
def test_core_matches_a_plain_directory(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="artifactfs-prop-") as tmp:
        trio.run(run_ops, Path(tmp), ops)


def test_reference_supports_what_the_model_needs(tmp_path: Path) -> None:
    """The plain directory must support user xattrs and renameat2 flags, or the model test
    would compare against the wrong thing."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    os.setxattr(a, "user.x", b"1")
    renameat2(a, b, 2)
    assert (b.read_bytes(), a.read_bytes()) == (b"A", b"B")
    try:
        renameat2(a, b, 1)
    except OSError as exc:
        assert exc.errno == errno.EEXIST
    else:
        raise AssertionError("RENAME_NOREPLACE did not refuse")


# Keep names imported for the checks above in use for type checkers.
_ = (NotADirectory,)
