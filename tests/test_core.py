"""The filesystem core without FUSE: the grid, POSIX inside workspaces, contents, xattrs and
persistence. One behaviour per test; errors asserted by their exception class (each maps to one
errno in fuse/errno_map.py). Every test ends with the fsck-style invariant check of
`coreutil.check_invariants` (run by the `core` fixture at teardown)."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from coreutil import (
    BLOCK,
    CALLER,
    Core,
    check_invariants,
    crashing_core,
    minimal_acl,
    open_core,
    workspace,
)

from artifactfs.blobs.journal import JournalReader
from artifactfs.core.acl import ACL_ACCESS, ACL_DEFAULT
from artifactfs.core.fs import RENAME_EXCHANGE, RENAME_NOREPLACE
from artifactfs.core.nodes import ROOT_INODE, AttrChanges, Caller, NodeKind
from artifactfs.errors import (
    BadHandle,
    CrossDevice,
    Exists,
    FileTooBig,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NoData,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    OutOfRange,
)
from artifactfs.store import Store

WS = "acme/shared/ws"
SHA = b"user.artifactfs.sha256"
NSX = b"user.artifactfs.namespace"


def p(rel: str) -> str:
    return f"{WS}/{rel}"


def pattern(n: int, seed: int = 0) -> bytes:
    """Distinct, non-zero bytes so that misplaced or lost blocks show."""
    rnd = random.Random(seed)
    return bytes(rnd.randrange(1, 256) for _ in range(n))


@pytest.fixture(params=[False, True], ids=["plain", "group"])
async def core(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Core]:
    """A workspace at WS on a fresh store; every test runs with the index committing each
    operation, and grouping them as the daemon does."""
    async with open_core(tmp_path / "store", group_commit=request.param) as c:
        await workspace(c, WS)
        yield c


# ==== the grid ===============================================================================


async def test_root_lists_sandboxes(core: Core) -> None:
    await core.mkdir("beta")
    assert sorted(await core.listdir("")) == [b"acme", b"beta"]
    attr = await core.attr("beta")
    assert attr.kind is NodeKind.SANDBOX and stat.S_ISDIR(attr.mode)
    assert (await core.fs.getattr(ROOT_INODE)).nlink == 4


async def test_grid_kinds(core: Core) -> None:
    assert (await core.attr("acme")).kind is NodeKind.SANDBOX
    assert (await core.attr("acme/shared")).kind is NodeKind.SCOPE
    ws = await core.attr(WS)
    assert ws.kind is NodeKind.NSROOT and ws.nlink == 2
    assert (await core.attr("acme/shared")).nlink == 3


@pytest.mark.parametrize("name", ["shared", "user-alice", "sess-1234", "user-a.b_c@d+e-f"])
async def test_valid_scope_names(core: Core, name: str) -> None:
    await core.makedirs(f"acme/{name}")  # shared exists already: makedirs tolerates it
    assert (await core.attr(f"acme/{name}")).kind is NodeKind.SCOPE


@pytest.mark.parametrize(
    "name",
    [
        b"other",
        b"user-",
        b"sess-",
        b"user-.x",
        b"Shared",
        b"user-a b",
        b"session-1",
        b"user-a:b",
        b"\xff\xfe",
    ],
)
async def test_invalid_scope_names(core: Core, name: bytes) -> None:
    sandbox = await core.resolve("acme")
    with pytest.raises(InvalidName):
        await core.fs.mkdir(sandbox, name, 0o755, CALLER)
    assert sorted(await core.listdir("acme")) == [b"shared"]


@pytest.mark.parametrize("name", [b"-x", b"a b", b".snapshots", b"\xff", b"a:b", b".hidden"])
async def test_invalid_sandbox_names(core: Core, name: bytes) -> None:
    with pytest.raises(InvalidName):
        await core.fs.mkdir(ROOT_INODE, name, 0o755, CALLER)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (b"x" * 256, NameTooLong),
        (b"a/b", InvalidName),
        (b"a\0b", InvalidName),
        (b".", InvalidName),
        (b"..", InvalidName),
        (b"", InvalidName),
        (b"\xff\xfe", InvalidName),
        (b".snapshots", InvalidName),
    ],
)
async def test_namespace_name_rules(core: Core, name: bytes, error: type[Exception]) -> None:
    scope = await core.resolve("acme/shared")
    with pytest.raises(error):
        await core.fs.mkdir(scope, name, 0o755, CALLER)
    with pytest.raises(error):
        await core.fs.create(scope, name, 0o644, os.O_WRONLY, CALLER)
    assert await core.listdir("acme/shared") == [b"ws"]


async def test_namespace_name_of_255_bytes(core: Core) -> None:
    name = "n" * 255
    await core.mkdir(f"acme/shared/{name}")
    assert (await core.attr(f"acme/shared/{name}")).kind is NodeKind.NSROOT


async def test_mkdir_existing_grid_levels(core: Core) -> None:
    with pytest.raises(Exists):
        await core.mkdir("acme")
    with pytest.raises(Exists):
        await core.mkdir("acme/shared")
    with pytest.raises(Exists):
        await core.mkdir(WS)


async def test_rmdir_non_empty_namespace(core: Core) -> None:
    await core.write_file(p("f"), b"data")
    scope = await core.resolve("acme/shared")
    with pytest.raises(NotEmpty):
        await core.fs.rmdir(scope, b"ws", CALLER)
    await core.fs.unlink(await core.resolve(WS), b"f", CALLER)
    await core.fs.rmdir(scope, b"ws", CALLER)
    assert not await core.exists(WS)
    assert core.store.index.count_namespaces() == 0


async def test_rmdir_non_empty_scope_and_sandbox(core: Core) -> None:
    with pytest.raises(NotEmpty):
        await core.fs.rmdir(await core.resolve("acme"), b"shared", CALLER)
    with pytest.raises(NotEmpty):
        await core.fs.rmdir(ROOT_INODE, b"acme", CALLER)
    await core.fs.rmdir(await core.resolve("acme/shared"), b"ws", CALLER)
    await core.fs.rmdir(await core.resolve("acme"), b"shared", CALLER)
    await core.fs.rmdir(ROOT_INODE, b"acme", CALLER)
    assert await core.listdir("") == []
    assert (await core.fs.getattr(ROOT_INODE)).nlink == 2


async def test_namespace_events(core: Core) -> None:
    ns_id = (await core.fs.getxattr(await core.resolve(WS), NSX)).decode()
    scope = await core.resolve("acme/shared")
    await core.fs.rmdir(scope, b"ws", CALLER)
    evs = core.store.index.events(type_prefix="namespace.")
    assert [e.type for e in evs] == ["namespace.create", "namespace.destroy"]
    create, destroy = evs
    assert create.sandbox == "acme" and destroy.sandbox == "acme"
    assert create.payload == {
        "id": ns_id,
        "kind": "workspace",
        "sandbox": "acme",
        "scope": "shared",
        "name": "ws",
        "owner": str(CALLER.uid),
    }
    assert destroy.payload == {
        "id": ns_id,
        "kind": "workspace",
        "name": "ws",
        "scope": "shared",
        "sandbox": "acme",
        "checkpoints_deleted": [],
    }


async def test_namespace_rename_within_scope(core: Core) -> None:
    await core.write_file(p("f"), b"kept")
    before = await core.fs.getxattr(await core.resolve(WS), NSX)
    scope = await core.resolve("acme/shared")
    await core.fs.rename(scope, b"ws", scope, b"renamed", 0, CALLER)
    assert await core.listdir("acme/shared") == [b"renamed"]
    assert await core.read_file("acme/shared/renamed/f") == b"kept"
    assert await core.fs.getxattr(await core.resolve("acme/shared/renamed"), NSX) == before
    ev = core.store.index.events(type_prefix="namespace.rename")
    assert len(ev) == 1
    assert ev[0].payload == {
        "id": before.decode(),
        "from": "ws",
        "to": "renamed",
        "sandbox": "acme",
        "scope": "shared",
    }
    ns = core.store.index.namespace_by_root(await core.resolve("acme/shared/renamed"))
    assert ns is not None and ns.name == "renamed"


async def test_namespace_rename_over_empty_namespace(core: Core) -> None:
    await core.mkdir("acme/shared/other")
    old_id = (await core.fs.getxattr(await core.resolve("acme/shared/other"), NSX)).decode()
    scope = await core.resolve("acme/shared")
    await core.fs.rename(scope, b"ws", scope, b"other", 0, CALLER)
    assert await core.listdir("acme/shared") == [b"other"]
    assert core.store.index.count_namespaces() == 1
    destroyed = core.store.index.events(type_prefix="namespace.destroy")
    assert [e.payload["id"] for e in destroyed] == [old_id]
    assert (await core.attr("acme/shared")).nlink == 3


async def test_namespace_rename_over_non_empty_namespace(core: Core) -> None:
    await core.mkdir("acme/shared/other")
    await core.write_file("acme/shared/other/f", b"x")
    scope = await core.resolve("acme/shared")
    with pytest.raises(NotEmpty):
        await core.fs.rename(scope, b"ws", scope, b"other", 0, CALLER)
    assert sorted(await core.listdir("acme/shared")) == [b"other", b"ws"]


async def test_namespace_rename_invalid_name(core: Core) -> None:
    scope = await core.resolve("acme/shared")
    with pytest.raises(NameTooLong):
        await core.fs.rename(scope, b"ws", scope, b"x" * 256, 0, CALLER)
    with pytest.raises(InvalidName):
        await core.fs.rename(scope, b"ws", scope, b".snapshots", 0, CALLER)
    assert await core.listdir("acme/shared") == [b"ws"]


async def test_rename_namespace_across_scopes(core: Core) -> None:
    await core.mkdir("acme/user-alice")
    with pytest.raises(CrossDevice):
        await core.fs.rename(
            await core.resolve("acme/shared"),
            b"ws",
            await core.resolve("acme/user-alice"),
            b"ws",
            0,
            CALLER,
        )
    assert await core.exists(WS)


async def test_rename_namespace_across_sandboxes(core: Core) -> None:
    await core.makedirs("beta/shared")
    with pytest.raises(CrossDevice):
        await core.fs.rename(
            await core.resolve("acme/shared"),
            b"ws",
            await core.resolve("beta/shared"),
            b"ws",
            0,
            CALLER,
        )
    assert await core.exists(WS)


async def test_rename_between_workspace_and_grid(core: Core) -> None:
    await core.mkdir(p("d"))
    await core.write_file(p("f"), b"x")
    ws, scope = await core.resolve(WS), await core.resolve("acme/shared")
    with pytest.raises(CrossDevice):
        await core.fs.rename(ws, b"d", scope, b"d", 0, CALLER)
    with pytest.raises(CrossDevice):
        await core.fs.rename(ws, b"f", scope, b"f", 0, CALLER)
    with pytest.raises(CrossDevice):
        await core.fs.rename(scope, b"ws", ws, b"inner", 0, CALLER)


async def test_rename_between_workspaces(core: Core) -> None:
    await core.mkdir("acme/shared/ws2")
    await core.write_file(p("f"), b"x")
    with pytest.raises(CrossDevice):
        await core.fs.rename(
            await core.resolve(WS), b"f", await core.resolve("acme/shared/ws2"), b"f", 0, CALLER
        )
    assert await core.read_file(p("f")) == b"x"


async def test_link_between_workspaces(core: Core) -> None:
    await core.mkdir("acme/shared/ws2")
    await core.write_file(p("f"), b"x")
    with pytest.raises(CrossDevice):
        await core.fs.link(
            await core.resolve(p("f")), await core.resolve("acme/shared/ws2"), b"f", CALLER
        )
    with pytest.raises(CrossDevice):
        await core.fs.link(
            await core.resolve(p("f")), await core.resolve("acme/shared"), b"f", CALLER
        )


async def test_scopes_cannot_be_renamed(core: Core) -> None:
    acme = await core.resolve("acme")
    with pytest.raises(NotPermitted):
        await core.fs.rename(acme, b"shared", acme, b"user-bob", 0, CALLER)


async def test_sandbox_rename(core: Core) -> None:
    await core.fs.rename(ROOT_INODE, b"acme", ROOT_INODE, b"acme2", 0, CALLER)
    assert await core.listdir("") == [b"acme2"]
    assert await core.exists("acme2/shared/ws")
    ev = core.store.index.events(type_prefix="sandbox.rename")
    assert [e.payload for e in ev] == [{"from": "acme", "to": "acme2"}]


async def test_files_not_permitted_at_root_and_sandbox(core: Core) -> None:
    acme = await core.resolve("acme")
    for parent in (ROOT_INODE, acme):
        with pytest.raises(NotPermitted):
            await core.fs.create(parent, b"f", 0o644, os.O_WRONLY, CALLER)
        with pytest.raises(NotPermitted):
            await core.fs.mknod(parent, b"f", stat.S_IFREG | 0o644, 0, CALLER)
        with pytest.raises(NotPermitted):
            await core.fs.symlink(parent, b"s", b"target", CALLER)
    assert await core.listdir("") == [b"acme"]
    assert await core.listdir("acme") == [b"shared"]


async def test_only_dirs_and_files_in_scope(core: Core) -> None:
    scope = await core.resolve("acme/shared")
    with pytest.raises(NotPermitted):
        await core.fs.symlink(scope, b"s", b"target", CALLER)
    with pytest.raises(NotPermitted):
        await core.fs.mknod(scope, b"fifo", stat.S_IFIFO | 0o644, 0, CALLER)


async def test_blob_namespace(core: Core) -> None:
    data = pattern(3 * BLOCK + 17)
    await core.write_file("acme/shared/blob.bin", data)
    attr = await core.attr("acme/shared/blob.bin")
    assert attr.kind is NodeKind.FILE and attr.size == len(data) and attr.nlink == 1
    assert await core.read_file("acme/shared/blob.bin") == data
    assert await core.sha256_xattr("acme/shared/blob.bin") == hashlib.sha256(data).hexdigest()
    ns = core.store.index.namespace_by_root(attr.ino)
    assert ns is not None and ns.kind == "blob" and ns.name == "blob.bin"
    assert (await core.fs.getxattr(attr.ino, NSX)).decode() == ns.public_id
    # Computed attributes are answered by name, never listed (cp -a would copy them out).
    assert await core.fs.listxattr(attr.ino) == []
    await core.fs.unlink(await core.resolve("acme/shared"), b"blob.bin", CALLER)
    assert not await core.exists("acme/shared/blob.bin")
    evs = core.store.index.events(type_prefix="namespace.")
    assert [(e.type, e.payload["kind"], e.payload["id"]) for e in evs[1:]] == [
        ("namespace.create", "blob", ns.public_id),
        ("namespace.destroy", "blob", ns.public_id),
    ]


async def test_blob_namespace_rename(core: Core) -> None:
    await core.write_file("acme/shared/a", b"A")
    await core.write_file("acme/shared/b", b"B")
    scope = await core.resolve("acme/shared")
    await core.fs.rename(scope, b"a", scope, b"b", 0, CALLER)
    assert await core.read_file("acme/shared/b") == b"A"
    assert sorted(await core.listdir("acme/shared")) == [b"b", b"ws"]
    assert core.store.index.count_namespaces() == 2
    with pytest.raises(NotADirectory):
        await core.fs.rename(scope, b"ws", scope, b"b", 0, CALLER)
    with pytest.raises(IsADirectory):
        await core.fs.rename(scope, b"b", scope, b"ws", 0, CALLER)


async def test_grid_dirs_cannot_be_truncated_or_chowned(core: Core) -> None:
    for path in ("acme", "acme/shared"):
        with pytest.raises(NotPermitted):
            await core.fs.setattr(await core.resolve(path), AttrChanges(uid=1234), CALLER)


# ==== POSIX inside a workspace ===============================================================


async def test_nested_dirs_and_nlink(core: Core) -> None:
    await core.makedirs(p("a/b/c"))
    await core.mkdir(p("a/b2"))
    await core.write_file(p("a/f"), b"x")
    assert (await core.attr(WS)).nlink == 3
    assert (await core.attr(p("a"))).nlink == 4
    assert (await core.attr(p("a/b"))).nlink == 3
    assert (await core.attr(p("a/b/c"))).nlink == 2
    assert (await core.attr(p("a/f"))).nlink == 1
    await core.fs.rmdir(await core.resolve(p("a/b")), b"c", CALLER)
    assert (await core.attr(p("a/b"))).nlink == 2


async def test_lookup_errors(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    ws = await core.resolve(WS)
    with pytest.raises(NotFound):
        await core.fs.lookup(ws, b"missing", CALLER)
    with pytest.raises(NotADirectory):
        await core.fs.lookup(await core.resolve(p("f")), b"x", CALLER)
    with pytest.raises(NameTooLong):
        await core.fs.lookup(ws, b"x" * 256, CALLER)


async def test_dot_and_dotdot(core: Core) -> None:
    await core.makedirs(p("a/b"))
    b = await core.resolve(p("a/b"))
    assert (await core.fs.lookup(b, b".", CALLER)).ino == b
    assert (await core.fs.lookup(b, b"..", CALLER)).ino == await core.resolve(p("a"))
    assert (await core.fs.lookup(ROOT_INODE, b"..", CALLER)).ino == ROOT_INODE


async def test_names_inside_workspace(core: Core) -> None:
    ws = await core.resolve(WS)
    await core.fs.mkdir(ws, b"\xff\xfe not utf-8", 0o755, CALLER)
    await core.fs.mkdir(ws, b"n" * 255, 0o755, CALLER)
    for name, error in (
        (b"n" * 256, NameTooLong),
        (b"a/b", InvalidName),
        (b"a\0b", InvalidName),
        (b".snapshots", InvalidName),
    ):
        with pytest.raises(error):
            await core.fs.mkdir(ws, name, 0o755, CALLER)
        with pytest.raises(error):
            await core.fs.create(ws, name, 0o644, os.O_WRONLY, CALLER)
    # .snapshots is reserved only at the top of a workspace.
    await core.mkdir(p("sub"))
    await core.mkdir(p("sub/.snapshots"))


async def test_mkdir_and_create_existing(core: Core) -> None:
    await core.mkdir(p("d"))
    await core.write_file(p("f"), b"")
    ws = await core.resolve(WS)
    for name in (b"d", b"f"):
        with pytest.raises(Exists):
            await core.fs.mkdir(ws, name, 0o755, CALLER)
        with pytest.raises(Exists):
            await core.fs.create(ws, name, 0o644, os.O_WRONLY, CALLER)
        with pytest.raises(Exists):
            await core.fs.symlink(ws, name, b"t", CALLER)


async def test_rmdir_and_unlink_errors(core: Core) -> None:
    await core.makedirs(p("d/e"))
    await core.write_file(p("f"), b"")
    ws = await core.resolve(WS)
    with pytest.raises(NotEmpty):
        await core.fs.rmdir(ws, b"d", CALLER)
    with pytest.raises(NotADirectory):
        await core.fs.rmdir(ws, b"f", CALLER)
    with pytest.raises(IsADirectory):
        await core.fs.unlink(ws, b"d", CALLER)
    with pytest.raises(NotFound):
        await core.fs.unlink(ws, b"missing", CALLER)
    with pytest.raises(NotFound):
        await core.fs.rmdir(ws, b"missing", CALLER)


async def test_create_in_removed_directory(core: Core) -> None:
    d = await core.mkdir(p("d"))
    await core.fs.rmdir(await core.resolve(WS), b"d", CALLER)
    with pytest.raises(NotFound):
        await core.fs.create(d.ino, b"f", 0o644, os.O_WRONLY, CALLER)
    with pytest.raises(NotFound):
        await core.fs.mkdir(d.ino, b"e", 0o755, CALLER)


async def test_rename_file_over_file(core: Core) -> None:
    await core.write_file(p("a"), b"AAAA")
    await core.write_file(p("b"), b"BB")
    ws = await core.resolve(WS)
    old_b = await core.resolve(p("b"))
    await core.fs.rename(ws, b"a", ws, b"b", 0, CALLER)
    assert await core.listdir(WS) == [b"b"]
    assert await core.read_file(p("b")) == b"AAAA"
    assert (await core.fs.getattr(old_b)).nlink == 0  # kernel still holds it until forget


async def test_rename_over_hard_linked_file(core: Core) -> None:
    await core.write_file(p("a"), b"A")
    await core.write_file(p("b"), b"B")
    ws = await core.resolve(WS)
    await core.fs.link(await core.resolve(p("b")), ws, b"c", CALLER)
    await core.fs.rename(ws, b"a", ws, b"b", 0, CALLER)
    assert (await core.attr(p("c"))).nlink == 1
    assert await core.read_file(p("c")) == b"B"
    assert await core.read_file(p("b")) == b"A"


async def test_rename_dir_over_empty_dir(core: Core) -> None:
    await core.makedirs(p("a/x"))
    await core.mkdir(p("b"))
    ws = await core.resolve(WS)
    await core.fs.rename(ws, b"a", ws, b"b", 0, CALLER)
    assert await core.listdir(WS) == [b"b"]
    assert await core.listdir(p("b")) == [b"x"]
    assert (await core.attr(WS)).nlink == 3


async def test_rename_dir_over_non_empty_dir(core: Core) -> None:
    await core.mkdir(p("a"))
    await core.makedirs(p("b/x"))
    ws = await core.resolve(WS)
    with pytest.raises(NotEmpty):
        await core.fs.rename(ws, b"a", ws, b"b", 0, CALLER)


async def test_rename_type_mismatch(core: Core) -> None:
    await core.mkdir(p("d"))
    await core.write_file(p("f"), b"")
    ws = await core.resolve(WS)
    with pytest.raises(IsADirectory):
        await core.fs.rename(ws, b"f", ws, b"d", 0, CALLER)
    with pytest.raises(NotADirectory):
        await core.fs.rename(ws, b"d", ws, b"f", 0, CALLER)


async def test_rename_missing_source(core: Core) -> None:
    ws = await core.resolve(WS)
    with pytest.raises(NotFound):
        await core.fs.rename(ws, b"missing", ws, b"x", 0, CALLER)


async def test_rename_dir_between_parents(core: Core) -> None:
    await core.makedirs(p("a/moved/inner"))
    await core.mkdir(p("b"))
    await core.fs.rename(
        await core.resolve(p("a")), b"moved", await core.resolve(p("b")), b"here", 0, CALLER
    )
    assert (await core.attr(p("a"))).nlink == 2
    assert (await core.attr(p("b"))).nlink == 3
    assert (await core.attr(p("b/here"))).nlink == 3
    here = await core.resolve(p("b/here"))
    assert (await core.fs.lookup(here, b"..", CALLER)).ino == await core.resolve(p("b"))


async def test_rename_noreplace(core: Core) -> None:
    await core.write_file(p("a"), b"A")
    await core.write_file(p("b"), b"B")
    ws = await core.resolve(WS)
    with pytest.raises(Exists):
        await core.fs.rename(ws, b"a", ws, b"b", RENAME_NOREPLACE, CALLER)
    assert await core.read_file(p("b")) == b"B"
    await core.fs.rename(ws, b"a", ws, b"c", RENAME_NOREPLACE, CALLER)
    assert sorted(await core.listdir(WS)) == [b"b", b"c"]


async def test_rename_exchange_files(core: Core) -> None:
    await core.write_file(p("a"), b"A")
    await core.write_file(p("b"), b"BB")
    ws = await core.resolve(WS)
    a, b = await core.resolve(p("a")), await core.resolve(p("b"))
    await core.fs.rename(ws, b"a", ws, b"b", RENAME_EXCHANGE, CALLER)
    assert await core.read_file(p("a")) == b"BB"
    assert await core.read_file(p("b")) == b"A"
    assert (await core.resolve(p("a")), await core.resolve(p("b"))) == (b, a)


async def test_rename_exchange_file_and_dir_across_parents(core: Core) -> None:
    await core.makedirs(p("x/dir/sub"))
    await core.mkdir(p("y"))
    await core.write_file(p("y/file"), b"F")
    await core.fs.rename(
        await core.resolve(p("x")),
        b"dir",
        await core.resolve(p("y")),
        b"file",
        RENAME_EXCHANGE,
        CALLER,
    )
    assert await core.read_file(p("x/dir")) == b"F"
    assert await core.listdir(p("y/file")) == [b"sub"]
    assert (await core.attr(p("x"))).nlink == 2
    assert (await core.attr(p("y"))).nlink == 3
    moved = await core.resolve(p("y/file"))
    assert (await core.fs.lookup(moved, b"..", CALLER)).ino == await core.resolve(p("y"))


async def test_rename_exchange_missing_target(core: Core) -> None:
    await core.write_file(p("a"), b"A")
    ws = await core.resolve(WS)
    with pytest.raises(NotFound):
        await core.fs.rename(ws, b"a", ws, b"b", RENAME_EXCHANGE, CALLER)


async def test_rename_dir_into_own_subdir(core: Core) -> None:
    await core.makedirs(p("a/b/c"))
    ws = await core.resolve(WS)
    with pytest.raises(InvalidArgument):
        await core.fs.rename(ws, b"a", await core.resolve(p("a/b/c")), b"a", 0, CALLER)
    with pytest.raises(InvalidArgument):
        await core.fs.rename(ws, b"a", await core.resolve(p("a")), b"self", 0, CALLER)
    assert await core.exists(p("a/b/c"))


async def test_rename_exchange_dir_with_own_descendant(core: Core) -> None:
    """Exchanging a directory with something inside it would make it its own ancestor."""
    await core.makedirs(p("a/b"))
    ws = await core.resolve(WS)
    with pytest.raises(InvalidArgument):
        await core.fs.rename(ws, b"a", await core.resolve(p("a")), b"b", RENAME_EXCHANGE, CALLER)
    assert await core.exists(p("a/b"))
    assert core.store.index.parent_of(await core.resolve(p("a")))[0] == ws  # type: ignore[index]


async def test_rename_between_hard_links_is_a_no_op(core: Core) -> None:
    await core.write_file(p("a"), b"A")
    ws = await core.resolve(WS)
    await core.fs.link(await core.resolve(p("a")), ws, b"b", CALLER)
    await core.fs.rename(ws, b"a", ws, b"b", 0, CALLER)
    assert sorted(await core.listdir(WS)) == [b"a", b"b"]
    assert (await core.attr(p("a"))).nlink == 2


async def test_rename_moves_ctime(core: Core) -> None:
    await core.write_file(p("a"), b"A")
    ws = await core.resolve(WS)
    before = await core.attr(p("a"))
    await trio.sleep(0.002)
    await core.fs.rename(ws, b"a", ws, b"b", 0, CALLER)
    after = await core.attr(p("b"))
    assert after.ctime_ns > before.ctime_ns and after.mtime_ns == before.mtime_ns


async def test_hard_links(core: Core) -> None:
    data = pattern(BLOCK + 5)
    await core.write_file(p("a"), data)
    await core.mkdir(p("d"))
    ino = await core.resolve(p("a"))
    attr = await core.fs.link(ino, await core.resolve(p("d")), b"b", CALLER)
    assert attr.ino == ino and attr.nlink == 2
    assert (await core.attr(p("a"))).nlink == 2
    await core.write_file(p("d/b"), b"ZZ", offset=1)
    expected = data[:1] + b"ZZ" + data[3:]
    assert await core.read_file(p("a")) == expected
    await core.fs.unlink(await core.resolve(WS), b"a", CALLER)
    assert (await core.attr(p("d/b"))).nlink == 1
    assert await core.read_file(p("d/b")) == expected


async def test_link_errors(core: Core) -> None:
    await core.mkdir(p("d"))
    await core.write_file(p("f"), b"")
    await core.write_file(p("g"), b"")
    ws = await core.resolve(WS)
    with pytest.raises(NotPermitted):
        await core.fs.link(await core.resolve(p("d")), ws, b"d2", CALLER)
    with pytest.raises(Exists):
        await core.fs.link(await core.resolve(p("f")), ws, b"g", CALLER)
    f = await core.resolve(p("f"))
    await core.fs.unlink(ws, b"f", CALLER)
    with pytest.raises(NotFound):
        await core.fs.link(f, ws, b"again", CALLER)


async def test_symlink(core: Core) -> None:
    target = b"../some/where/\xff"
    attr = await core.fs.symlink(await core.resolve(WS), b"s", target, CALLER)
    assert stat.S_ISLNK(attr.mode) and attr.size == len(target) and attr.nlink == 1
    assert attr.kind is NodeKind.SYMLINK
    assert await core.fs.readlink(attr.ino) == target
    await core.fs.link(attr.ino, await core.resolve(WS), b"s2", CALLER)
    assert await core.fs.readlink(await core.resolve(p("s2"))) == target
    await core.write_file(p("f"), b"x")
    with pytest.raises(InvalidArgument):
        await core.fs.readlink(await core.resolve(p("f")))
    with pytest.raises(NotSupported):
        await core.fs.open(attr.ino, os.O_RDONLY, CALLER)


async def test_mknod_fifo(core: Core) -> None:
    attr = await core.fs.mknod(await core.resolve(WS), b"fifo", stat.S_IFIFO | 0o640, 0, CALLER)
    assert stat.S_ISFIFO(attr.mode) and stat.S_IMODE(attr.mode) == 0o640
    assert attr.kind is NodeKind.SPECIAL
    assert (await core.attr(p("fifo"))).ino == attr.ino


async def test_mknod_regular_file(core: Core) -> None:
    attr = await core.fs.mknod(await core.resolve(WS), b"f", stat.S_IFREG | 0o600, 0, CALLER)
    assert stat.S_ISREG(attr.mode) and attr.size == 0
    assert await core.read_file(p("f")) == b""


async def test_setattr_mode(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    await core.mkdir(p("d"))
    for path, fmt in ((p("f"), stat.S_IFREG), (p("d"), stat.S_IFDIR)):
        before = await core.attr(path)
        await trio.sleep(0.002)
        attr = await core.fs.setattr(before.ino, AttrChanges(mode=0o4751), CALLER)
        assert attr.mode == fmt | 0o4751
        assert (await core.attr(path)).mode == fmt | 0o4751
        assert attr.ctime_ns > before.ctime_ns and attr.mtime_ns == before.mtime_ns


async def test_setattr_uid_gid(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    await core.fs.setattr(ino, AttrChanges(uid=1234, gid=5678), CALLER)
    attr = await core.attr(p("f"))
    assert (attr.uid, attr.gid) == (1234, 5678)
    await core.fs.setattr(ino, AttrChanges(gid=42), CALLER)
    attr = await core.attr(p("f"))
    assert (attr.uid, attr.gid) == (1234, 42)


async def test_setattr_times_nanoseconds(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    atime, mtime = 1_234_567_890_123_456_789, 987_654_321_987_654_321
    await core.fs.setattr(ino, AttrChanges(atime_ns=atime, mtime_ns=mtime), CALLER)
    attr = await core.attr(p("f"))
    assert (attr.atime_ns, attr.mtime_ns) == (atime, mtime)
    assert attr.ctime_ns > mtime
    await core.fs.setattr(ino, AttrChanges(atime_ns=atime + 1), CALLER)
    attr = await core.attr(p("f"))
    assert (attr.atime_ns, attr.mtime_ns) == (atime + 1, mtime)


async def test_setattr_times_on_open_file_survive_release(core: Core) -> None:
    fh = await core.create(p("f"))
    await core.fs.write(fh, 0, b"data")
    mtime = 1_000_000_000_123_456_789
    await core.fs.setattr(await core.resolve(p("f")), AttrChanges(mtime_ns=mtime), CALLER)
    await core.fs.release(fh)
    attr = await core.attr(p("f"))
    assert attr.mtime_ns == mtime and attr.size == 4


async def test_write_moves_mtime_and_ctime(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    before = await core.attr(p("f"))
    await trio.sleep(0.002)
    await core.write_file(p("f"), b"y", offset=1)
    after = await core.attr(p("f"))
    assert after.mtime_ns > before.mtime_ns and after.ctime_ns > before.ctime_ns


async def test_create_moves_parent_mtime(core: Core) -> None:
    before = await core.attr(WS)
    await trio.sleep(0.002)
    await core.write_file(p("f"), b"")
    assert (await core.attr(WS)).mtime_ns > before.mtime_ns
    mid = await core.attr(WS)
    await trio.sleep(0.002)
    await core.fs.unlink(await core.resolve(WS), b"f", CALLER)
    assert (await core.attr(WS)).mtime_ns > mid.mtime_ns


# ---- contents -------------------------------------------------------------------------------


async def test_write_read_multi_block(core: Core) -> None:
    data = pattern(5 * BLOCK + 123)
    await core.write_file(p("f"), data)
    assert await core.read_file(p("f")) == data
    attr = await core.attr(p("f"))
    assert attr.size == len(data) and attr.stored == len(data)


async def test_read_ranges(core: Core) -> None:
    data = pattern(3 * BLOCK)
    await core.write_file(p("f"), data)
    fh = await core.open(p("f"))
    try:
        for off, n in (
            (0, 1),
            (BLOCK - 1, 2),
            (BLOCK - 10, BLOCK + 20),
            (2 * BLOCK, BLOCK),
            (3 * BLOCK - 1, 100),
            (3 * BLOCK, 10),
            (10 * BLOCK, 10),
        ):
            assert await core.fs.read(fh, off, n) == data[off : off + n]
    finally:
        await core.fs.release(fh)


@pytest.mark.parametrize(
    ("off", "n"),
    [
        (0, 10),
        (BLOCK - 3, 6),
        (BLOCK, BLOCK),
        (BLOCK + 1, 2 * BLOCK),
        (3 * BLOCK - 1, 1),
        (2 * BLOCK + 100, 3 * BLOCK),
    ],
)
async def test_write_at_offsets_spanning_blocks(core: Core, off: int, n: int) -> None:
    base = pattern(3 * BLOCK, seed=1)
    await core.write_file(p("f"), base)
    new = pattern(n, seed=2)
    await core.write_file(p("f"), new, offset=off)
    expected = bytearray(base)
    if off + n > len(expected):
        expected.extend(bytes(off + n - len(expected)))
    expected[off : off + n] = new
    assert await core.read_file(p("f")) == bytes(expected)
    assert (await core.attr(p("f"))).size == len(expected)


async def test_unflushed_writes_are_visible_to_other_handles(core: Core) -> None:
    data = pattern(2 * BLOCK + 7)
    fh = await core.create(p("f"))
    try:
        await core.write_all(fh, 0, data)
        assert await core.read_file(p("f")) == data
        assert (await core.attr(p("f"))).size == len(data)
    finally:
        await core.fs.release(fh)


async def test_overwrite_same_block_repeatedly(core: Core) -> None:
    fh = await core.create(p("f"))
    try:
        for i in range(20):
            await core.fs.write(fh, 0, bytes([i + 1]) * BLOCK)
        await core.fs.flush(fh)
    finally:
        await core.fs.release(fh)
    assert await core.read_file(p("f")) == bytes([20]) * BLOCK


@pytest.mark.parametrize(
    "sizes",
    [
        [5000],
        [BLOCK],
        [BLOCK - 1],
        [0],
        [BLOCK + 1, 3 * BLOCK + 5],
        [2 * BLOCK + 10, 10],
        [10_000, 20_000],
        [100, 3 * BLOCK, 1, 2 * BLOCK],
    ],
)
async def test_truncate(core: Core, sizes: list[int]) -> None:
    data = pattern(3 * BLOCK + 100)
    await core.write_file(p("f"), data)
    ino = await core.resolve(p("f"))
    expected = bytearray(data)
    for size in sizes:
        await core.fs.setattr(ino, AttrChanges(size=size), CALLER)
        del expected[size:]
        expected.extend(bytes(size - len(expected)))
        assert (await core.fs.getattr(ino)).size == size
        assert await core.read_file(p("f")) == bytes(expected)


async def test_truncate_down_then_up_reads_zeros(core: Core) -> None:
    await core.write_file(p("f"), b"\x01" * (3 * BLOCK))
    ino = await core.resolve(p("f"))
    await core.fs.setattr(ino, AttrChanges(size=BLOCK + 10), CALLER)
    await core.fs.setattr(ino, AttrChanges(size=3 * BLOCK), CALLER)
    assert await core.read_file(p("f")) == b"\x01" * (BLOCK + 10) + bytes(2 * BLOCK - 10)


async def test_ftruncate_with_unflushed_writes(core: Core) -> None:
    fh = await core.create(p("f"))
    try:
        await core.write_all(fh, 0, b"\x02" * (3 * BLOCK))
        await core.fs.setattr(await core.resolve(p("f")), AttrChanges(size=BLOCK + 1), CALLER)
        await core.fs.write(fh, 2 * BLOCK, b"\x03")
        assert await core.read_fh(fh) == b"\x02" * (BLOCK + 1) + bytes(BLOCK - 1) + b"\x03"
    finally:
        await core.fs.release(fh)
    assert await core.read_file(p("f")) == b"\x02" * (BLOCK + 1) + bytes(BLOCK - 1) + b"\x03"


async def test_truncate_errors(core: Core) -> None:
    await core.mkdir(p("d"))
    await core.fs.symlink(await core.resolve(WS), b"s", b"t", CALLER)
    with pytest.raises(IsADirectory):
        await core.fs.setattr(await core.resolve(p("d")), AttrChanges(size=0), CALLER)
    with pytest.raises(InvalidArgument):
        await core.fs.setattr(await core.resolve(p("s")), AttrChanges(size=0), CALLER)


async def test_o_trunc(core: Core) -> None:
    await core.write_file(p("f"), pattern(2 * BLOCK))
    fh = await core.open(p("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        await core.fs.write(fh, 0, b"new")
    finally:
        await core.fs.release(fh)
    assert await core.read_file(p("f")) == b"new"


async def test_o_append(core: Core) -> None:
    first = pattern(BLOCK - 10, seed=1)
    await core.write_file(p("f"), first)
    fh = await core.open(p("f"), os.O_WRONLY | os.O_APPEND)
    try:
        await core.fs.write(fh, 0, b"A" * 20)  # the offset is ignored
        await core.fs.write(fh, 5, b"B" * BLOCK)
    finally:
        await core.fs.release(fh)
    assert await core.read_file(p("f")) == first + b"A" * 20 + b"B" * BLOCK


async def test_write_on_read_only_handle(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    fh = await core.open(p("f"), os.O_RDONLY)
    try:
        with pytest.raises(BadHandle):
            await core.fs.write(fh, 0, b"y")
    finally:
        await core.fs.release(fh)
    with pytest.raises(BadHandle):
        await core.fs.read(fh, 0, 1)


async def test_open_directory_for_writing(core: Core) -> None:
    await core.mkdir(p("d"))
    with pytest.raises(IsADirectory):
        await core.fs.open(await core.resolve(p("d")), os.O_WRONLY, CALLER)


async def test_sparse_file(core: Core) -> None:
    far = 100 * BLOCK + 5
    fh = await core.create(p("f"))
    try:
        await core.fs.write(fh, far, b"end")
        await core.fs.write(fh, 3, b"start")
    finally:
        await core.fs.release(fh)
    attr = await core.attr(p("f"))
    assert attr.size == far + 3
    assert attr.stored <= 2 * BLOCK
    data = await core.read_file(p("f"))
    assert data == bytes(3) + b"start" + bytes(far - 8) + b"end"
    assert len(core.store.index.block_map(attr.ino)) == 2


async def test_truncate_up_makes_a_hole(core: Core) -> None:
    await core.write_file(p("f"), b"abc")
    ino = await core.resolve(p("f"))
    await core.fs.setattr(ino, AttrChanges(size=50 * BLOCK), CALLER)
    attr = await core.fs.getattr(ino)
    assert attr.size == 50 * BLOCK and attr.stored <= BLOCK
    assert await core.read_file(p("f")) == b"abc" + bytes(50 * BLOCK - 3)


async def test_zero_blocks_are_holes(core: Core) -> None:
    await core.write_file(p("f"), bytes(4 * BLOCK) + b"x")
    attr = await core.attr(p("f"))
    assert core.store.index.block_map(attr.ino).keys() == {4}
    assert attr.stored == 1
    # Zeroing a stored block turns it back into a hole.
    await core.write_file(p("g"), pattern(2 * BLOCK))
    await core.write_file(p("g"), bytes(BLOCK), offset=0)
    g = await core.resolve(p("g"))
    assert core.store.index.block_map(g).keys() == {1}
    assert await core.read_file(p("g")) == bytes(BLOCK) + pattern(2 * BLOCK)[BLOCK:]


async def test_identical_blocks_stored_once(core: Core) -> None:
    block = pattern(BLOCK)
    await core.write_file(p("a"), block * 3)
    await core.write_file(p("b"), block)
    assert core.store.index.stored_bytes() == (1, BLOCK)


async def test_open_unlinked_file(core: Core) -> None:
    data = pattern(2 * BLOCK + 1)
    fh = await core.create(p("f"), flags=os.O_RDWR)
    try:
        await core.write_all(fh, 0, data)
        ino = await core.resolve(p("f"))
        await core.fs.unlink(await core.resolve(WS), b"f", CALLER)
        assert not await core.exists(p("f"))
        assert (await core.fs.getattr(ino)).nlink == 0
        assert await core.read_fh(fh) == data
        await core.fs.write(fh, len(data), b"more")
        await core.fs.flush(fh)
        assert await core.read_fh(fh) == data + b"more"
    finally:
        await core.fs.release(fh)
    assert (await core.fs.getattr(ino)).nlink == 0  # still referenced by the kernel
    core.fs.forget([(ino, core.fs.lookups[ino])])
    with pytest.raises(NotFound):
        await core.fs.getattr(ino)
    assert core.store.index.block_map(ino) == {}


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_unlinked_inode_left_by_a_crash_is_reclaimed(tmp_path: Path, group: bool) -> None:
    path = tmp_path / "store"
    async with crashing_core(path, group_commit=group) as c:
        await workspace(c, WS)
        fh = await c.create(p("f"))
        await c.fs.write(fh, 0, b"x" * 10)
        await c.fs.flush(fh)
        ino = await c.resolve(p("f"))
        await c.fs.unlink(await c.resolve(WS), b"f", CALLER)
        c.store.index.flush()  # the daemon's group-commit timer
        assert c.store.index.get_inode(ino) is not None
        # ... and the daemon dies with the file open.
    async with open_core(path) as c:
        assert c.store.index.get_inode(ino) is None
        assert not await c.exists(p("f"))


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
@pytest.mark.parametrize(
    "change",
    [AttrChanges(mode=0o600), AttrChanges(uid=1234), AttrChanges(atime_ns=1_000_000_007)],
    ids=["chmod", "chown", "atime"],
)
async def test_crash_after_metadata_change_of_file_with_unflushed_writes(
    tmp_path: Path, change: AttrChanges, group: bool
) -> None:
    """Unflushed writes may be lost in a crash, but the file is then its old content (empty),
    never a run of zeros, and its recorded digest matches what it holds. (`cp -p` and
    `rsync` write, then fchmod/fchown/futimens, then close.)"""
    path = tmp_path / "store"
    async with crashing_core(path, group_commit=group) as c:
        await workspace(c, WS)
        fh = await c.create(p("f"))
        await c.fs.flush(fh)  # the empty file exists for sure
        await c.fs.write(fh, 0, b"x" * 100)  # not flushed
        await c.fs.setattr(await c.resolve(p("f")), change, CALLER)
        c.store.index.flush()  # the daemon's group-commit timer fires
    async with open_core(path) as c:
        content = await c.read_file(p("f"))
        assert content in (b"", b"x" * 100)
        assert (await c.attr(p("f"))).size == len(content)
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(content).hexdigest()


async def test_fsync(core: Core) -> None:
    fh = await core.create(p("f"))
    try:
        await core.write_all(fh, 0, pattern(BLOCK + 1))
        await core.fs.fsync(fh, False)
        row = core.store.index.get_inode(await core.resolve(p("f")))
        assert row is not None and row.size == BLOCK + 1
        assert len(core.store.index.block_map(row.id)) == 2
    finally:
        await core.fs.release(fh)


async def test_readdir_paging(core: Core) -> None:
    ws = await core.resolve(WS)
    names = [f"f{i:04d}".encode() for i in range(600)]
    for n in names:
        await core.fs.mknod(ws, n, stat.S_IFREG | 0o644, 0, CALLER)
    assert await core.listdir(WS) == names
    first = await core.fs.readdir(ws, 0, limit=10)
    assert [e.name for e in first] == names[:10]
    rest = await core.fs.readdir(ws, first[-1].next_offset, limit=10)
    assert [e.name for e in rest] == names[10:20]
    assert all(e.attr.kind is NodeKind.FILE for e in rest)


# ---- extended attributes --------------------------------------------------------------------


async def test_xattrs(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    await core.fs.setxattr(ino, b"user.mime_type", b"text/plain", CALLER)
    await core.fs.setxattr(ino, b"user.summary", b"\x00bin\xff", CALLER)
    await core.fs.setxattr(ino, b"user.empty", b"", CALLER)
    assert await core.fs.getxattr(ino, b"user.mime_type") == b"text/plain"
    assert await core.fs.getxattr(ino, b"user.summary") == b"\x00bin\xff"
    assert await core.fs.getxattr(ino, b"user.empty") == b""
    assert sorted(await core.fs.listxattr(ino)) == sorted(
        [b"user.mime_type", b"user.summary", b"user.empty"]
    )
    await core.fs.setxattr(ino, b"user.mime_type", b"application/json", CALLER)
    assert await core.fs.getxattr(ino, b"user.mime_type") == b"application/json"
    await core.fs.removexattr(ino, b"user.summary", CALLER)
    with pytest.raises(NoData):
        await core.fs.getxattr(ino, b"user.summary")
    with pytest.raises(NoData):
        await core.fs.removexattr(ino, b"user.summary", CALLER)
    assert b"user.summary" not in await core.fs.listxattr(ino)


async def test_xattrs_on_directories(core: Core) -> None:
    d = (await core.mkdir(p("d"))).ino
    await core.fs.setxattr(d, b"user.k", b"v", CALLER)
    assert await core.fs.getxattr(d, b"user.k") == b"v"
    assert await core.fs.listxattr(d) == [b"user.k"]
    with pytest.raises(NoData):
        await core.fs.getxattr(d, SHA)
    with pytest.raises(NoData):
        await core.fs.getxattr(d, NSX)


async def test_xattr_change_moves_ctime(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    before = await core.attr(p("f"))
    await trio.sleep(0.002)
    await core.fs.setxattr(before.ino, b"user.k", b"v", CALLER)
    mid = await core.attr(p("f"))
    assert mid.ctime_ns > before.ctime_ns and mid.mtime_ns == before.mtime_ns
    await trio.sleep(0.002)
    await core.fs.removexattr(before.ino, b"user.k", CALLER)
    assert (await core.attr(p("f"))).ctime_ns > mid.ctime_ns


async def test_namespace_xattr(core: Core) -> None:
    ws = await core.resolve(WS)
    value = await core.fs.getxattr(ws, NSX)
    ns = core.store.index.namespace_by_root(ws)
    assert ns is not None and value == ns.public_id.encode()
    assert NSX not in await core.fs.listxattr(ws)  # by name only
    await core.mkdir(p("d"))
    with pytest.raises(NoData):
        await core.fs.getxattr(await core.resolve(p("d")), NSX)


@pytest.mark.parametrize("name", [SHA, NSX])
async def test_readonly_xattrs(core: Core, name: bytes) -> None:
    await core.write_file(p("f"), b"x")
    for path in (p("f"), WS):
        ino = await core.resolve(path)
        with pytest.raises(NotPermitted):
            await core.fs.setxattr(ino, name, b"forged", CALLER)
        with pytest.raises(NotPermitted):
            await core.fs.removexattr(ino, name, CALLER)
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(b"x").hexdigest()


async def test_xattr_limits(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    await core.fs.setxattr(ino, b"user.a", b"a" * 40_000, CALLER)
    with pytest.raises(NoSpace):
        await core.fs.setxattr(ino, b"user.b", b"b" * 40_000, CALLER)
    await core.fs.setxattr(ino, b"user.a", b"a" * 60_000, CALLER)  # replacing fits
    with pytest.raises(OutOfRange):
        await core.fs.setxattr(ino, b"user." + b"n" * 251, b"", CALLER)
    with pytest.raises(NotSupported):
        await core.fs.setxattr(ino, b"other.x", b"", CALLER)
    assert await core.fs.listxattr(ino) == [b"user.a"]


async def test_names_that_are_never_stored_answer_nodata_without_a_query(core: Core) -> None:
    """`ls -l` and `cp -a` probe system.posix_acl_* on every file: ENODATA, from no query;
    and a name outside the stored namespaces that a checkpoint import brought in is neither
    listed nor answered, so listing and reading agree."""
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    core.store.index.flush()
    statements: list[str] = []
    core.store.index.conn.set_trace_callback(statements.append)
    for name in (b"system.posix_acl_access", b"system.posix_acl_default", b"system.x"):
        with pytest.raises(NoData):
            await core.fs.getxattr(ino, name)
    core.store.index.conn.set_trace_callback(None)
    assert statements == []
    with pytest.raises(NotSupported):
        await core.fs.setxattr(ino, b"system.x", b"v", CALLER)
    with core.store.index.txn():
        core.store.index.replace_xattrs(ino, {b"system.x": b"v", b"user.k": b"w"})
    assert await core.fs.listxattr(ino) == [b"user.k"]
    with pytest.raises(NoData):
        await core.fs.getxattr(ino, b"system.x")


async def test_minimal_access_acl_sets_the_permission_bits(core: Core) -> None:
    """`setfacl -m u::rw,g::r,o::-` and `cp -a` set an ACL the mode expresses: a chmod of the
    permission bits (set-id and sticky bits stay), with nothing stored."""
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    await core.fs.setattr(ino, AttrChanges(mode=0o4755), CALLER)
    before = await core.attr(p("f"))
    await trio.sleep(0.002)
    await core.fs.setxattr(ino, ACL_ACCESS, minimal_acl(0o640), CALLER)
    after = await core.attr(p("f"))
    assert after.mode == stat.S_IFREG | 0o4640
    assert after.ctime_ns > before.ctime_ns and after.mtime_ns == before.mtime_ns
    with pytest.raises(NoData):
        await core.fs.getxattr(ino, ACL_ACCESS)
    assert await core.fs.listxattr(ino) == []
    d = (await core.mkdir(p("d"))).ino
    await core.fs.setxattr(d, ACL_ACCESS, minimal_acl(0o701), CALLER)
    assert (await core.attr(p("d"))).mode == stat.S_IFDIR | 0o701


@pytest.mark.parametrize(
    ("caller", "kept"),
    [
        (Caller(uid=1000, gid=1000), False),  # owner outside the file's group
        (Caller(uid=1000, gid=500), True),  # in it by its primary group
        (Caller(uid=1000, gid=1000, groups=(7, 500)), True),  # by a supplementary one
        (Caller(uid=1000, gid=1000, pid=os.getpid()), os.getgid() == 500 or 500 in os.getgroups()),
        (Caller(uid=0, gid=0), True),
    ],
)
async def test_acl_keeps_setgid_only_for_a_caller_in_the_group(
    core: Core, caller: Caller, kept: bool
) -> None:
    await core.write_file(p("f"), b"x")
    ino = await core.resolve(p("f"))
    await core.fs.setattr(ino, AttrChanges(uid=1000, gid=500), CALLER)
    await core.fs.setattr(ino, AttrChanges(mode=0o2755), CALLER)
    await core.fs.setxattr(ino, ACL_ACCESS, minimal_acl(0o750), caller)
    assert (await core.attr(p("f"))).mode == stat.S_IFREG | (0o2750 if kept else 0o750)


async def test_acls_the_mode_cannot_express_are_refused(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    d = (await core.mkdir(p("d"))).ino
    ino = await core.resolve(p("f"))
    named = minimal_acl(0o640) + struct.pack("<HHI", 0x02, 4, 1234)  # user:1234:r--
    with pytest.raises(NotSupported):
        await core.fs.setxattr(ino, ACL_ACCESS, named, CALLER)
    with pytest.raises(NotSupported):
        await core.fs.setxattr(d, ACL_DEFAULT, minimal_acl(0o755), CALLER)
    with pytest.raises(InvalidArgument):
        await core.fs.setxattr(ino, ACL_ACCESS, b"\x02\x00\x00\x00garbage", CALLER)
    assert (await core.attr(p("f"))).mode == stat.S_IFREG | 0o644
    assert (await core.attr(p("d"))).mode == stat.S_IFDIR | 0o755


async def test_removing_an_acl_that_is_not_there_succeeds(core: Core) -> None:
    """As on ext4: `cp -a` of a directory removes the copy's default ACL."""
    d = (await core.mkdir(p("d"))).ino
    before = await core.attr(p("d"))
    for name in (ACL_ACCESS, ACL_DEFAULT):
        await core.fs.removexattr(d, name, CALLER)
    assert await core.attr(p("d")) == before


