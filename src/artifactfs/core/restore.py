"""Restore: make a live namespace exactly a checkpoint's tree, in one index transaction.

The walk compares the target tree with the live one and touches only what differs: a live
directory that is clean and whose recorded digest equals the target's is skipped whole, so a
restore after a few changes costs what those changes cost, not the size of the namespace.

What it does to the live tree:
  - a name absent from the target is removed (a directory with its whole subtree);
  - a file, symlink or special node that differs in anything (content, mode, owner, times,
    xattrs, link group) is *replaced* by a new inode built from the manifest, and one that is
    equal is kept. Replacing instead of rewriting means a process holding the old file open
    keeps reading the old content whole, never a mix of both states;
  - a directory is kept (same inode, so a process whose working directory it is stays
    there) and its attributes are set back, times included; one that is missing is created;
  - names of one hard-linked file in the target end up on one inode.
Directories that end up exactly as the manifest says are recorded clean with its digest, so
the next checkpoint reuses them.

Inodes left without names are not deleted here: another process (a mounted daemon) may hold
them open. They are announced in the change feed, and each daemon reclaims those it does not
use; with no mount running they are deleted at once.

Two phases, because the trio thread must not wait for blob reads inside a transaction: first
load every manifest the walk will need (worker threads), then apply in one transaction; if
the live tree changed in between so that a manifest is missing, load it and try again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import trio

from artifactfs.core.checkpoints import Checkpoints, entry_from_row
from artifactfs.core.filedata import stored_estimate
from artifactfs.core.manifest import DIR, FILE, SPECIAL, SYMLINK, Entry, Manifest
from artifactfs.core.nodes import NodeKind
from artifactfs.core.progress import Progress
from artifactfs.errors import Corrupt, NotFound
from artifactfs.index.db import Index, InodeRow, NamespaceRow

# Change-feed kinds (index `changes.kind`).
CHANGE_ENTRY = 0  # (dir ino, name): the kernel's cached lookup of that name is stale
CHANGE_INODE = 1  # ino: cached attributes and pages are stale
CHANGE_ORPHAN = 2  # ino: has no names left; reclaim it unless a handle or lookup holds it

# How long a restore waits for running mounts to apply its change feed.
MOUNT_ACK_TIMEOUT = 5.0

_KIND_OF_TYPE = {FILE: NodeKind.FILE, SYMLINK: NodeKind.SYMLINK, SPECIAL: NodeKind.SPECIAL}


@dataclass(slots=True)
class RestoreResult:
    changed: int  # names added, removed or replaced, plus directories whose attributes moved
    seq: int  # last change-feed row written (0 if none)
    mounts_acked: bool = True


class _NeedManifest(Exception):
    def __init__(self, digest: bytes) -> None:
        self.digest = digest


@dataclass(slots=True)
class _Apply:
    """One application of a restore (phase 2), inside a single transaction."""

    index: Index
    ns: NamespaceRow
    manifests: dict[bytes, Manifest]
    block_size: int
    now: int
    links: dict[int, int] = field(default_factory=dict)  # manifest link key -> live inode
    changes: list[tuple[int, int, bytes | None]] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    changed: int = 0
    progress: Progress | None = None
    dirs: int | None = None  # directories the walk should visit, for the progress total

    def manifest(self, digest: bytes | None) -> Manifest:
        if digest is None:
            raise Corrupt("a directory entry without a manifest")
        m = self.manifests.get(digest)
        if m is None:
            raise _NeedManifest(digest)
        return m

    # ---- entries of live nodes, for comparison ---------------------------------------------

    def _live_entry(
        self,
        row: InodeRow,
        xattrs: dict[int, dict[bytes, bytes]],
        blocks: dict[int, list[tuple[int, bytes]]],
        links: dict[int, bytes],
    ) -> Entry:
        return entry_from_row(
            row, xattrs=xattrs.get(row.id), target=links.get(row.id), blocks=blocks.get(row.id)
        )

    def _same_node(self, row: InodeRow, e: Entry) -> bool:
        """Whether live inode `row` (read on its own) is exactly entry `e`."""
        if NodeKind(row.kind) is not NodeKind.FILE or row.nlink <= 0:
            return False
        if row.namespace_id != self.ns.id:
            return False
        live = entry_from_row(
            row, xattrs=self.index.xattrs_of(row.id), blocks=self.index.blocks_of(row.id)
        )
        return live == e

    # ---- removing --------------------------------------------------------------------------

    def _unname(self, parent: int, name: bytes, row: InodeRow) -> None:
        """Remove one name; its node (and a directory's subtree) goes if no name is left."""
        self.index.remove_dentry(parent, name)
        self.changes.append((CHANGE_ENTRY, parent, name))
        self.changed += 1
        if NodeKind(row.kind).is_dir:
            self.index.add_nlink(parent, -1)
            self._drop_subtree(row)
            return
        self.index.add_nlink(row.id, -1, ctime_ns=self.now)
        left = self.index.get_inode(row.id)  # `row` may predate other names' removal
        if left is not None and left.nlink <= 0:
            self.orphans.append(row.id)

    def _drop_subtree(self, row: InodeRow) -> None:
        stack = [row]
        while stack:
            d = stack.pop()
            for name, child in self.index.children(d.id):
                self.index.remove_dentry(d.id, name)
                self.changes.append((CHANGE_ENTRY, d.id, name))
                if NodeKind(child.kind).is_dir:
                    stack.append(child)
                else:
                    self.index.add_nlink(child.id, -1, ctime_ns=self.now)
                    left = self.index.get_inode(child.id)
                    if left is not None and left.nlink <= 0:
                        self.orphans.append(child.id)
            self.index.add_nlink(d.id, -d.nlink, ctime_ns=self.now)
            self.orphans.append(d.id)

    # ---- creating --------------------------------------------------------------------------

    def _write_attrs(self, ino: int, e: Entry, *, kind: NodeKind) -> None:
        stored = 0
        if kind is NodeKind.FILE and e.blocks:
            top = max(i for i, _ in e.blocks)
            has_last = top == (e.size - 1) // self.block_size if e.size else False
            stored = stored_estimate(len(e.blocks), e.size, self.block_size, has_last)
        row = InodeRow(
            id=ino,
            kind=int(kind),
            mode=e.mode,
            uid=e.uid,
            gid=e.gid,
            nlink=0,  # not written
            size=e.size,
            rdev=e.rdev,
            atime_ns=e.atime_ns,
            mtime_ns=e.mtime_ns,
            ctime_ns=e.ctime_ns,
            btime_ns=e.btime_ns,
            namespace_id=self.ns.id,
            sha256=e.sha256 if kind is NodeKind.FILE else None,
            stored=stored,
        )
        self.index.write_inode_exact(row)

    def _create(self, parent: int, name: bytes, e: Entry) -> int:
        if e.type == DIR:
            kind = NodeKind.DIR
            nlink = 2
        else:
            kind = _KIND_OF_TYPE[e.type]
            nlink = 1
        new = self.index.insert_inode(
            kind=int(kind),
            mode=e.mode,
            uid=e.uid,
            gid=e.gid,
            nlink=nlink,
            time_ns=self.now,
            namespace_id=self.ns.id,
            size=e.size,
            rdev=e.rdev,
        )
        if kind is NodeKind.FILE and e.blocks:
            self.index.set_blocks(new.id, e.blocks)
        if kind is NodeKind.SYMLINK:
            self.index.set_symlink(new.id, e.target or b"")
        if e.xattrs:
            self.index.replace_xattrs(new.id, e.xattrs)
        self._write_attrs(new.id, e, kind=kind)
        self.index.add_dentry(parent, name, new.id)
        if kind is NodeKind.DIR:
            self.index.add_nlink(parent, 1)
        self.changes.append((CHANGE_ENTRY, parent, name))
        self.changed += 1
        return new.id

    def _link(self, parent: int, name: bytes, ino: int) -> None:
        self.index.add_dentry(parent, name, ino)
        self.index.add_nlink(ino, 1)
        self.changes.append((CHANGE_ENTRY, parent, name))
        self.changed += 1

    # ---- the walk --------------------------------------------------------------------------

    def directory(self, row: InodeRow, digest: bytes) -> tuple[bool, int, int]:
        """Make directory `row` the manifest `digest`. Returns (exact, files, bytes)."""
        m = self.manifest(digest)
        exact = True
        files = nbytes = 0
        live = dict(self.index.children(row.id))
        for name, gone in live.items():
            if name not in m.entries:
                self._unname(row.id, name, gone)
        xattrs = self.index.children_xattrs(row.id)
        blocks = self.index.children_blocks(row.id)
        symlinks = self.index.children_symlinks(row.id)
        for name, e in m.entries.items():
            child = live.get(name)
            if e.type == DIR:
                if child is not None and NodeKind(child.kind) is not NodeKind.DIR:
                    self._unname(row.id, name, child)
                    child = None
                if child is None:
                    created = self.index.get_inode(self._create(row.id, name, e))
                    assert created is not None
                    sub = self.directory(created, e.manifest or b"")
                else:
                    state = self.index.dir_state(child.id)
                    if state is not None and state.digest == e.manifest:
                        sub = (True, state.files, state.bytes)
                    else:
                        sub = self.directory(child, e.manifest or b"")
                exact = exact and sub[0]
                files += sub[1]
                nbytes += sub[2]
                continue
            if e.type == FILE:
                files += 1
                nbytes += e.size
            if child is not None:
                live_e = self._live_entry(child, xattrs, blocks, symlinks)
                if e.link is not None and live_e.link is not None:
                    # Link keys are inode numbers as of the checkpoint: a group restored
                    # earlier lives on other inodes, which the map below pairs up.
                    live_e = dataclasses.replace(live_e, link=e.link)
                if live_e == e and (
                    e.link is None or self.links.setdefault(e.link, child.id) == child.id
                ):
                    if e.link is not None and child.id != e.link:
                        exact = False
                    continue
                self._unname(row.id, name, child)
                self.changed -= 1  # a replacement counts once
            if e.link is not None:
                ino = self.links.get(e.link)
                if ino is None:
                    existing = self.index.get_inode(e.link)
                    if existing is not None and self._same_node(existing, e):
                        ino = e.link
                if ino is not None:
                    self._link(row.id, name, ino)
                else:
                    ino = self._create(row.id, name, e)
                self.links[e.link] = ino
                if ino != e.link:
                    exact = False  # the link key is the inode number: the manifest differs
            else:
                self._create(row.id, name, e)
        # Attributes last: removing and adding names above moved mtime and ctime.
        before = self.index.get_inode(row.id)
        self._write_attrs(row.id, m.self_entry, kind=NodeKind(row.kind))
        if m.self_entry.xattrs != self.index.xattrs_of(row.id):
            self.index.replace_xattrs(row.id, m.self_entry.xattrs)
        after = self.index.get_inode(row.id)
        if before != after:
            self.changes.append((CHANGE_INODE, row.id, None))
        if exact:
            self.index.set_clean(row.id, digest, files, nbytes)
        if self.progress is not None:
            self.progress("apply", 1, self.dirs)
        return exact, files, nbytes

    def blob(self, root: InodeRow, m: Manifest) -> None:
        """A blob namespace: its one file is replaced by a new inode if it differs (a reader
        holding the old one open keeps the old content whole)."""
        e = m.self_entry
        live = entry_from_row(
            root, xattrs=self.index.xattrs_of(root.id), blocks=self.index.blocks_of(root.id)
        )
        if live == e:
            return
        where = self.index.parent_of(root.id)
        if where is None:
            raise Corrupt("the blob namespace has no name")
        scope, name = where
        self._unname(scope, name, root)
        ino = self._create(scope, name, e)
        self.index.set_namespace_root(self.ns.id, ino)
        self.changed -= 1  # one replacement, counted once


async def _load_needed(
    cp: Checkpoints,
    root: InodeRow,
    digest: bytes,
    have: dict[bytes, Manifest],
    progress: Progress | None,
) -> int:
    """Phase 1: load the manifests the walk will visit (read-only index queries). Returns
    how many directories the walk will visit."""
    index = cp.index
    todo: list[tuple[InodeRow | None, bytes]] = [(root, digest)]
    visits = 0
    while todo:
        row, d = todo.pop()
        visits += 1
        if d not in have:
            have[d] = await cp.manifest(d)
            if progress is not None:
                progress("load", 1, None)
        m = have[d]
        if m.kind != "dir":
            continue
        live = dict(index.children(row.id)) if row is not None else {}
        for name, e in m.entries.items():
            if e.type != DIR or e.manifest is None:
                continue
            child = live.get(name)
            if child is not None and NodeKind(child.kind) is NodeKind.DIR:
                state = index.dir_state(child.id)
                if state is not None and state.digest == e.manifest:
                    continue
                todo.append((child, e.manifest))
            else:
                todo.append((None, e.manifest))
    return visits


def _live_mounts_behind(index: Index, seq: int) -> list[int]:
    return [m.id for m in index.live_mounts() if m.seen_seq < seq]


async def wait_for_mounts(index: Index, seq: int, timeout: float = MOUNT_ACK_TIMEOUT) -> bool:
    """Wait until every running mount of the store has applied the change feed up to `seq`."""
    with trio.move_on_after(timeout):
        while _live_mounts_behind(index, seq):
            await trio.sleep(0.01)
        return True
    return False


async def restore(
    cp: Checkpoints,
    ns: NamespaceRow,
    root: bytes,
    *,
    actor: str,
    name: str | None = None,
    wait: bool = True,
    progress: Progress | None = None,
) -> RestoreResult:
    """Make namespace `ns` exactly the tree of root manifest `root` (see the module doc).

    `progress`: phases "load" (manifests read) and "apply" (directories made so)."""
    index = cp.index
    index.flush()
    have: dict[bytes, Manifest] = {}
    for _attempt in range(20):
        root_row = index.get_inode(ns.root_inode)
        if root_row is None:
            raise NotFound("the namespace no longer exists")
        dirs = await _load_needed(cp, root_row, root, have, progress)
        try:
            with index.txn():
                root_row = index.get_inode(ns.root_inode)
                if root_row is None:
                    raise NotFound("the namespace no longer exists")
                work = _Apply(
                    index, ns, have, cp.io.block_size, time.time_ns(), progress=progress, dirs=dirs
                )
                m = work.manifest(root)
                if m.kind == "blob":
                    if NodeKind(root_row.kind) is not NodeKind.FILE:
                        raise Corrupt("a blob checkpoint cannot be restored into a workspace")
                    work.blob(root_row, m)
                else:
                    if NodeKind(root_row.kind) is NodeKind.FILE:
                        raise Corrupt("a workspace checkpoint cannot be restored into a blob")
                    work.directory(root_row, root)
                running = bool(_live_mounts_behind(index, index.max_change_seq() + 1))
                if not running:
                    # No mount can hold these inodes: reclaim them now.
                    for ino in work.orphans:
                        left = index.get_inode(ino)
                        if left is not None and left.nlink <= 0:
                            index.delete_inode(ino)
                    work.orphans.clear()
                feed = work.changes + [(CHANGE_ORPHAN, ino, None) for ino in work.orphans]
                seq = index.append_changes(feed) if feed else 0
                index.append_event(
                    "checkpoint.restore",
                    {
                        "namespace": ns.public_id,
                        "name": name,
                        "root": root.hex(),
                        "actor": actor,
                        "changed": work.changed,
                    },
                    sandbox=cp.sandbox_of(ns),
                )
        except _NeedManifest as need:
            have[need.digest] = await cp.manifest(need.digest)
            continue
        index.flush()
        if cp.on_changes is not None and feed:
            cp.on_changes(feed)
        acked = await wait_for_mounts(index, seq) if (wait and seq) else True
        return RestoreResult(work.changed, seq, acked)
    raise Corrupt("the namespace kept changing during the restore; try again")
