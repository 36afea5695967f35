"""The `.snapshots` view: checkpoints browsed as read-only directories and files.

    <ns>/.snapshots/                 SNAPSHOTS        one directory per checkpoint of workspace <ns>
    <ns>/.snapshots/NAME/...         CHECKPOINT, ENTRY   the checkpoint's tree, from its manifests
    <scope>/.snapshots/              SCOPE            one directory per blob namespace of the scope
    <scope>/.snapshots/<blob>/       BLOB             one file per checkpoint of that blob
    <scope>/.snapshots/<blob>/NAME   BLOB_CHECKPOINT  the blob as it was

None of these nodes is in the index. Each gets a *virtual* inode number from a range that real
inodes (SQLite AUTOINCREMENT ids) never reach, allocated in memory when a lookup or readdir
first shows it to the kernel, keyed by what it stands for (a checkpoint and a path, or a
checkpoint and a hard-link key, so that all names of a linked file share one inode), and
reclaimed when the kernel forgets it and no handle is open. Numbers are never reused.

Attributes, listings, symlink targets and xattrs come from the manifests (`Checkpoints.manifest`,
cached and verified); file contents are read block by block with `BlockIO.read_many`, like a
live file's committed blocks. Everything here is read-only: the FileSystem turns every change
under `.snapshots` into EROFS, except taking and deleting checkpoints there.

Must not import pyfuse3 or speak SQL (the Index does). Nodes are interned only after the last
await of an operation, so that the caller takes its kernel reference (`FileSystem.remember`)
before any other task can run and sweep unreferenced nodes away.
"""

from __future__ import annotations

import collections
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.filedata import stored_estimate
from artifactfs.core.manifest import DIR, FILE, SPECIAL, SYMLINK, Entry, Manifest
from artifactfs.core.nodes import Attr, NodeKind
from artifactfs.errors import (
    InvalidArgument,
    IsADirectory,
    NoData,
    NotADirectory,
    NotFound,
    NotSupported,
    ReadOnly,
)
from artifactfs.index.db import CheckpointRow, Index, InodeRow

# Real inode ids come from SQLite AUTOINCREMENT and would need 2**48 creations to get here.
VIRTUAL_BASE = 1 << 48
DIR_CACHE = 256
DIR_STORED = 4096
READ_ONLY_DIR = 0o555

_KIND_OF_TYPE = {
    DIR: NodeKind.DIR,
    FILE: NodeKind.FILE,
    SYMLINK: NodeKind.SYMLINK,
    SPECIAL: NodeKind.SPECIAL,
}


def is_virtual(ino: int) -> bool:
    return ino >= VIRTUAL_BASE


def decode_name(name: bytes) -> str:
    """A checkpoint name to take, as Checkpoints spells it (which refuses invalid UTF-8)."""
    return name.decode("utf-8", errors="surrogateescape")