# ---- user.artifactfs.sha256 -----------------------------------------------------------------


async def test_sha256_empty_file(core: Core) -> None:
    await core.write_file(p("f"), b"")
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 17])
async def test_sha256_sequential(core: Core, size: int) -> None:
    data = pattern(size)
    await core.write_file(p("f"), data)
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()


async def test_sha256_of_a_file_whose_first_block_is_a_hole(core: Core) -> None:
    """Block 1 written twice, block 0 never (a hole): the digest kept while writing must not
    start at block 1 (the close's one-hash shortcut is for block 0 only)."""
    fh = await core.create(p("f"))
    try:
        await core.fs.write(fh, BLOCK, pattern(BLOCK))
        await core.fs.write(fh, BLOCK, pattern(BLOCK)[::-1])
    finally:
        await core.fs.flush(fh)
        await core.fs.release(fh)
    want = bytes(BLOCK) + pattern(BLOCK)[::-1]
    assert await core.read_file(p("f")) == want
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(want).hexdigest()


async def test_sha256_random_order_writes(core: Core) -> None:
    data = pattern(6 * BLOCK + 333)
    pieces = [(off, data[off : off + 1500]) for off in range(0, len(data), 1500)]
    random.Random(4).shuffle(pieces)
    fh = await core.create(p("f"))
    try:
        for off, piece in pieces:
            await core.fs.write(fh, off, piece)
    finally:
        await core.fs.release(fh)
    assert await core.read_file(p("f")) == data
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()


