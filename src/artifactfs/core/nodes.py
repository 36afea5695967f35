"""Plain value types the core speaks: node kinds, attributes, callers, attribute changes."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class NodeKind(IntEnum):
    """What a node is in the grid (stored in inodes.kind)."""

    ROOT = 0
    SANDBOX = 1
    SCOPE = 2
    NSROOT = 3
    DIR = 4
    FILE = 5
    SYMLINK = 6
    SPECIAL = 7

    @property
    def is_dir(self) -> bool:
        return self <= NodeKind.DIR

    @property
    def is_grid(self) -> bool:
        """Root, sandbox or scope: directories whose children are grid objects."""
        return self <= NodeKind.SCOPE


# NodeKind by value (the values are 0..7): indexing this costs a tuple lookup where calling
# NodeKind(value) costs an enum lookup, ~1 us, and the core does it several times a request.
KINDS: tuple[NodeKind, ...] = tuple(NodeKind)
assert all(k == i for i, k in enumerate(KINDS))

ROOT_INODE = 1


class Caller(NamedTuple):
    """Who asks: the calling process's credentials as the kernel reports them. (A tuple:
    one is made per request, and a frozen dataclass takes twice as long to build.)"""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022
    groups: tuple[int, ...] = ()


ROOT_CALLER = Caller(uid=0, gid=0)


@dataclass(slots=True)
class Attr:
    """The stat of one node."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    # Bytes of storage used (for st_blocks): holes and shared blocks are not counted twice.
    stored: int
    kind: NodeKind

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def blocks_512(self) -> int:
        return (self.stored + 511) // 512


@dataclass(slots=True)
class AttrChanges:
    """A setattr request: each field set to None is left unchanged. UTIME_NOW arrives as an
    explicit time (the kernel and pyfuse3 resolve it)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None


@dataclass(slots=True, frozen=True)
class FsStats:
    """statfs figures."""

    block_size: int
    total_blocks: int
    free_blocks: int
    avail_blocks: int
    total_inodes: int
    free_inodes: int
    name_max: int