def existing_name(name: bytes) -> str:
    """A checkpoint name to look up: NotFound when it is not UTF-8 (no checkpoint has it)."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise NotFound(f"no checkpoint named {name!r}") from None


class VKind(Enum):
    SNAPSHOTS = "snapshots"  # <ns>/.snapshots
    CHECKPOINT = "checkpoint"  # <ns>/.snapshots/NAME
    ENTRY = "entry"  # anything below <ns>/.snapshots/NAME
    SCOPE = "scope"  # <scope>/.snapshots
    BLOB = "blob"  # <scope>/.snapshots/<blob>
    BLOB_CHECKPOINT = "blob-checkpoint"  # <scope>/.snapshots/<blob>/NAME


@dataclass(eq=False, slots=True)
class VNode:
    key: tuple[object, ...]
    kind: VKind
    # The real inode the node hangs off: the workspace root (SNAPSHOTS and below) or the scope
    # (SCOPE). BLOB nodes and below find their blob through ns_id (a restore may replace a
    # blob's root inode).
    anchor: int
    parent: VNode | None  # None: the parent is the real inode `anchor`
    ns_id: int = 0
    checkpoint: CheckpointRow | None = None
    entry: Entry | None = None  # what stat shows, for nodes of a checkpoint
    path: bytes = b""  # below the checkpoint root
    subdirs: int = 0  # directories of a checkpoint: for nlink
    ino: int = 0
    opens: int = 0
    blockmap: dict[int, bytes] | None = None

    @property
    def is_dir(self) -> bool:
        if self.kind in (VKind.ENTRY, VKind.BLOB_CHECKPOINT):
            return self.entry is not None and self.entry.is_dir
        return True

    @property
    def listing(self) -> bytes | None:
        """The manifest digest whose entries this directory lists (checkpoint directories)."""
        if self.kind is VKind.CHECKPOINT:
            assert self.checkpoint is not None
            return self.checkpoint.root
        if self.kind is VKind.ENTRY and self.entry is not None and self.entry.is_dir:
            return self.entry.manifest
        return None


@dataclass(slots=True)
class VEntry:
    name: bytes
    attr: Attr
    next_offset: int


class SnapView:
    def __init__(
        self, index: Index, io: BlockIO, checkpoints: Checkpoints, lookups: Mapping[int, int]
    ) -> None:
        self.index = index
        self.io = io
        self.checkpoints = checkpoints
        self._lookups = lookups  # the FileSystem's kernel reference counts, real and virtual
        self._by_ino: dict[int, VNode] = {}
        self._by_key: dict[tuple[object, ...], VNode] = {}
        self._next = VIRTUAL_BASE
        self._fresh: list[VNode] = []  # interned, not yet known to be referenced
        # Whole directory manifests (chunks merged), their sorted names and subdirectories.
        self._dirs: collections.OrderedDict[bytes, tuple[Manifest, list[bytes], int]] = (
            collections.OrderedDict()
        )

    # ---- nodes --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_ino)

    def node(self, ino: int) -> VNode:
        n = self._by_ino.get(ino)
        if n is None:
            raise NotFound(f"snapshot inode {ino} is not known (forgotten)")
        return n

    def kind(self, ino: int) -> VKind:
        return self.node(ino).kind

    def volatile(self, ino: int) -> bool:
        """Whether the kernel must not cache this node's name or attributes: it stands for a
        checkpoint (or a listing of them) that another process may delete or take."""
        n = self._by_ino.get(ino)
        return n is not None and n.kind is not VKind.ENTRY

    def _intern(self, node: VNode) -> VNode:
        have = self._by_key.get(node.key)
        if have is not None:
            return have
        node.ino = self._next
        self._next += 1
        self._by_key[node.key] = node
        self._by_ino[node.ino] = node
        self._fresh.append(node)
        return node

    def _sweep(self) -> None:
        """Drop nodes interned earlier that the kernel never took (a readdir reply that did not
        fit its buffer). Runs before an operation interns, never between an intern and the
        caller's `remember` (they happen without a checkpoint in between)."""
        fresh, self._fresh = self._fresh, []
        for n in fresh:
            self.reap(n.ino)

    def reap(self, ino: int) -> None:
        """Forget a node the kernel no longer references and no handle holds."""
        n = self._by_ino.get(ino)
        if n is None or self._lookups.get(ino, 0) > 0 or n.opens > 0:
            return
        del self._by_ino[ino]
        if self._by_key.get(n.key) is n:
            del self._by_key[n.key]

    def parent_of(self, ino: int) -> tuple[int, bool]:
        """(parent inode, whether it is virtual) of a virtual directory, for "..": a parent that
        was reclaimed is interned again."""
        n = self.node(ino)
        if n.parent is None:
            return n.anchor, False
        p = n.parent
        if self._by_ino.get(p.ino) is not p:
            existing = self._by_key.get(p.key)
            if existing is not None:
                return existing.ino, True
            self._sweep()
            self._intern(p)
        return p.ino, True

    # ---- attributes ---------------------------------------------------------------------------

    def _row(self, ino: int) -> InodeRow:
        row = self.index.get_inode(ino)
        if row is None or row.nlink == 0:
            raise NotFound("the namespace no longer exists")
        return row

    def _blob_row(self, ns_id: int) -> InodeRow:
        ns = self.index.namespace_by_id(ns_id)
        if ns is None:
            raise NotFound("the blob namespace no longer exists")
        return self._row(ns.root_inode)

    def anchor_row(self, ino: int) -> InodeRow:
        """The live inode whose namespace a virtual node belongs to (the workspace root, the
        blob, or the scope): the policy asks about it."""
        n = self.node(ino)
        if n.kind in (VKind.BLOB, VKind.BLOB_CHECKPOINT):
            return self._blob_row(n.ns_id)
        return self._row(n.anchor)

    def _dir_attr(self, n: VNode, row: InodeRow, mode: int, nlink: int, t: int) -> Attr:
        return Attr(
            ino=n.ino,
            mode=stat.S_IFDIR | mode,
            nlink=nlink,
            uid=row.uid,
            gid=row.gid,
            rdev=0,
            size=0,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
            btime_ns=row.btime_ns,
            stored=0,
            kind=NodeKind.DIR,
        )

    def attr(self, ino: int) -> Attr:
        return self._attr(self.node(ino))

    def _attr(self, n: VNode) -> Attr:
        if n.kind in (VKind.SNAPSHOTS, VKind.BLOB):
            row = self._row(n.anchor) if n.kind is VKind.SNAPSHOTS else self._blob_row(n.ns_id)
            cks = self.index.checkpoints_of(n.ns_id)
            t = max((c.created_ns for c in cks), default=row.btime_ns)
            # Read-only, except that whoever may write the namespace may take (mkdir, create)
            # and delete (rmdir, unlink) checkpoints here: the kernel checks these bits.
            mode = READ_ONLY_DIR | (row.mode & 0o222)
            nlink = 2 + len(cks) if n.kind is VKind.SNAPSHOTS else 2
            return self._dir_attr(n, row, mode, nlink, t)
        if n.kind is VKind.SCOPE:
            row = self._row(n.anchor)
            nlink = 2 + len(self._blobs(n.anchor))
            return self._dir_attr(n, row, READ_ONLY_DIR, nlink, row.mtime_ns)
        e = n.entry
        assert e is not None
        if e.is_dir:
            nlink, stored = 2 + n.subdirs, DIR_STORED
        elif e.type == FILE:
            bs = self.io.block_size
            last = (e.size - 1) // bs
            has_last = any(idx == last for idx, _ in e.blocks)
            nlink = e.nlink if e.link is not None else 1
            stored = stored_estimate(len(e.blocks), e.size, bs, has_last)
        else:
            nlink, stored = 1, 0
        return Attr(
            ino=n.ino,
            mode=e.mode,
            nlink=nlink,
            uid=e.uid,
            gid=e.gid,
            rdev=e.rdev,
            size=e.size,
            atime_ns=e.atime_ns,
            mtime_ns=e.mtime_ns,
            ctime_ns=e.ctime_ns,
            btime_ns=e.btime_ns,
            stored=stored,
            kind=_KIND_OF_TYPE[e.type],
        )

    # ---- manifests ----------------------------------------------------------------------------

    async def _manifests(self, digests: Iterable[bytes]) -> dict[bytes, Manifest]:
        """Whole manifests by digest (a chunked directory with its chunks merged): cached
        ones at once, the others with all their chunks in ONE worker-thread hop."""
        out: dict[bytes, Manifest] = {}
        missing: list[bytes] = []
        for d in dict.fromkeys(digests):
            m = self._whole_cached(d)
            if m is None:
                missing.append(d)
            else:
                out[d] = m
        if missing:
            load = self.checkpoints.load_raw_sync

            def run() -> dict[bytes, Manifest]:
                raw: dict[bytes, Manifest] = {}
                for d in missing:
                    top = raw[d] = load(d)
                    for c in top.chunks:
                        if c not in raw:
                            raw[c] = load(c)
                return raw

            raw = await trio.to_thread.run_sync(run, limiter=self.io.limiter)
            for d, m in raw.items():
                self.checkpoints.remember(d, m)
            for d in missing:
                out[d] = self._merge(d, raw[d], raw.__getitem__)
        return out

    async def _manifest(self, digest: bytes) -> Manifest:
        return (await self._manifests([digest]))[digest]

    def _whole_cached(self, digest: bytes) -> Manifest | None:
        got = self._dirs.get(digest)
        if got is not None:
            self._dirs.move_to_end(digest)
            return got[0]
        top = self.checkpoints.cached_manifest(digest)
        if top is None:
            return None
        pieces = {c: self.checkpoints.cached_manifest(c) for c in top.chunks}
        if any(m is None for m in pieces.values()):
            return None
        return self._merge(digest, top, lambda c: pieces[c] or top)

    def _merge(self, digest: bytes, top: Manifest, chunk: Callable[[bytes], Manifest]) -> Manifest:
        """A stored manifest made whole; directories are kept (merged, with their sorted
        names) for the lookups and readdirs that follow."""
        if top.kind != "dir":
            return top
        m = top
        if top.chunks:
            entries: dict[bytes, Entry] = {}
            for c in top.chunks:
                entries.update(chunk(c).entries)
            m = Manifest(top.kind, top.self_entry, entries, top.chunks)
        self._keep(digest, m)
        return m

    def _keep(self, digest: bytes, m: Manifest) -> tuple[Manifest, list[bytes], int]:
        got = (m, sorted(m.entries), sum(1 for e in m.entries.values() if e.is_dir))
        self._dirs[digest] = got
        while len(self._dirs) > DIR_CACHE:
            self._dirs.popitem(last=False)
        return got

    def _listing(self, digest: bytes, m: Manifest) -> tuple[list[bytes], int]:
        """A whole directory manifest's names in byte order and its number of subdirectories."""
        got = self._dirs.get(digest)
        if got is None:
            got = self._keep(digest, m)
        else:
            self._dirs.move_to_end(digest)
        return got[1], got[2]

    # ---- the ways in ----------------------------------------------------------------------------

    def snapshots_dir(self, anchor: InodeRow) -> Attr:
        """`.snapshots` of a workspace root (kind NSROOT) or of a scope (kind SCOPE)."""
        self._sweep()
        if NodeKind(anchor.kind) is NodeKind.SCOPE:
            n = VNode(("sc", anchor.id), VKind.SCOPE, anchor.id, None)
        else:
            assert anchor.namespace_id is not None
            n = VNode(("ws", anchor.namespace_id), VKind.SNAPSHOTS, anchor.id, None)
            n.ns_id = anchor.namespace_id
        return self._attr(self._intern(n))

    def _checkpoint_node(self, parent: VNode, ck: CheckpointRow, m: Manifest) -> VNode:
        kind = VKind.CHECKPOINT if parent.kind is VKind.SNAPSHOTS else VKind.BLOB_CHECKPOINT
        n = VNode(
            ("ck", ck.id, ck.created_ns, ck.root),
            kind,
            parent.anchor,
            parent,
            ns_id=parent.ns_id,
            checkpoint=ck,
            entry=m.self_entry,
        )
        if kind is VKind.CHECKPOINT:
            n.subdirs = self._listing(ck.root, m)[1]
        return self._intern(n)

    def _entry_node(self, parent: VNode, name: bytes, e: Entry, sub: Manifest | None) -> VNode:
        ck = parent.checkpoint
        assert ck is not None
        path = parent.path + b"/" + name
        if e.type == FILE and e.link is not None:
            key: tuple[object, ...] = ("l", ck.id, ck.created_ns, ck.root, e.link)
        else:
            key = ("p", ck.id, ck.created_ns, ck.root, path)
        n = VNode(key, VKind.ENTRY, parent.anchor, parent, parent.ns_id, ck, e, path)
        if sub is not None and e.manifest is not None:
            n.subdirs = self._listing(e.manifest, sub)[1]
        return self._intern(n)

    def added(self, parent: int, ck: CheckpointRow, m: Manifest) -> Attr:
        """The node of a checkpoint just taken in `parent` (SNAPSHOTS or BLOB)."""
        self._sweep()
        return self._attr(self._checkpoint_node(self.node(parent), ck, m))

    async def manifest_of(self, ck: CheckpointRow) -> Manifest:
        return await self._manifest(ck.root)

    def _blobs(
        self, scope_ino: int, after: int = 0, limit: int = 1 << 30
    ) -> list[tuple[int, bytes, InodeRow]]:
        """(dentry id, name, inode) of the blob namespaces of a scope, after a dentry id."""
        out: list[tuple[int, bytes, InodeRow]] = []
        while len(out) < limit:
            rows = self.index.list_children(scope_ino, after, 256)
            for dentry_id, name, row in rows:
                after = dentry_id
                if NodeKind(row.kind) is NodeKind.FILE and row.namespace_id is not None:
                    out.append((dentry_id, name, row))
            if len(rows) < 256:
                break
        return out[:limit]

    def _checkpoint_by_name(self, ns_id: int, name: bytes) -> CheckpointRow:
        ck = self.index.checkpoint_by_name(ns_id, existing_name(name))
        if ck is None:
            raise NotFound()
        return ck

    async def lookup(self, parent: int, name: bytes) -> Attr:
        p = self.node(parent)
        if p.kind in (VKind.SNAPSHOTS, VKind.BLOB):
            ck = self._checkpoint_by_name(p.ns_id, name)
            m = await self._manifest(ck.root)
            self._sweep()
            return self._attr(self._checkpoint_node(p, ck, m))
        if p.kind is VKind.SCOPE:
            row = self.index.lookup_child_inode(p.anchor, name)
            if row is None or NodeKind(row.kind) is not NodeKind.FILE or row.namespace_id is None:
                raise NotFound()
            self._sweep()
            n = VNode(("b", row.namespace_id), VKind.BLOB, row.id, p, ns_id=row.namespace_id)
            return self._attr(self._intern(n))
        digest = p.listing
        if digest is None:
            raise NotADirectory()
        m = await self._manifest(digest)
        e = m.entries.get(name)
        if e is None:
            raise NotFound()
        sub = await self._manifest(e.manifest) if e.is_dir and e.manifest is not None else None
        self._sweep()
        return self._attr(self._entry_node(p, name, e, sub))

    async def readdir(self, ino: int, after: int, limit: int) -> list[VEntry]:
        """Entries after offset `after`: checkpoint ids in SNAPSHOTS and BLOB, dentry ids in
        SCOPE, positions in the (immutable) listing of a checkpoint directory."""
        p = self.node(ino)
        if p.kind in (VKind.SNAPSHOTS, VKind.BLOB):
            cks = sorted(
                (c for c in self.index.checkpoints_of(p.ns_id) if c.id > after),
                key=lambda c: c.id,
            )[:limit]
            ms = await self._manifests(c.root for c in cks)
            self._sweep()
            return [
                VEntry(
                    c.name.encode("utf-8", "surrogateescape"),
                    self._attr(self._checkpoint_node(p, c, ms[c.root])),
                    c.id,
                )
                for c in cks
            ]
        if p.kind is VKind.SCOPE:
            self._sweep()
            out = []
            for dentry_id, name, row in self._blobs(p.anchor, after, limit):
                assert row.namespace_id is not None
                n = VNode(("b", row.namespace_id), VKind.BLOB, row.id, p, ns_id=row.namespace_id)
                out.append(VEntry(name, self._attr(self._intern(n)), dentry_id))
            return out
        digest = p.listing
        if digest is None:
            raise NotADirectory()
        m = await self._manifest(digest)
        names = self._listing(digest, m)[0][after : after + limit]
        subs = await self._manifests(
            e.manifest
            for e in (m.entries[name] for name in names)
            if e.is_dir and e.manifest is not None
        )
        self._sweep()
        out = []
        for i, name in enumerate(names, start=after + 1):
            e = m.entries[name]
            sub = subs.get(e.manifest) if e.manifest is not None else None
            out.append(VEntry(name, self._attr(self._entry_node(p, name, e, sub)), i))
        return out

    # ---- contents -----------------------------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        e = self.node(ino).entry
        if e is None or e.type != SYMLINK or e.target is None:
            raise InvalidArgument("not a symbolic link")
        return e.target

    def xattr(self, ino: int, name: bytes) -> bytes:
        e = self.node(ino).entry
        value = None if e is None else e.xattrs.get(name)
        if value is None:
            raise NoData()
        return value

    def xattr_names(self, ino: int) -> list[bytes]:
        e = self.node(ino).entry
        return [] if e is None else sorted(e.xattrs)

    def sha256(self, ino: int) -> bytes | None:
        """The recorded whole-content SHA-256 of a file, None for anything else."""
        e = self.node(ino).entry
        return e.sha256 if e is not None and e.type == FILE else None

    def open(self, ino: int, writing: bool) -> None:
        n = self.node(ino)
        if writing:
            raise ReadOnly("checkpoints are read-only")
        if n.is_dir:
            return
        assert n.entry is not None
        if n.entry.type != FILE:
            raise NotSupported("special files are opened by the kernel, not artifactfs")
        n.opens += 1

    def close(self, ino: int) -> None:
        n = self._by_ino.get(ino)
        if n is not None and n.opens > 0:
            n.opens -= 1
            self.reap(ino)

    async def read(self, ino: int, off: int, size: int) -> bytes:
        n = self.node(ino)
        e = n.entry
        if e is None or e.is_dir:
            raise IsADirectory()
        end = min(off + size, e.size)
        if off >= end:
            return b""
        if n.blockmap is None:
            n.blockmap = dict(e.blocks)
        bs = self.io.block_size
        parts: list[bytes | None] = []
        fetch: list[tuple[bytes, int, int]] = []
        fetch_at: list[tuple[int, int]] = []  # (index into parts, wanted length)
        for idx in range(off // bs, (end - 1) // bs + 1):
            start = idx * bs
            s = max(off, start) - start
            t = min(end, start + bs) - start
            digest = n.blockmap.get(idx)
            if digest is None:
                parts.append(bytes(t - s))  # a hole
            else:
                fetch_at.append((len(parts), t - s))
                parts.append(None)
                fetch.append((digest, s, t - s))
        if fetch:
            got = await self.io.read_many(fetch)
            for (pos, want), data in zip(fetch_at, got, strict=True):
                # A stored block may end before the file does: zeros up to the file size.
                parts[pos] = data + bytes(want - len(data)) if len(data) < want else data
        return b"".join(p for p in parts if p is not None)