async def test_sha256_after_overwrite(core: Core) -> None:
    data = bytearray(pattern(3 * BLOCK))
    await core.write_file(p("f"), bytes(data))
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()
    await core.write_file(p("f"), b"changed", offset=BLOCK + 3)
    data[BLOCK + 3 : BLOCK + 10] = b"changed"
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [0, 10, BLOCK, BLOCK + 10, 10 * BLOCK])
async def test_sha256_after_truncate(core: Core, size: int) -> None:
    data = pattern(3 * BLOCK + 50)
    await core.write_file(p("f"), data)
    await core.sha256_xattr(p("f"))  # known before the truncate
    await core.fs.setattr(await core.resolve(p("f")), AttrChanges(size=size), CALLER)
    expected = data[:size] + bytes(max(0, size - len(data)))
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(expected).hexdigest()


async def test_sha256_after_append(core: Core) -> None:
    first = pattern(BLOCK + 100, seed=1)
    await core.write_file(p("f"), first)
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(first).hexdigest()
    more = pattern(2 * BLOCK, seed=2)
    await core.write_file(p("f"), more, flags=os.O_WRONLY | os.O_APPEND)
    assert await core.sha256_xattr(p("f")) == hashlib.sha256(first + more).hexdigest()


async def test_sha256_of_open_file_with_unflushed_writes(core: Core) -> None:
    data = pattern(2 * BLOCK + 9)
    fh = await core.create(p("f"))
    try:
        await core.write_all(fh, 0, data)
        assert await core.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()
        await core.fs.write(fh, len(data), b"!")
        assert await core.sha256_xattr(p("f")) == hashlib.sha256(data + b"!").hexdigest()
    finally:
        await core.fs.release(fh)


