"""Helpers for the core test tier: a `FileSystem` on a fresh store, driven without FUSE.

`open_core(store_path)` initialises a store (if there is none yet), opens it, builds a small-block
`BlockIO` (so multi-block logic is exercised with kilobytes of data) and a `FileSystem`, starts it
in a trio nursery and yields a `Core`. On a clean exit it shuts the file system down, drops every
kernel reference (as an unmount does), runs `check_invariants` (the fsck-style checks of
`index/schema.py`) and closes the store; on an exception it only cleans up, so the original
failure is what the test reports.

`Core` resolves grid paths such as "acme/shared/ws/a/b" with `lookup` (as the kernel walks a
path) and reads and writes whole files through create/open/write/flush/release.

This module must not reach into the core's private state except to simulate the kernel
(forgetting references at unmount) and to check invariants.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from artifactfs.blobs.journal import JournalReader
from artifactfs.core.blockio import BlockIO
from artifactfs.core.filedata import stored_estimate
from artifactfs.core.fs import FileSystem
from artifactfs.core.nodes import ROOT_INODE, Attr, Caller, NodeKind
from artifactfs.errors import NotADirectory, NotFound
from artifactfs.store import Store, init_store

BLOCK = 4096
CALLER = Caller(uid=os.getuid(), gid=os.getgid())


def minimal_acl(mode: int) -> bytes:
    """The access ACL in xattr form that says what `mode` says (user::, group::, other::), as
    `setfacl -m u::..,g::..,o::..` and `cp -a` send it."""
    entries = ((0x01, mode >> 6 & 7), (0x04, mode >> 3 & 7), (0x20, mode & 7))
    body = b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)
    return struct.pack("<I", 2) + body


def split(path: str) -> list[bytes]:
    return [p.encode() for p in path.split("/") if p]


@dataclass
class Core:
    store: Store
    io: BlockIO
    fs: FileSystem
    caller: Caller = CALLER

    @property
    def bs(self) -> int:
        return self.io.block_size

    # ---- paths ------------------------------------------------------------------------------

    async def resolve(self, path: str, *, follow: bool = False) -> int:
        """The inode of `path` (relative to the grid root), looked up component by component.
        A symlink in the middle of the path (or at its end with `follow`) is NotFound: the
        tests only make symlinks whose targets are outside the store."""
        ino = ROOT_INODE
        parts = split(path)
        for i, name in enumerate(parts):
            attr = await self.fs.lookup(ino, name, self.caller)
            last = i == len(parts) - 1
            if stat.S_ISLNK(attr.mode) and (follow or not last):
                raise NotFound(f"{path}: symlink to outside the store")
            ino = attr.ino
        return ino

    async def parent(self, path: str) -> tuple[int, bytes]:
        parts = split(path)
        assert parts, "the grid root has no parent"
        parent = await self.resolve("/".join(p.decode() for p in parts[:-1]), follow=True)
        # The kernel's path walk requires every component before the last to be a directory.
        if not stat.S_ISDIR((await self.fs.getattr(parent)).mode):
            raise NotADirectory(f"{path}: a parent is not a directory")
        return parent, parts[-1]

    async def attr(self, path: str) -> Attr:
        return await self.fs.getattr(await self.resolve(path))

    async def exists(self, path: str) -> bool:
        try:
            await self.resolve(path)
        except (NotFound, NotADirectory):
            return False
        return True

    async def mkdir(self, path: str, mode: int = 0o755) -> Attr:
        parent, name = await self.parent(path)
        return await self.fs.mkdir(parent, name, mode, self.caller)

    async def makedirs(self, path: str, mode: int = 0o755) -> int:
        """mkdir -p, grid levels included ("acme/shared/ws/a")."""
        ino = ROOT_INODE
        for name in split(path):
            try:
                attr = await self.fs.lookup(ino, name, self.caller)
            except NotFound:
                attr = await self.fs.mkdir(ino, name, mode, self.caller)
            ino = attr.ino
        return ino

    async def listdir(self, path: str) -> list[bytes]:
        ino = await self.resolve(path)
        names: list[bytes] = []
        after = 0
        while True:
            entries = await self.fs.readdir(ino, after)
            if not entries:
                return names
            names.extend(e.name for e in entries)
            after = entries[-1].next_offset

    # ---- whole files ------------------------------------------------------------------------

    async def create(self, path: str, mode: int = 0o644, flags: int = os.O_WRONLY) -> int:
        """Create `path` and return an open handle."""
        parent, name = await self.parent(path)
        fh, _ = await self.fs.create(parent, name, mode, flags, self.caller)
        return fh

    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        return await self.fs.open(await self.resolve(path, follow=True), flags, self.caller)

    async def write_file(
        self, path: str, data: bytes, *, offset: int = 0, flags: int = os.O_WRONLY
    ) -> None:
        """Write `data` at `offset`, creating the file if needed; flush and release."""
        if await self.exists(path):
            fh = await self.open(path, flags)
        else:
            fh = await self.create(path, flags=flags)
        try:
            await self.write_all(fh, offset, data)
            await self.fs.flush(fh)
        finally:
            await self.fs.release(fh)

    async def write_all(self, fh: int, offset: int, data: bytes, chunk: int = 5000) -> None:
        """Write in uneven chunks, as the kernel would split a large write."""
        pos = 0
        while pos < len(data):
            n = await self.fs.write(fh, offset + pos, data[pos : pos + chunk])
            assert n > 0
            pos += n

    async def read_fh(self, fh: int, chunk: int = 7000) -> bytes:
        out = bytearray()
        while True:
            piece = await self.fs.read(fh, len(out), chunk)
            if not piece:
                return bytes(out)
            out += piece

    async def read_file(self, path: str) -> bytes:
        fh = await self.open(path)
        try:
            return await self.read_fh(fh)
        finally:
            await self.fs.release(fh)

    async def sha256_xattr(self, path: str) -> str:
        ino = await self.resolve(path)
        return (await self.fs.getxattr(ino, b"user.artifactfs.sha256")).decode()


def check_invariants(store: Store, *, busy: Collection[int] = ()) -> None:
    """The invariants of index/schema.py, plus: every block and blob the index knows is in
    the backend, no block lies beyond the end of its file, a known whole-file digest is the
    digest of the content, and no unlinked inode survives once nothing references it (`busy`:
    inodes the core still holds, such as files being hashed in the background)."""
    index = store.index
    assert index.link_count_mismatches() == [], "wrong link counts"
    assert index.dangling_dentries() == [], "directory entries pointing nowhere"
    assert index.unknown_block_digests() == [], "block maps naming blobs the index does not know"
    assert index.row_cache_mismatches() == [], "the inode row cache differs from the table"
    conn = index.conn
    root = index.get_inode(ROOT_INODE)
    assert root is not None and root.kind == NodeKind.ROOT
    # A small block may still be journalled while the mover stores it.
    journalled = JournalReader(store.journal_dir).digests()
    for (digest,) in conn.execute("SELECT DISTINCT digest FROM blocks"):
        d = bytes(digest)
        assert store.backend.has(d) or d in journalled, f"block {d.hex()} not stored"
    for (digest,) in conn.execute("SELECT digest FROM blobs"):
        d = bytes(digest)
        assert store.backend.has(d) or d in journalled, f"blob {d.hex()} not stored"
    beyond = conn.execute(
        "SELECT b.inode, b.idx, i.size FROM blocks b JOIN inodes i ON i.id = b.inode "
        "WHERE b.idx * ? >= i.size",
        (store.config.block_size,),
    ).fetchall()
    assert beyond == [], f"blocks beyond the end of their file: {beyond}"
    orphans = [i for i in index.unlinked_inodes() if i not in busy]
    assert orphans == [], f"unlinked inodes left after every reference was dropped: {orphans}"
    no_name = conn.execute(
        "SELECT i.id FROM inodes i WHERE i.id != ? AND i.nlink > 0 AND NOT EXISTS "
        "(SELECT 1 FROM dentries d WHERE d.inode = i.id)",
        (ROOT_INODE,),
    ).fetchall()
    assert no_name == [], f"live inodes without a name: {no_name}"
    for ino, sha in conn.execute(
        "SELECT id, sha256 FROM inodes WHERE kind = ? AND sha256 IS NOT NULL", (NodeKind.FILE,)
    ).fetchall():
        if ino not in busy:
            assert bytes(sha) == content_sha256(store, ino), f"stale sha256 of inode {ino}"
    bs = int(index.get_meta("block_size") or 0) or store.config.block_size
    for ino, size, stored in conn.execute(
        "SELECT id, size, stored FROM inodes WHERE kind = ?", (NodeKind.FILE,)
    ).fetchall():
        if ino not in busy:
            n, top = index.block_stats(ino)
            want = stored_estimate(n, size, bs, top == (size - 1) // bs)
            assert stored == want, f"inode {ino} claims {stored} stored bytes, blocks say {want}"


def _committed_blob(store: Store, digest: bytes) -> bytes:
    """A blob from the backend, or from the journal while the mover has not stored it yet."""
    data = JournalReader(store.journal_dir).get(digest)
    return data if data is not None else store.backend.get(digest)


def content_sha256(store: Store, ino: int) -> bytes:
    """SHA-256 of a file's committed content, read from the index and the backend directly."""
    row = store.index.get_inode(ino)
    assert row is not None
    bs = store.config.block_size
    blocks = store.index.block_map(ino)
    h = hashlib.sha256()
    for idx in range((row.size + bs - 1) // bs):
        want = min(bs, row.size - idx * bs)
        d = blocks.get(idx)
        chunk = _committed_blob(store, d)[:want] if d is not None else b""
        h.update(chunk + bytes(want - len(chunk)))
    return h.digest()


@asynccontextmanager
async def open_core(
    store_path: Path,
    *,
    block_size: int = BLOCK,
    check: bool = True,
    group_commit: bool = False,
    dirty_budget: int | None = None,
) -> AsyncIterator[Core]:
    """A started FileSystem on the store at `store_path` (created if missing).

    `group_commit`: run the index as the daemon does (metadata operations grouped into one
    write transaction, committed at close/fsync; the daemon's 50 ms timer is left out so that
    tests are deterministic, and the end of the block commits as the daemon's unmount does).
    """
    init_store(store_path, block_size=block_size)
    store = Store(store_path)
    try:
        io = BlockIO(
            store.backend, block_size=store.config.block_size, journal=store.open_journal()
        )
        if dirty_budget is not None:
            io.dirty_budget = dirty_budget
        fs = FileSystem(store.index, io)
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            store.index.group_commit = group_commit
            core = Core(store, io, fs)
            failed = True
            try:
                yield core
                failed = False
            finally:
                try:
                    await fs.shutdown()
                    store.index.flush()
                    if not failed:
                        # Unmount: the kernel drops every reference it held.
                        fs.forget(list(fs.lookups.items()))
                        assert fs.handles == {}, "the test left handles open"
                        if check:
                            check_invariants(store, busy=set(fs.files))
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        store.close()


@asynccontextmanager
async def crashing_core(
    store_path: Path, *, block_size: int = BLOCK, group_commit: bool = False
) -> AsyncIterator[Core]:
    """Like open_core, but the "daemon" is killed at the end: no shutdown, no commit of open
    files or of the open group transaction, no release, no forget. The store then holds only
    what SQLite committed, as after `kill -9`."""
    init_store(store_path, block_size=block_size)
    store = Store(store_path)
    try:
        io = BlockIO(
            store.backend, block_size=store.config.block_size, journal=store.open_journal()
        )
        fs = FileSystem(store.index, io)
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            store.index.group_commit = group_commit
            yield Core(store, io, fs)
            nursery.cancel_scope.cancel()
    finally:
        if store.index.conn.in_transaction:
            store.index.conn.execute("ROLLBACK")  # what a killed process never committed
        store.index.group_commit = False
        store.close()


async def workspace(core: Core, path: str = "acme/shared/ws") -> int:
    """Create (mkdir -p) a workspace namespace and return its root inode."""
    return await core.makedirs(path)
