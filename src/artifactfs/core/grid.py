"""Namespaces by the names users type: grid paths (`acme/user-alice/proj`) and public ids.

Owns the parsing of a grid path (sandbox/scope/name, each name checked by the rules of
`names.py`), finding a namespace by grid path or by public id (the value of the
`user.artifactfs.namespace` xattr), the grid path of a namespace, and creating a namespace at
a grid path with the sandbox and scope made if missing, through `FileSystem` operations (so
the grid rules, the policy and the events are the ones a mount applies).

Must not import pyfuse3 or write SQL (it asks the index's named queries).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from artifactfs.core.fs import FileSystem
from artifactfs.core.names import check_grid_name, check_sandbox_name, parse_scope_name
from artifactfs.core.nodes import ROOT_INODE, Caller
from artifactfs.errors import Exists, InvalidArgument, NotFound
from artifactfs.index.db import Index, NamespaceRow

HINT = (
    "give a grid path SANDBOX/SCOPE/NAME (e.g. acme/user-alice/proj) or a namespace id "
    "(getfattr -n user.artifactfs.namespace)"
)


@dataclass(frozen=True, slots=True)
class GridPath:
    sandbox: str
    scope: str
    name: str

    def __str__(self) -> str:
        return f"{self.sandbox}/{self.scope}/{self.name}"


def parse_grid_path(text: str) -> GridPath:
    """`SANDBOX/SCOPE/NAME` (surrounding slashes ignored), every part checked."""
    parts = [p for p in text.strip("/").split("/")]
    if len(parts) != 3 or not all(parts):
        raise InvalidArgument(f"{text!r} is not a grid path SANDBOX/SCOPE/NAME")
    sandbox, scope, name = (p.encode("utf-8", errors="surrogateescape") for p in parts)
    return GridPath(
        check_sandbox_name(sandbox),
        parse_scope_name(scope).name,
        check_grid_name(name, "namespace"),
    )


def find_namespace(index: Index, ref: str) -> NamespaceRow:
    """The namespace at grid path `ref`, or whose public id is `ref`. NotFound otherwise."""
    if "/" not in ref.strip("/"):
        ns = index.namespace_by_public_id(ref.strip("/"))
        if ns is None:
            raise NotFound(f"no namespace with id {ref!r}: {HINT}")
        return ns
    parts = ref.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise NotFound(f"{ref!r} is not a namespace: {HINT}")
    ino = ROOT_INODE
    for part in parts:
        child = index.lookup_child(ino, part.encode("utf-8", errors="surrogateescape"))
        if child is None:
            raise NotFound(f"no namespace {ref.strip('/')}: {HINT}")
        ino = child
    ns = index.namespace_by_root(ino)
    if ns is None:
        raise NotFound(f"no namespace {ref.strip('/')}: {HINT}")
    return ns


def grid_path_of(index: Index, ns: NamespaceRow) -> str:
    scope = index.scope_by_id(ns.scope_id)
    sandbox = None if scope is None else index.sandbox_by_id(scope.sandbox_id)
    if scope is None or sandbox is None:
        return ns.public_id
    return f"{sandbox.name}/{scope.name}/{ns.name}"


def namespace_at(index: Index, path: GridPath) -> NamespaceRow | None:
    try:
        return find_namespace(index, str(path))
    except NotFound:
        return None


async def ensure_dir(fs: FileSystem, parent: int, name: str, caller: Caller) -> int:
    """The inode of directory `name` in `parent`, made (as by mkdir) if missing."""
    raw = name.encode("utf-8", errors="surrogateescape")
    child = fs.index.lookup_child(parent, raw)
    if child is not None:
        return child
    attr = await fs.mkdir(parent, raw, 0o755, caller)
    fs.forget([(attr.ino, 1)])  # no kernel holds the reference mkdir counts
    return attr.ino


async def create_namespace(
    fs: FileSystem, path: GridPath, kind: str, caller: Caller
) -> tuple[NamespaceRow, list[int]]:
    """Create a namespace of `kind` ('workspace' or 'blob') at `path`, making its sandbox and
    scope first if they are missing. Returns the namespace and the inodes of the grid
    directories it created (sandbox, scope), so a failed import can remove them again.
    Exists if a namespace (or anything) already has that name."""
    if namespace_at(fs.index, path) is not None:
        raise Exists(
            f"namespace {path} already exists: import under another name, or remove it first"
        )
    created: list[int] = []
    parent = ROOT_INODE
    for name in (path.sandbox, path.scope):
        existed = fs.index.lookup_child(parent, name.encode("utf-8", errors="surrogateescape"))
        parent = await ensure_dir(fs, parent, name, caller)
        if existed is None:
            created.append(parent)
    raw = path.name.encode("utf-8", errors="surrogateescape")
    try:
        if kind == "workspace":
            attr = await fs.mkdir(parent, raw, 0o755, caller)
        else:
            attr = await fs.mknod(parent, raw, stat.S_IFREG | 0o644, 0, caller)
    except Exists:
        raise Exists(
            f"namespace {path} already exists: import under another name, or remove it first"
        ) from None
    fs.forget([(attr.ino, 1)])
    ns = fs.index.namespace_by_root(attr.ino)
    assert ns is not None
    return ns, created


async def remove_namespace(
    fs: FileSystem, ns: NamespaceRow, created: list[int], caller: Caller
) -> None:
    """Undo `create_namespace` of a namespace that is still empty: the namespace, then the
    grid directories it created (scope before sandbox) if nothing else moved in."""
    scope = fs.index.scope_by_id(ns.scope_id)
    assert scope is not None
    if ns.kind == "workspace":
        await fs.rmdir(scope.inode, ns.name.encode("utf-8", errors="surrogateescape"), caller)
    else:
        await fs.unlink(scope.inode, ns.name.encode("utf-8", errors="surrogateescape"), caller)
    for ino in reversed(created):
        up = fs.index.parent_of(ino)
        if up is None or fs.index.has_children(ino):
            break
        await fs.rmdir(up[0], up[1], caller)