# Blocks larger than filedata.INLINE_HASH_MAX, so that the running digest is fed by background
# tasks in worker threads, as with the default 1 MiB blocks.
BIG_BLOCK = 64 * 1024


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_sha256_rewrite_after_ftruncate_to_zero(tmp_path: Path, group: bool) -> None:
    """Whole blocks written, the file cut to 0 while their hashing is still pending, then new
    content: the digest must be of the new content only."""
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK, group_commit=group) as c:
        await workspace(c, WS)
        fh = await c.create(p("f"))
        try:
            await c.fs.write(fh, 0, pattern(4 * BIG_BLOCK, seed=1))
            await c.fs.setattr(await c.resolve(p("f")), AttrChanges(size=0), CALLER)
            await c.fs.write(fh, 0, b"abc")
        finally:
            await c.fs.release(fh)
        assert await c.read_file(p("f")) == b"abc"
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_sha256_rewrite_after_o_trunc(tmp_path: Path, group: bool) -> None:
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK, group_commit=group) as c:
        await workspace(c, WS)
        fh = await c.create(p("f"))
        try:
            await c.fs.write(fh, 0, pattern(4 * BIG_BLOCK, seed=1))
            fh2 = await c.open(p("f"), os.O_WRONLY | os.O_TRUNC)
            await c.fs.write(fh2, 0, b"abc")
            await c.fs.release(fh2)
        finally:
            await c.fs.release(fh)
        assert await c.read_file(p("f")) == b"abc"
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("size", [BIG_BLOCK - 1, 3 * BIG_BLOCK + 5])
async def test_sha256_sequential_big_blocks(tmp_path: Path, size: int) -> None:
    data = pattern(size)
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        await workspace(c, WS)
        await c.write_file(p("f"), data)
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()


def hold_hashing(c: Core, monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """Whole-file hash steps wait for the returned event (as when hashing lags behind the
    writes); recomputing a digest from stored blocks fails the test."""
    gate = trio.Event()
    update = c.io.hash_update

    async def held(hasher: Any, data: bytes) -> None:
        await gate.wait()
        await update(hasher, data)

    def recomputed(*_: object) -> bytes:
        raise AssertionError("the digest was computed again from the stored blocks")

    monkeypatch.setattr(c.io, "hash_update", held)
    monkeypatch.setattr(c.io, "hash_content", recomputed)
    return gate


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_close_and_fsync_do_not_wait_for_the_whole_file_digest(
    tmp_path: Path, group: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest of a large write is recorded when its hashing ends, after the close; a
    getfattr meanwhile waits for that hashing instead of reading the file again."""
    data = pattern(4 * BIG_BLOCK + 7)
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK, group_commit=group) as c:
        await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        try:
            with trio.fail_after(10):
                fh = await c.create(p("f"))
                try:
                    await c.write_all(fh, 0, data)
                    await c.fs.fsync(fh, False)
                    await c.fs.flush(fh)
                finally:
                    await c.fs.release(fh)
        except trio.TooSlowError:
            gate.set()  # so that the store can close
            raise
        ino = await c.resolve(p("f"))
        row = c.store.index.get_inode(ino)
        assert row is not None and row.sha256 is None and row.size == len(data)
        got: list[str] = []
        async with trio.open_nursery() as n:
            n.start_soon(_append_xattr, c, got)
            await trio.sleep(0.05)
            assert not got  # waiting for the hashing
            gate.set()
        assert got == [hashlib.sha256(data).hexdigest()]
        row = c.store.index.get_inode(ino)
        assert row is not None and row.sha256 == hashlib.sha256(data).digest()


async def _append_xattr(c: Core, out: list[str]) -> None:
    out.append(await c.sha256_xattr(p("f")))


async def test_digest_hashed_late_is_not_kept_for_content_replaced_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content A closed while its hashing lags, then replaced by B of the same size through
    another open: A's digest must not be recorded for B."""
    a, b = pattern(3 * BIG_BLOCK, seed=1), pattern(3 * BIG_BLOCK, seed=2)
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        await c.write_file(p("f"), a)
        await c.write_file(p("f"), b)  # overwrites from 0: no running digest for B
        monkeypatch.undo()  # B's digest is computed from its blocks
        gate.set()
        await c.fs.digests_settled()
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(b).hexdigest()
        assert await c.read_file(p("f")) == b


async def test_file_removed_while_hashing_is_reaped_at_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        try:
            fh = await c.create(p("f"))
            ino = await c.resolve(p("f"))
            try:
                await c.write_all(fh, 0, pattern(3 * BIG_BLOCK))
                await c.fs.unlink(await c.resolve(WS), b"f", CALLER)
                # No name and no lookup reference left (as through the Python API): the
                # release is the last use of the inode.
                c.fs.forget([(ino, c.fs.lookups[ino])])
            finally:
                await c.fs.release(fh)
            assert c.store.index.get_inode(ino) is None
        finally:
            gate.set()
        await c.fs.digests_settled()
        assert c.store.index.get_inode(ino) is None


async def test_hashing_behind_the_writes_counts_against_the_dirty_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks waiting for the whole-file hasher hold their part of the dirty budget: while the
    hashing is held, a writer of more than the budget waits instead of the daemon keeping the
    rest in memory; once the hashing goes on, the write ends and the digest is right."""
    budget = 4 * BIG_BLOCK
    data = pattern(16 * BIG_BLOCK)
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK, dirty_budget=budget) as c:
        await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        fh = await c.create(p("f"))
        ino = await c.resolve(p("f"))
        done = trio.Event()

        async def write() -> None:
            await c.write_all(fh, 0, data, chunk=BIG_BLOCK)
            done.set()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(write)
                with trio.move_on_after(0.3):
                    await done.wait()
                assert not done.is_set()  # waiting for the hashing to make room
                assert c.fs.files[ino].size <= budget + BIG_BLOCK
                gate.set()
        finally:
            gate.set()
            await c.fs.release(fh)
        await c.io.drained()  # the mover has stored the blocks: nothing is held any more
        assert c.io.dirty_bytes == 0
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
async def test_chunks_dropped_from_the_hasher_give_their_budget_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Chunks queued for the whole-file hasher are let go when the file is cut to 0 or written
    behind the hash position; their bytes must leave the dirty budget with them."""
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        fh = await c.create(p("f"))
        try:
            await c.fs.write(fh, 0, pattern(4 * BIG_BLOCK, seed=1))
            if how == "truncate":
                await c.fs.setattr(await c.resolve(p("f")), AttrChanges(size=0), CALLER)
            await c.fs.write(fh, 0, b"abc")
        finally:
            gate.set()
            await c.fs.release(fh)
        await c.fs.digests_settled()
        await c.io.drained()
        assert c.io.dirty_bytes == 0
        want = b"abc" if how == "truncate" else b"abc" + pattern(4 * BIG_BLOCK, seed=1)[3:]
        monkeypatch.undo()  # a rewrite's digest is computed from the stored blocks
        assert await c.sha256_xattr(p("f")) == hashlib.sha256(want).hexdigest()


async def test_checkpoint_waits_for_the_digests_being_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint taken while a closed file is still being hashed waits for that hashing
    (its manifest names the digest) instead of reading the file back to hash it again."""
    data = pattern(3 * BIG_BLOCK + 5)
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        ws = await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        await c.write_file(p("f"), data)
        ns = c.store.index.namespace_by_root(ws)
        assert ns is not None
        taken: list[object] = []

        async def take() -> None:
            taken.append(await c.fs.checkpoint(ns, "step-1", creator="test"))

        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as n:
                    n.start_soon(take)
                    await trio.sleep(0.05)
                    assert not taken  # waiting for the hashing (recomputing would fail)
                    gate.set()
        finally:
            gate.set()  # so that the store can close whatever failed
        assert len(taken) == 1
        row = c.store.index.get_inode(await c.resolve(p("f")))
        assert row is not None and row.sha256 == hashlib.sha256(data).digest()


async def test_digest_recorded_late_survives_remount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(2 * BIG_BLOCK + 3)
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        await workspace(c, WS)
        gate = hold_hashing(c, monkeypatch)
        await c.write_file(p("f"), data)
        gate.set()
        await c.fs.digests_settled()
    async with open_core(tmp_path / "store", block_size=BIG_BLOCK) as c:
        row = c.store.index.get_inode(await c.resolve(p("f")))
        assert row is not None and row.sha256 == hashlib.sha256(data).digest()


# ---- ownership, statfs ----------------------------------------------------------------------


async def test_new_nodes_belong_to_the_caller(core: Core) -> None:
    alice = Caller(uid=1000, gid=1000)
    ws = await core.resolve(WS)
    fh, attr = await core.fs.create(ws, b"f", 0o640, os.O_WRONLY, alice)
    await core.fs.release(fh)
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (1000, 1000, 0o640)
    d = await core.fs.mkdir(ws, b"d", 0o750, alice)
    assert (d.uid, d.gid, stat.S_IMODE(d.mode)) == (1000, 1000, 0o750)


async def test_setgid_directory_inheritance(core: Core) -> None:
    d = await core.mkdir(p("d"), 0o775)
    await core.fs.setattr(d.ino, AttrChanges(gid=4242, mode=0o2775), CALLER)
    alice = Caller(uid=1000, gid=1000)
    fh, f = await core.fs.create(d.ino, b"f", 0o644, os.O_WRONLY, alice)
    await core.fs.release(fh)
    assert (f.uid, f.gid) == (1000, 4242)
    assert not f.mode & stat.S_ISGID
    sub = await core.fs.mkdir(d.ino, b"sub", 0o755, alice)
    assert (sub.uid, sub.gid) == (1000, 4242)
    assert sub.mode & stat.S_ISGID
    subsub = await core.fs.mkdir(sub.ino, b"subsub", 0o755, alice)
    assert subsub.gid == 4242 and subsub.mode & stat.S_ISGID
    plain = await core.fs.mkdir(await core.resolve(WS), b"plain", 0o755, alice)
    assert plain.gid == 1000 and not plain.mode & stat.S_ISGID


async def test_statfs(core: Core) -> None:
    await core.write_file(p("f"), pattern(3 * BLOCK))
    s = await core.fs.statfs()
    assert s.block_size == 4096 and s.name_max == 255
    assert 0 < s.free_blocks <= s.total_blocks and s.avail_blocks <= s.total_blocks
    assert s.total_blocks - s.free_blocks >= 3 * BLOCK // 4096
    assert s.free_inodes > 0 and s.total_inodes > s.free_inodes


# ==== persistence ============================================================================


async def test_data_survives_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    big = pattern(7 * BLOCK + 3)
    async with open_core(path) as c:
        await workspace(c, WS)
        await c.makedirs(p("d/e"))
        await c.write_file(p("d/e/big"), big)
        await c.write_file(p("sparse"), b"tail", offset=20 * BLOCK)
        ino = await c.resolve(p("d/e/big"))
        await c.fs.link(ino, await c.resolve(WS), b"hard", CALLER)
        await c.fs.symlink(await c.resolve(WS), b"sym", b"d/e/big", CALLER)
        await c.fs.setxattr(ino, b"user.mime_type", b"application/octet-stream", CALLER)
        await c.fs.setattr(ino, AttrChanges(mode=0o600, mtime_ns=1_500_000_000_000_000_001), CALLER)
        await c.write_file("acme/shared/blob", b"blob data")
        ns_id = await c.fs.getxattr(await c.resolve(WS), NSX)
        fh = await c.create(p("unreleased"))  # still open at shutdown: committed then
        await c.fs.write(fh, 0, b"pending")
        await c.fs.flush(fh)
        await c.fs.release(fh)
    async with open_core(path) as c:
        assert await c.read_file(p("d/e/big")) == big
        assert await c.read_file(p("hard")) == big
        assert await c.resolve(p("hard")) == ino
        attr = await c.attr(p("hard"))
        assert attr.nlink == 2 and attr.mode == stat.S_IFREG | 0o600
        assert attr.mtime_ns == 1_500_000_000_000_000_001
        assert await c.fs.readlink(await c.resolve(p("sym"))) == b"d/e/big"
        assert await c.fs.getxattr(ino, b"user.mime_type") == b"application/octet-stream"
        assert await c.sha256_xattr(p("hard")) == hashlib.sha256(big).hexdigest()
        assert await c.read_file(p("sparse")) == bytes(20 * BLOCK) + b"tail"
        assert await c.read_file("acme/shared/blob") == b"blob data"
        assert await c.read_file(p("unreleased")) == b"pending"
        assert await c.fs.getxattr(await c.resolve(WS), NSX) == ns_id
        assert (await c.attr(p("d"))).nlink == 3
        assert sorted(await c.listdir(WS)) == [b"d", b"hard", b"sparse", b"sym", b"unreleased"]
        check_invariants(c.store)


async def test_open_file_is_committed_at_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "store"
    data = pattern(2 * BLOCK + 1)
    async with open_core(path, check=False) as c:
        await workspace(c, WS)
        fh = await c.create(p("f"))
        await c.write_all(fh, 0, data)
        await c.fs.shutdown()  # unmount with the handle still open
        await c.fs.release(fh)
    async with open_core(path) as c:
        assert await c.read_file(p("f")) == data


# ==== contents under pressure, digests kept =================================================


async def test_writes_larger_than_the_dirty_budget(tmp_path: Path) -> None:
    """With room for only a few dirty blocks, writers wait for stores instead of piling up
    memory, and nothing deadlocks: two files written interleaved, then truncated while open."""
    a, b = pattern(40 * BLOCK + 3, seed=1), pattern(25 * BLOCK, seed=2)
    async with open_core(tmp_path / "store", dirty_budget=3 * BLOCK) as c:
        await workspace(c, WS)
        with trio.fail_after(30):
            fa, fb = await c.create(p("a")), await c.create(p("b"))
            try:
                for off in range(0, len(a), 3000):
                    await c.fs.write(fa, off, a[off : off + 3000])
                    if off < len(b):
                        await c.fs.write(fb, off, b[off : off + 3000])
                assert c.io.dirty_bytes <= 3 * BLOCK + 2 * BLOCK
                await c.fs.setattr(await c.resolve(p("b")), AttrChanges(size=BLOCK + 1), CALLER)
            finally:
                await c.fs.release(fa)
                await c.fs.release(fb)
            assert await c.read_file(p("a")) == a
            assert await c.read_file(p("b")) == b[: BLOCK + 1]
            # Journalled small blocks stay accounted until the mover has stored them.
            await c.io.drained()
            assert c.io.dirty_bytes == 0


async def test_digest_is_kept_not_recomputed(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    data = pattern(3 * BLOCK)
    await core.write_file(p("f"), data)
    await core.write_file(p("f"), b"x", offset=5)  # digest unknown now
    expected = hashlib.sha256(data[:5] + b"x" + data[6:]).hexdigest()
    assert await core.sha256_xattr(p("f")) == expected
    row = core.store.index.get_inode(await core.resolve(p("f")))
    assert row is not None and row.sha256 is not None and row.sha256.hex() == expected

    def no_hashing(*args: object) -> bytes:
        raise AssertionError("the digest of an unchanged file was computed again")

    monkeypatch.setattr(core.fs.io, "hash_content", no_hashing)
    for _ in range(3):
        assert await core.sha256_xattr(p("f")) == expected


async def test_digest_computed_in_background_after_release(core: Core) -> None:
    data = pattern(4 * BLOCK + 1)
    fh = await core.create(p("f"))
    try:
        for off in reversed(range(0, len(data), BLOCK)):  # not sequential: no running hash
            await core.fs.write(fh, off, data[off : off + BLOCK])
    finally:
        await core.fs.release(fh)
    ino = await core.resolve(p("f"))
    with trio.fail_after(10):
        while (row := core.store.index.get_inode(ino)) is None or row.sha256 is None:
            await trio.sleep(0.01)
    assert row.sha256 == hashlib.sha256(data).digest()


async def test_file_too_big(core: Core) -> None:
    fh = await core.create(p("f"))
    try:
        with pytest.raises(FileTooBig):
            await core.fs.write(fh, 1 << 50, b"x")
    finally:
        await core.fs.release(fh)
    with pytest.raises(FileTooBig):
        await core.fs.setattr(await core.resolve(p("f")), AttrChanges(size=(1 << 50) + 1), CALLER)
    assert (await core.attr(p("f"))).size == 0


async def test_blob_namespace_unlinked_while_open(core: Core) -> None:
    scope = await core.resolve("acme/shared")
    fh, attr = await core.fs.create(scope, b"blob", 0o644, os.O_RDWR, CALLER)
    try:
        await core.fs.write(fh, 0, b"contents")
        await core.fs.unlink(scope, b"blob", CALLER)
        assert core.store.index.count_namespaces() == 1  # only the workspace
        assert await core.fs.read(fh, 0, 100) == b"contents"
    finally:
        await core.fs.release(fh)
    core.fs.forget([(attr.ino, core.fs.lookups[attr.ino])])
    with pytest.raises(NotFound):
        await core.fs.getattr(attr.ino)


async def test_link_and_unlink_move_ctime(core: Core) -> None:
    await core.write_file(p("f"), b"x")
    before = await core.attr(p("f"))
    await trio.sleep(0.002)
    await core.fs.link(before.ino, await core.resolve(WS), b"g", CALLER)
    mid = await core.attr(p("f"))
    assert mid.ctime_ns > before.ctime_ns and mid.mtime_ns == before.mtime_ns
    await trio.sleep(0.002)
    await core.fs.unlink(await core.resolve(WS), b"g", CALLER)
    assert (await core.attr(p("f"))).ctime_ns > mid.ctime_ns


async def test_truncate_moves_mtime_and_ctime(core: Core) -> None:
    await core.write_file(p("f"), b"xyz")
    before = await core.attr(p("f"))
    await trio.sleep(0.002)
    attr = await core.fs.setattr(before.ino, AttrChanges(size=1), CALLER)
    assert attr.mtime_ns > before.mtime_ns and attr.ctime_ns > before.ctime_ns
    assert (await core.attr(p("f"))).mtime_ns == attr.mtime_ns


async def test_sandbox_and_scope_events(core: Core) -> None:
    await core.makedirs("beta/user-bob")
    await core.fs.rmdir(await core.resolve("beta"), b"user-bob", CALLER)
    await core.fs.rmdir(ROOT_INODE, b"beta", CALLER)
    evs = [(e.type, e.sandbox, e.payload) for e in core.store.index.events() if e.sandbox == "beta"]
    assert evs == [
        ("sandbox.create", "beta", {"name": "beta", "uid": CALLER.uid}),
        ("scope.create", "beta", {"sandbox": "beta", "scope": "user-bob", "uid": CALLER.uid}),
        ("scope.destroy", "beta", {"scope": "user-bob", "sandbox": "beta"}),
        ("sandbox.destroy", "beta", {"name": "beta"}),
    ]


async def test_grid_rename_flags(core: Core) -> None:
    await core.mkdir("acme/shared/other")
    scope = await core.resolve("acme/shared")
    with pytest.raises(Exists):
        await core.fs.rename(scope, b"ws", scope, b"other", RENAME_NOREPLACE, CALLER)
    with pytest.raises(InvalidArgument):
        await core.fs.rename(scope, b"ws", scope, b"other", RENAME_EXCHANGE, CALLER)
    assert sorted(await core.listdir("acme/shared")) == [b"other", b"ws"]


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_closed_file_survives_a_crash(tmp_path: Path, group: bool) -> None:
    data = pattern(3 * BLOCK + 1)
    async with crashing_core(tmp_path / "store", group_commit=group) as c:
        await workspace(c, WS)
        await c.makedirs(p("d"))
        await c.write_file(p("d/f"), data)  # create, write, flush, release
    async with open_core(tmp_path / "store") as c:
        assert await c.read_file(p("d/f")) == data
        assert await c.sha256_xattr(p("d/f")) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_fsynced_file_survives_a_crash(tmp_path: Path, group: bool) -> None:
    data = pattern(2 * BLOCK + 5)
    async with crashing_core(tmp_path / "store", group_commit=group) as c:
        await workspace(c, WS)
        fh = await c.create(p("f"))
        await c.write_all(fh, 0, data)
        await c.fs.fsync(fh, False)
        await c.fs.write(fh, len(data), b"not synced")  # may be lost
    async with open_core(tmp_path / "store") as c:
        assert (await c.read_file(p("f")))[: len(data)] == data


# ---- the journal of small blocks --------------------------------------------------------------


def _segments(store: Store) -> list[str]:
    return sorted(f.name for f in store.journal_dir.glob("*.jnl"))


@pytest.mark.parametrize("group", [False, True], ids=["plain", "group"])
async def test_closed_small_file_survives_a_crash_before_its_block_is_stored(
    tmp_path: Path, group: bool
) -> None:
    """A closed small file is committed with its block in the journal; the mover stores it
    later. Killed before the mover ran, the next start stores the block, the file reads back
    whole, and the dead daemon's segment goes once the block is stored and synced."""
    path = tmp_path / "store"
    data = b"journalled bytes\n" * 11
    digest = hashlib.sha256(data).digest()
    async with crashing_core(path, group_commit=group) as c:
        await workspace(c, WS)
        c.store.index.flush()
        # Keep the mover from storing anything, as if the daemon died right after close().
        c.io.next_batch = _never  # type: ignore[method-assign]
        fh = await c.create(p("f"))
        await c.fs.write(fh, 0, data)
        await c.fs.flush(fh)
        assert not c.store.backend.has(digest)
        assert JournalReader(c.store.journal_dir).digests() == {digest}
        assert await c.read_file(p("f")) == data  # served from memory meanwhile
        dead = _segments(c.store)
    async with open_core(path) as c:
        assert await c.read_file(p("f")) == data
        await c.io.drained()
        assert c.store.backend.has(digest)
        # The segment stays until a sync has made the stored blob durable.
        assert _segments(c.store) == dead
        await c.fs.retire_journal()
        assert _segments(c.store) == []


async def _never(*_: object) -> list[tuple[bytes, bytes]]:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_journal_is_emptied_once_blocks_are_stored(core: Core) -> None:
    await core.write_file(p("small"), b"tiny")
    assert len(_segments(core.store)) == 1
    await core.io.drained()
    await core.fs.retire_journal()
    assert _segments(core.store) == []
    assert core.store.backend.has(hashlib.sha256(b"tiny").digest())
    # The next block starts a new segment.
    await core.write_file(p("small2"), b"tiny 2")
    assert len(_segments(core.store)) == 1


async def test_a_segment_with_a_block_not_stored_stays_until_it_is(core: Core) -> None:
    """Retiring seals the segment being written; one whose blocks are not all stored stays
    (its blocks would be lost with it), and goes at the first retirement after they are."""
    gate = trio.Event()
    real = core.io.next_batch

    async def held(limit: int = 256) -> list[tuple[bytes, bytes]]:
        await gate.wait()
        return await real(limit)

    core.io.next_batch = held  # type: ignore[method-assign]
    await core.write_file(p("a"), b"first")
    first = _segments(core.store)
    await core.fs.retire_journal()
    assert _segments(core.store) == first  # not stored yet: kept, sealed
    await core.write_file(p("b"), b"second")
    assert len(_segments(core.store)) == 2  # a new segment for the next block
    gate.set()
    await core.io.drained()
    await core.fs.retire_journal()
    assert _segments(core.store) == []


async def test_a_cancelled_retirement_leaves_the_segments_for_the_next_one(core: Core) -> None:
    """Cancelled while it syncs, a retirement deletes nothing (the puts may not be durable
    yet); the next one deletes them."""
    await core.write_file(p("f"), b"content")
    await core.io.drained()
    real = core.io.sync

    async def slow_sync() -> None:
        await trio.sleep_forever()

    core.io.sync = slow_sync  # type: ignore[method-assign]
    with trio.move_on_after(0.05):
        await core.fs.retire_journal()
    assert len(_segments(core.store)) == 1
    core.io.sync = real  # type: ignore[method-assign]
    await core.fs.retire_journal()
    assert _segments(core.store) == []
