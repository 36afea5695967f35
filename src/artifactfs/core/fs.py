"""The filesystem core: every operation of the mounted tree, on plain Python types.

Owns the shape of the grid (root -> sandboxes -> scopes -> namespaces) and POSIX semantics
inside workspaces. Each operation runs as one index transaction on the trio thread; contents
go through `FileData`/`BlockIO` (worker threads). Visibility and write access to grid places
come from `policy.decide`, nowhere else.

`.snapshots` (of workspace roots and scopes) is not in the index: its nodes have virtual
inode numbers and each operation on one dispatches to `snapview.SnapView`. Every change under
`.snapshots` is EROFS, except taking checkpoints (mkdir there, or a create in a blob's
directory) and deleting them (rmdir, unlink).

Must not: import pyfuse3, write SQL, or block the trio thread on hashing or blob I/O.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.journal import (
    JournalReader,
    dead_segments,
    read_segment,
    remove_segments,
)
from artifactfs.core import acl, background
from artifactfs.core.blockio import BlockIO
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.filedata import FileData
from artifactfs.core.names import (
    NAME_MAX,
    SNAPSHOTS_NAME,
    check_grid_name,
    check_name,
    check_sandbox_name,
    parse_scope_name,
)
from artifactfs.core.nodes import KINDS, ROOT_INODE, Attr, AttrChanges, Caller, FsStats, NodeKind
from artifactfs.core.policy import ADMIN, Decision, Op, Place, View, decide
from artifactfs.core.snapview import (
    VIRTUAL_BASE,
    SnapView,
    VKind,
    decode_name,
    existing_name,
    is_virtual,
)
from artifactfs.errors import (
    AccessDenied,
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
    ReadOnly,
)
from artifactfs.index.db import CheckpointRow, Index, InodeRow, NamespaceRow

log = logging.getLogger(__name__)

XATTR_SHA256 = b"user.artifactfs.sha256"
XATTR_NAMESPACE = b"user.artifactfs.namespace"
READONLY_XATTRS = (XATTR_SHA256, XATTR_NAMESPACE)
# The namespaces of extended attributes that can be stored; any other (system.*) never is.
STORED_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
# Per-inode budget for user xattrs (names + values), as ext4 limits them to one block.
XATTR_TOTAL_MAX = 64 * 1024 + 4096
MAX_FILE_SIZE = 1 << 50
EMPTY_SHA256 = hashlib.sha256(b"").digest()
DIR_KINDS = (NodeKind.ROOT, NodeKind.SANDBOX, NodeKind.SCOPE, NodeKind.NSROOT, NodeKind.DIR)


@dataclass(slots=True)
class Handle:
    ino: int
    flags: int
    data: FileData | None  # None for directories


@dataclass(slots=True)
class DirEntry:
    name: bytes
    attr: Attr
    next_offset: int


def _now() -> int:
    return time.time_ns()


class FileSystem:
    def __init__(self, index: Index, io: BlockIO, *, view: View = ADMIN) -> None:
        self.index = index
        self.io = io
        self.view = view
        self.bs = io.block_size
        self.lookups: dict[int, int] = {}
        self.files: dict[int, FileData] = {}
        # Released files whose whole-file digest is still being computed (FileData._hashed
        # records it): a getfattr or checkpoint waits for it instead of hashing again.
        self.hashing: dict[int, FileData] = {}
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None
        self.checkpoints = Checkpoints(index, io)
        if io.others is None:  # a second core on the same BlockIO (the sweeper) shares it
            # Any thread: a small block another process journalled and has not stored yet
            # (or that a daemon that died left in its journal).
            io.others = JournalReader.beside(index.path).get
        # `.snapshots`: virtual inodes, counted in `lookups` like real ones.
        self.snap = SnapView(index, io, self.checkpoints, self.lookups)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery, *, reclaim_orphans: bool = True) -> None:
        """Attach to the nursery that runs background stores; reclaim what a crash left
        (not the unlinked inodes when another mount of the store runs: it may hold them)."""
        self._nursery = nursery
        self._adopt_dead_journals()
        nursery.start_soon(self._mover)
        orphans = self.index.unlinked_inodes() if reclaim_orphans else []
        if orphans:
            with self.index.txn():
                for ino in orphans:
                    self.index.delete_inode(ino)
            log.info("reclaimed %d unlinked inodes left by an earlier run", len(orphans))

    async def shutdown(self) -> None:
        """Commit every open file and store every journalled block (unmount, daemon stop)."""
        for data in list(self.files.values()):
            await data.commit()
        await self.digests_settled()
        await self.io.drained()
        await self.retire_journal()
        self.index.flush()
        self.checkpoints.close()

    async def make_durable(self) -> None:
        """Everything committed so far, blobs first, onto stable storage (fsyncdir)."""
        await self.io.sync()
        self.index.make_durable()

    async def _mover(self) -> None:
        """Store journalled small blocks in the backend, in batches, off the request path."""
        full = False  # a full backend is logged once, not at every retry
        while True:
            batch = await self.io.next_batch()
            if isinstance(self.io.backend, CachedBackend):
                # A remote store's uploader may have sent a journalled block to the bucket
                # already (it does when the cache is full): putting it into the cache now
                # would pin a copy that nothing uploads again, filling the cache with them.
                there = self.index.upload_states(d for d, _ in batch)
                skip = [(d, b) for d, b in batch if there.get(d)]
                if skip:
                    batch = [(d, b) for d, b in batch if not there.get(d)]
                    self.io.moved(skip, ok=True, put=False)
                    if not batch:
                        continue
            try:
                done = await self.io.move(batch)
            except Exception as exc:
                # The blocks stay journalled and readable; try again shortly.
                if not isinstance(exc, NoSpace):
                    log.error("storing %d journalled blocks failed: %s", len(batch), exc)
                elif not full:
                    log.warning("journalled blocks wait for room in the block store: %s", exc)
                full = isinstance(exc, NoSpace)
                self.io.moved(batch, ok=False)
                await trio.sleep(1.0)
                continue
            full = False
            if done < len(batch):  # a writer came back: the rest waits for its next pause
                self.io.moved(batch[done:], ok=False)
                batch = batch[:done]
            if batch:
                self.io.moved(batch, ok=True)

    def _adopt_dead_journals(self) -> None:
        """Small blocks journalled by daemons that died (their segments' flock is free):
        served from memory and stored by our mover; each segment goes once its blocks are
        stored and synced, as our own do."""
        journal = self.io.journal
        if journal is None:
            return
        count = 0
        for path, fd in dead_segments(journal.directory, journal):
            blocks = read_segment(fd)
            journal.adopt(path, fd, blocks)
            for digest, data in blocks:
                if digest not in self.io.pending:
                    self.io.hold(len(data))
                    self.io.queue_pending(digest, data)
                    count += 1
        if count:
            log.info("storing %d journalled blocks left by an earlier run", count)

    async def retire_journal(self) -> None:
        """Delete the journal segments whose blocks the mover has stored, once those are
        synced: were the blobs still only in the page cache, a power loss could lose blocks
        of files that were fsynced while journalled. One sync per call (the daemon calls it
        once writes pause, see fuse/daemon.py: retire_due) instead of one per batch keeps
        the mover cheap. The segment being written is closed first: the next block starts
        a new one."""
        journal = self.io.journal
        if journal is None:
            return
        done = journal.retirable()
        if done:
            await self.io.sync()
            gone = journal.drop(done)
            if gone:
                await background.run(remove_segments, gone)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "FileSystem.start() was not called"
        return self._nursery

    # ---- rows, attributes, places -------------------------------------------------------------

    def _row(self, ino: int) -> InodeRow:
        row = self.index.get_inode(ino)
        if row is None:
            raise NotFound(f"inode {ino} does not exist")
        return row

    def _attr(self, row: InodeRow) -> Attr:
        kind = KINDS[row.kind]
        size, mtime, ctime = row.size, row.mtime_ns, row.ctime_ns
        stored = 0
        data = self.files.get(row.id)
        if data is not None:
            size, mtime, ctime = data.size, data.mtime_ns, data.ctime_ns
            stored = data.stored_bytes()
        elif kind is NodeKind.FILE:
            stored = row.stored
        elif kind.is_dir:
            stored = 4096
        # Positional: every reply builds one (readdir one per entry), and keywords cost more.
        return Attr(
            row.id,
            row.mode,
            row.nlink,
            row.uid,
            row.gid,
            row.rdev,
            size,
            row.atime_ns,
            mtime,
            ctime,
            row.btime_ns,
            stored,
            kind,
        )

    def _place(self, row: InodeRow) -> Place:
        """The grid place an inode belongs to, for the policy."""
        kind = KINDS[row.kind]
        if kind is NodeKind.ROOT:
            return Place()
        if kind is NodeKind.SANDBOX:
            sb = self.index.sandbox_by_inode(row.id)
            return Place(sandbox=sb.name if sb else "?")
        if kind is NodeKind.SCOPE:
            scope = self.index.scope_by_inode(row.id)
        else:
            ns = self.index.namespace_by_id(row.namespace_id) if row.namespace_id else None
            scope = self.index.scope_by_id(ns.scope_id) if ns else None
        if scope is None:
            return Place(sandbox="?", scope_kind="?")
        sb = self.index.sandbox_by_id(scope.sandbox_id)
        expired = scope.expires_ns is not None and scope.expires_ns <= time.time_ns()
        return Place(
            sandbox=sb.name if sb else "?",
            scope_kind=scope.kind,
            scope_owner=scope.owner,
            expired=expired,
        )

    def _require(self, op: Op, row: InodeRow) -> None:
        if self.view.is_admin:
            return
        decision = decide(self.view, op, self._place(row))
        if decision is Decision.ALLOW:
            return
        if decision is Decision.HIDDEN:
            raise NotFound()
        if decision is Decision.READ_ONLY:
            raise ReadOnly()
        raise AccessDenied()

    def require_write(self, ino: int) -> None:
        """Raise unless this view may change `ino` (the API asks before checkpoint ops)."""
        self._require(Op.WRITE, self._row(ino))

    def _visible(self, row: InodeRow) -> bool:
        # The administrative view sees everything but expired session scopes, which only
        # a scope row can be (what is inside is reached through it).
        if self.view.is_admin and KINDS[row.kind] is not NodeKind.SCOPE:
            return True
        return decide(self.view, Op.SEE, self._place(row)) is not Decision.HIDDEN

    def remember(self, ino: int, n: int = 1) -> None:
        """The kernel now holds `n` more references to `ino` (lookup counts)."""
        self.lookups[ino] = self.lookups.get(ino, 0) + n

    def forget(self, items: Iterable[tuple[int, int]]) -> None:
        doomed = []
        for ino, n in items:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                doomed.append(ino)
        for ino in doomed:
            self._reap(ino)

    def reap_orphan(self, ino: int) -> None:
        """Another process left `ino` without names (a restore): delete it unless this
        mount still uses it; a later forget or release reaps it otherwise."""
        self._reap(ino)

    def _reap(self, ino: int) -> None:
        """Delete an inode that has no names, no kernel references and no open handles."""
        if ino in self.lookups or ino in self.files or ino == ROOT_INODE:
            return
        if is_virtual(ino):
            self.snap.reap(ino)
            return
        row = self.index.get_inode(ino)
        if row is not None and row.nlink == 0:
            with self.index.txn():
                self.index.delete_inode(ino)

    # ---- lookup and attributes ----------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes, caller: Caller) -> Attr:
        if is_virtual(parent) and name not in (b".", b".."):
            if len(name) > NAME_MAX:
                raise NameTooLong(f"name of {len(name)} bytes is longer than {NAME_MAX}")
            self._snap_visible(parent)
            attr = await self.snap.lookup(parent, name)
        else:
            attr = self._lookup(parent, name)
        # No checkpoint between the lookup and this: see snapview (interning).
        self.remember(attr.ino)
        return attr

    def _lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > NAME_MAX:
            raise NameTooLong(f"name of {len(name)} bytes is longer than {NAME_MAX}")
        if is_virtual(parent):
            if name == b".":
                return self.snap.attr(parent)
            pino, virtual = self.snap.parent_of(parent)
            return self.snap.attr(pino) if virtual else self._attr(self._row(pino))
        if name == b".":
            return self._attr(self._row(parent))
        if name == b"..":
            up = self.index.parent_of(parent)
            return self._attr(self._row(up[0] if up else ROOT_INODE))
        row = self.index.lookup_child_inode(parent, name)
        if row is None:
            prow = self._row(parent)
            if not KINDS[prow.kind].is_dir:
                raise NotADirectory()
            if self._is_snapshots(prow, name):
                if not self._visible(prow):
                    raise NotFound()
                return self.snap.snapshots_dir(prow)
            raise NotFound()
        if KINDS[row.kind] in (NodeKind.SANDBOX, NodeKind.SCOPE) and not self._visible(row):
            raise NotFound()
        return self._attr(row)

    async def getattr(self, ino: int) -> Attr:
        if is_virtual(ino):
            return self.snap.attr(ino)
        return self._attr(self._row(ino))

    async def setattr(self, ino: int, ch: AttrChanges, caller: Caller) -> Attr:
        self._refuse_virtual(ino)
        row = self._row(ino)
        kind = KINDS[row.kind]
        self._require(Op.WRITE, row)
        if kind.is_grid and (ch.size is not None or ch.uid is not None or ch.gid is not None):
            raise NotPermitted("grid directories cannot be resized or given away")
        now = _now()
        if ch.size is not None:
            if kind.is_dir:
                raise IsADirectory()
            if kind is not NodeKind.FILE:
                raise InvalidArgument()
            if ch.size > MAX_FILE_SIZE:
                raise FileTooBig()
            sized = self._acquire(row)
            try:
                await sized.truncate(ch.size)
                await sized.commit()
            finally:
                self._release_data(sized)
            row = self._row(ino)
        data = self.files.get(ino)
        if ch.mode is not None:
            row.mode = stat.S_IFMT(row.mode) | (ch.mode & 0o7777)
        if ch.uid is not None and ch.uid != 0xFFFFFFFF:
            row.uid = ch.uid
        if ch.gid is not None and ch.gid != 0xFFFFFFFF:
            row.gid = ch.gid
        if ch.atime_ns is not None:
            row.atime_ns = ch.atime_ns
        if ch.mtime_ns is not None:
            row.mtime_ns = ch.mtime_ns
            if data is not None:
                # Later commits of this open file must keep the time set here.
                data.mtime_ns = ch.mtime_ns
        row.ctime_ns = ch.ctime_ns if ch.ctime_ns is not None else now
        if data is not None:
            # The open file's size and mtime reach the index with its data at commit; writing
            # them here would let the index claim bytes whose blocks are not stored yet.
            data.ctime_ns = row.ctime_ns
        self.index.defer_inode(row)
        return self._attr(row)

    async def readlink(self, ino: int) -> bytes:
        if is_virtual(ino):
            return self.snap.readlink(ino)
        target = self.index.get_symlink(ino)
        if target is None:
            raise InvalidArgument("not a symbolic link")
        return target

    # ---- .snapshots ---------------------------------------------------------------------------

    @staticmethod
    def _is_snapshots(prow: InodeRow, name: bytes) -> bool:
        """Whether `name` in `prow` is a virtual `.snapshots` (workspace roots and scopes)."""
        return name == SNAPSHOTS_NAME and KINDS[prow.kind] in (NodeKind.NSROOT, NodeKind.SCOPE)

    def volatile(self, ino: int) -> bool:
        """Whether the kernel should not cache this node's entry and attributes: a virtual
        node standing for checkpoints another process may take or delete at any time.
        Asked for every reply's attributes (readdir: every entry), so the common answer for
        a real inode is one comparison, not a call."""
        return ino >= VIRTUAL_BASE and self.snap.volatile(ino)

    def _snap_visible(self, ino: int) -> None:
        """A virtual node is visible when the namespace (or scope) it belongs to is."""
        if not self.view.is_admin and not self._visible(self.snap.anchor_row(ino)):
            raise NotFound()

    def _refuse_virtual(self, *inos: int) -> None:
        for ino in inos:
            if is_virtual(ino):
                raise ReadOnly("checkpoints under .snapshots are read-only")

    def _snap_namespace(self, parent: int, want: VKind) -> NamespaceRow:
        """The namespace whose checkpoints `parent` (a virtual directory of kind `want`)
        lists, after the policy allowed changing it; EROFS for any other virtual directory."""
        if self.snap.kind(parent) is not want:
            raise ReadOnly("checkpoints under .snapshots are read-only")
        row = self.snap.anchor_row(parent)
        self._require(Op.WRITE, row)
        ns = self.index.namespace_by_id(row.namespace_id) if row.namespace_id else None
        if ns is None:
            raise NotFound("the namespace no longer exists")
        return ns

    async def _take_checkpoint(self, parent: int, name: bytes, want: VKind, caller: Caller) -> Attr:
        """`mkdir <ns>/.snapshots/NAME` (want SNAPSHOTS) or a create in
        `<scope>/.snapshots/<blob>/` (want BLOB): take a checkpoint named NAME."""
        ns = self._snap_namespace(parent, want)
        ck = await self.checkpoint(ns, decode_name(name), creator=f"uid:{caller.uid}")
        m = await self.snap.manifest_of(ck)
        attr = self.snap.added(parent, ck, m)
        self.remember(attr.ino)
        return attr

    async def _delete_checkpoint(
        self, parent: int, name: bytes, want: VKind, caller: Caller
    ) -> None:
        ns = self._snap_namespace(parent, want)
        await self.checkpoints.delete(ns, existing_name(name), actor=f"uid:{caller.uid}")

    # ---- creating -----------------------------------------------------------------------------

    def _dir_row(self, ino: int) -> InodeRow:
        row = self._row(ino)
        if not KINDS[row.kind].is_dir:
            raise NotADirectory()
        if row.nlink == 0:
            raise NotFound("directory was removed")
        return row

    def _check_free(self, parent: InodeRow, name: bytes) -> None:
        if self.index.lookup_child(parent.id, name) is not None:
            raise Exists()

    def _insert_child(
        self,
        parent: InodeRow,
        name: bytes,
        kind: NodeKind,
        mode: int,
        caller: Caller,
        *,
        namespace_id: int | None,
        rdev: int = 0,
        size: int = 0,
        now: int,
    ) -> InodeRow:
        gid = caller.gid
        if parent.mode & stat.S_ISGID and not KINDS[parent.kind].is_grid:
            gid = parent.gid
            if kind.is_dir:
                mode |= stat.S_ISGID
        is_dir = kind.is_dir
        row = self.index.insert_inode(
            kind=kind,
            mode=mode,
            uid=caller.uid,
            gid=gid,
            nlink=2 if is_dir else 1,
            time_ns=now,
            namespace_id=namespace_id,
            rdev=rdev,
            size=size,
            # A new file is empty, and the digest of nothing is known.
            sha256=EMPTY_SHA256 if kind is NodeKind.FILE else None,
        )
        if not self.index.add_new_dentry(parent.id, name, row.id):
            raise Exists()  # the unit rolls back, the inode row with it
        if is_dir:
            self.index.add_nlink(parent.id, 1)
        self.index.touch_inode(parent.id, mtime_ns=now, ctime_ns=now)
        return row

    async def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attr:
        if is_virtual(parent):
            return await self._take_checkpoint(parent, name, VKind.SNAPSHOTS, caller)
        prow = self._dir_row(parent)
        kind = KINDS[prow.kind]
        now = _now()
        mode = stat.S_IFDIR | (mode & 0o7777)
        with self.index.txn():
            if kind is NodeKind.ROOT:
                row = self._create_sandbox(prow, name, mode, caller, now)
            elif kind is NodeKind.SANDBOX:
                row = self._create_scope(prow, name, mode, caller, now)
            elif kind is NodeKind.SCOPE:
                row = self._create_namespace(prow, name, "workspace", mode, caller, now)
            else:
                self._check_inner_name(prow, name)
                self._require(Op.WRITE, prow)
                row = self._insert_child(
                    prow, name, NodeKind.DIR, mode, caller, namespace_id=prow.namespace_id, now=now
                )
        self.remember(row.id)
        return self._attr(row)

    def _check_inner_name(self, parent: InodeRow, name: bytes) -> None:
        check_name(name)
        if name == SNAPSHOTS_NAME and KINDS[parent.kind] is NodeKind.NSROOT:
            log.warning(
                "refused to create .snapshots at the top of workspace inode %d: the name is "
                "reserved for its checkpoints (EINVAL)",
                parent.id,
            )
            raise InvalidName(".snapshots is reserved at the top of a workspace")

    def _create_sandbox(
        self, root: InodeRow, name: bytes, mode: int, caller: Caller, now: int
    ) -> InodeRow:
        text = check_sandbox_name(name)
        if decide(self.view, Op.CREATE_SANDBOX, Place()) is not Decision.ALLOW:
            raise AccessDenied("this credential cannot create sandboxes")
        self._check_free(root, name)
        row = self._insert_child(
            root, name, NodeKind.SANDBOX, mode, caller, namespace_id=None, now=now
        )
        self.index.insert_sandbox(text, row.id, now)
        self.index.append_event("sandbox.create", {"name": text, "uid": caller.uid}, text)
        return row

    def _create_scope(
        self, sandbox: InodeRow, name: bytes, mode: int, caller: Caller, now: int
    ) -> InodeRow:
        try:
            scope = parse_scope_name(name)
        except InvalidName as exc:
            log.warning("refused to create scope %r: %s", name, exc)
            raise
        sb = self.index.sandbox_by_inode(sandbox.id)
        assert sb is not None
        place = Place(sandbox=sb.name, scope_kind=scope.kind, scope_owner=scope.owner)
        if decide(self.view, Op.CREATE_SCOPE, place) is not Decision.ALLOW:
            raise AccessDenied("this credential cannot create scopes")
        self._check_free(sandbox, name)
        row = self._insert_child(
            sandbox, name, NodeKind.SCOPE, mode, caller, namespace_id=None, now=now
        )
        self.index.insert_scope(sb.id, scope.kind, scope.owner, scope.name, row.id, now)
        self.index.append_event(
            "scope.create", {"sandbox": sb.name, "scope": scope.name, "uid": caller.uid}, sb.name
        )
        return row

    def _create_namespace(
        self, scope_row: InodeRow, name: bytes, kind: str, mode: int, caller: Caller, now: int
    ) -> InodeRow:
        text = check_grid_name(name, "namespace")
        self._require(Op.WRITE, scope_row)
        self._check_free(scope_row, name)
        scope = self.index.scope_by_inode(scope_row.id)
        assert scope is not None
        sb = self.index.sandbox_by_id(scope.sandbox_id)
        assert sb is not None
        node = NodeKind.NSROOT if kind == "workspace" else NodeKind.FILE
        row = self._insert_child(scope_row, name, node, mode, caller, namespace_id=None, now=now)
        public_id = uuid.uuid4().hex
        owner = self.view.user if not self.view.is_admin else str(caller.uid)
        ns_id = self.index.insert_namespace(public_id, scope.id, kind, owner, text, row.id, now)
        row.namespace_id = ns_id
        self.index.append_event(
            "namespace.create",
            {
                "id": public_id,
                "kind": kind,
                "sandbox": sb.name,
                "scope": scope.name,
                "name": text,
                "owner": owner,
            },
            sb.name,
        )
        return row

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, caller: Caller) -> Attr:
        self._refuse_virtual(parent)
        if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
            row = self._create_file(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        else:
            prow = self._dir_row(parent)
            if KINDS[prow.kind].is_grid:
                raise NotPermitted("only directories and regular files can be grid namespaces")
            self._check_inner_name(prow, name)
            self._require(Op.WRITE, prow)
            if not (
                stat.S_ISFIFO(mode)
                or stat.S_ISSOCK(mode)
                or stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode)
            ):
                raise InvalidArgument("unknown file type")
            now = _now()
            with self.index.txn():
                row = self._insert_child(
                    prow,
                    name,
                    NodeKind.SPECIAL,
                    mode,
                    caller,
                    namespace_id=prow.namespace_id,
                    rdev=rdev,
                    now=now,
                )
        self.remember(row.id)
        return self._attr(row)

    def _create_file(self, parent: int, name: bytes, mode: int, caller: Caller) -> InodeRow:
        prow = self._dir_row(parent)
        kind = KINDS[prow.kind]
        now = _now()
        with self.index.txn():
            if kind is NodeKind.SCOPE:
                return self._create_namespace(prow, name, "blob", mode, caller, now)
            if kind.is_grid:
                raise NotPermitted(
                    "files cannot be created here: the grid root holds sandboxes and a "
                    "sandbox holds scopes"
                )
            self._check_inner_name(prow, name)
            self._require(Op.WRITE, prow)
            return self._insert_child(
                prow, name, NodeKind.FILE, mode, caller, namespace_id=prow.namespace_id, now=now
            )

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Attr]:
        if is_virtual(parent):
            # `: > <scope>/.snapshots/<blob>/NAME` takes a checkpoint of the blob; the handle
            # is read-only whatever `flags` asked for.
            attr = await self._take_checkpoint(parent, name, VKind.BLOB, caller)
            return self._open_virtual(attr.ino, os.O_RDONLY), attr
        row = self._create_file(parent, name, stat.S_IFREG | (mode & 0o7777), caller)
        self.remember(row.id)
        fh = self._open_handle(row, flags)
        return fh, self._attr(row)

    async def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attr:
        self._refuse_virtual(parent)
        prow = self._dir_row(parent)
        if KINDS[prow.kind].is_grid:
            raise NotPermitted("symbolic links cannot be grid namespaces")
        self._check_inner_name(prow, name)
        self._require(Op.WRITE, prow)
        if len(target) > 4095 or not target:
            raise (
                NameTooLong("link target too long")
                if target
                else InvalidArgument("empty link target")
            )
        now = _now()
        with self.index.txn():
            row = self._insert_child(
                prow,
                name,
                NodeKind.SYMLINK,
                stat.S_IFLNK | 0o777,
                caller,
                namespace_id=prow.namespace_id,
                size=len(target),
                now=now,
            )
            self.index.set_symlink(row.id, target)
        self.remember(row.id)
        return self._attr(row)

    async def link(self, ino: int, new_parent: int, new_name: bytes, caller: Caller) -> Attr:
        self._refuse_virtual(ino, new_parent)
        row = self._row(ino)
        prow = self._dir_row(new_parent)
        kind = KINDS[row.kind]
        if kind.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        if KINDS[prow.kind].is_grid or row.namespace_id != prow.namespace_id:
            raise CrossDevice("hard links cannot cross namespaces")
        if row.nlink == 0:
            raise NotFound("the file was removed")
        self._check_inner_name(prow, new_name)
        self._require(Op.WRITE, prow)
        now = _now()
        with self.index.txn():
            self._check_free(prow, new_name)
            self.index.add_dentry(prow.id, new_name, ino)
            self.index.add_nlink(ino, 1, ctime_ns=now)
            self.index.touch_inode(prow.id, mtime_ns=now, ctime_ns=now)
        self.remember(ino)
        data = self.files.get(ino)
        if data is not None:
            data.ctime_ns = now
        return self._attr(self._row(ino))

    # ---- removing -----------------------------------------------------------------------------

    async def unlink(self, parent: int, name: bytes, caller: Caller) -> None:
        if is_virtual(parent):
            # `rm <scope>/.snapshots/<blob>/NAME` deletes that checkpoint of the blob.
            await self._delete_checkpoint(parent, name, VKind.BLOB, caller)
            return
        prow = self._dir_row(parent)
        row = self.index.lookup_child_inode(parent, name)
        if row is None:
            if self._is_snapshots(prow, name):
                raise ReadOnly(".snapshots cannot be removed")
            raise NotFound()
        kind = KINDS[row.kind]
        if kind.is_dir:
            raise IsADirectory()
        self._require(Op.WRITE, prow)
        now = _now()
        with self.index.txn():
            if KINDS[prow.kind] is NodeKind.SCOPE:
                self._destroy_namespace(row)
            self._drop_name(prow, name, row, now)
        self._reap(row.id)

    def _drop_name(self, prow: InodeRow, name: bytes, row: InodeRow, now: int) -> None:
        self.index.remove_dentry(prow.id, name)
        if KINDS[row.kind].is_dir:
            self.index.add_nlink(row.id, -row.nlink, ctime_ns=now)
            self.index.add_nlink(prow.id, -1)
        else:
            self.index.add_nlink(row.id, -1, ctime_ns=now)
            data = self.files.get(row.id)
            if data is not None:
                data.ctime_ns = now
        self.index.touch_inode(prow.id, mtime_ns=now, ctime_ns=now)

    async def rmdir(self, parent: int, name: bytes, caller: Caller) -> None:
        if is_virtual(parent):
            # `rmdir <ns>/.snapshots/NAME` deletes that checkpoint.
            await self._delete_checkpoint(parent, name, VKind.SNAPSHOTS, caller)
            return
        prow = self._dir_row(parent)
        row = self.index.lookup_child_inode(parent, name)
        if row is None:
            if self._is_snapshots(prow, name):
                raise ReadOnly(".snapshots cannot be removed")
            raise NotFound()
        if name == b".":
            raise InvalidArgument()
        kind = KINDS[row.kind]
        if not kind.is_dir:
            raise NotADirectory()
        if kind in (NodeKind.SANDBOX, NodeKind.SCOPE) and not self._visible(row):
            raise NotFound()
        if self.index.has_children(row.id):
            raise NotEmpty()
        pkind = KINDS[prow.kind]
        if pkind is NodeKind.ROOT:
            if decide(self.view, Op.CREATE_SANDBOX, Place()) is not Decision.ALLOW:
                raise AccessDenied("this credential cannot remove sandboxes")
        elif pkind is NodeKind.SANDBOX:
            if decide(self.view, Op.CREATE_SCOPE, self._place(row)) is not Decision.ALLOW:
                raise AccessDenied("this credential cannot remove scopes")
        else:
            self._require(Op.WRITE, prow)
        now = _now()
        with self.index.txn():
            if kind is NodeKind.SANDBOX:
                sb = self.index.sandbox_by_inode(row.id)
                assert sb is not None
                self.index.delete_sandbox(sb.id)
                self.index.append_event("sandbox.destroy", {"name": sb.name}, sb.name)
            elif kind is NodeKind.SCOPE:
                scope = self.index.scope_by_inode(row.id)
                assert scope is not None
                sb = self.index.sandbox_by_id(scope.sandbox_id)
                self.index.delete_scope(scope.id)
                self.index.append_event(
                    "scope.destroy",
                    {"scope": scope.name, "sandbox": sb.name if sb else None},
                    sb.name if sb else None,
                )
            elif kind is NodeKind.NSROOT:
                self._destroy_namespace(row)
            self._drop_name(prow, name, row, now)
        self._reap(row.id)

    def _destroy_namespace(self, root: InodeRow) -> None:
        ns = self.index.namespace_by_root(root.id)
        if ns is None:
            return
        scope = self.index.scope_by_id(ns.scope_id)
        sb = self.index.sandbox_by_id(scope.sandbox_id) if scope else None
        # Its checkpoints go with it (export one first to keep it); their manifests and
        # blocks are left for gc.
        doomed = [c.name for c in self.index.checkpoints_of(ns.id)]
        self.index.delete_checkpoints_of(ns.id)
        self.index.delete_namespace(ns.id)
        self.index.append_event(
            "namespace.destroy",
            {
                "id": ns.public_id,
                "kind": ns.kind,
                "name": ns.name,
                "scope": scope.name if scope else None,
                "sandbox": sb.name if sb else None,
                "checkpoints_deleted": doomed,
            },
            sb.name if sb else None,
        )

    # ---- rename -------------------------------------------------------------------------------

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int,
        caller: Caller,
    ) -> None:
        self._refuse_virtual(old_parent, new_parent)
        op = self._dir_row(old_parent)
        np = self._dir_row(new_parent)
        src = self.index.lookup_child_inode(old_parent, old_name)
        if src is None:
            if self._is_snapshots(op, old_name):
                raise ReadOnly(".snapshots cannot be renamed")
            raise NotFound()
        okind, nkind = KINDS[op.kind], KINDS[np.kind]
        if okind.is_grid or nkind.is_grid:
            await self._rename_grid(op, old_name, np, new_name, src, flags)
            return
        if op.namespace_id != np.namespace_id:
            raise CrossDevice("rename across namespaces: copy instead")
        self._check_inner_name(np, new_name)
        self._require(Op.WRITE, np)
        dst = self.index.lookup_child_inode(new_parent, new_name)
        exchange = bool(flags & RENAME_EXCHANGE)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise Exists()
        if exchange and dst is None:
            raise NotFound()
        if dst is not None and dst.id == src.id:
            return  # two names of one file: POSIX says do nothing
        src_dir = KINDS[src.kind].is_dir
        if src_dir:
            self._check_not_ancestor(src.id, np.id)
        if exchange and dst is not None and KINDS[dst.kind].is_dir:
            self._check_not_ancestor(dst.id, op.id)
        now = _now()
        with self.index.txn():
            if exchange:
                assert dst is not None
                self.index.set_dentry_inode(op.id, old_name, dst.id)
                self.index.set_dentry_inode(np.id, new_name, src.id)
                if op.id != np.id:
                    delta = int(src_dir) - int(KINDS[dst.kind].is_dir)
                    if delta:
                        self.index.add_nlink(np.id, delta)
                        self.index.add_nlink(op.id, -delta)
                for ino in (src.id, dst.id):
                    self.index.touch_inode(ino, mtime_ns=None, ctime_ns=now)
            else:
                if dst is not None:
                    dst_dir = KINDS[dst.kind].is_dir
                    if src_dir and not dst_dir:
                        raise NotADirectory()
                    if dst_dir and not src_dir:
                        raise IsADirectory()
                    if dst_dir and self.index.has_children(dst.id):
                        raise NotEmpty()
                    self._drop_name(np, new_name, dst, now)
                self.index.move_dentry(op.id, old_name, np.id, new_name)
                if src_dir and op.id != np.id:
                    self.index.add_nlink(op.id, -1)
                    self.index.add_nlink(np.id, 1)
                self.index.touch_inode(src.id, mtime_ns=None, ctime_ns=now)
            self.index.touch_inode(op.id, mtime_ns=now, ctime_ns=now)
            if np.id != op.id:
                self.index.touch_inode(np.id, mtime_ns=now, ctime_ns=now)
        for ino in (src.id, dst.id if dst is not None else 0):
            data = self.files.get(ino)
            if data is not None:
                data.ctime_ns = now
        if dst is not None and not exchange:
            self._reap(dst.id)

    def _check_not_ancestor(self, ino: int, of: int) -> None:
        """EINVAL if `ino` is `of` or one of its ancestors (a directory moved into itself)."""
        cur: int | None = of
        while cur is not None and cur != ROOT_INODE:
            if cur == ino:
                raise InvalidArgument("cannot move a directory into itself")
            up = self.index.parent_of(cur)
            cur = up[0] if up else None

    async def _rename_grid(
        self,
        op: InodeRow,
        old_name: bytes,
        np: InodeRow,
        new_name: bytes,
        src: InodeRow,
        flags: int,
    ) -> None:
        okind = KINDS[op.kind]
        if op.id != np.id:
            # Across scopes, sandboxes, or between a grid level and a workspace: like a
            # different filesystem, so that mv copies.
            raise CrossDevice("namespaces move only within their scope: copy instead")
        if flags & RENAME_EXCHANGE:
            raise InvalidArgument("RENAME_EXCHANGE is not supported for grid objects")
        if okind is NodeKind.SANDBOX:
            raise NotPermitted("scopes cannot be renamed: their name says whose they are")
        dst = self.index.lookup_child_inode(np.id, new_name)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise Exists()
        if dst is not None and dst.id == src.id:
            return
        now = _now()
        if okind is NodeKind.ROOT:
            text = check_sandbox_name(new_name)
            if decide(self.view, Op.CREATE_SANDBOX, Place()) is not Decision.ALLOW:
                raise AccessDenied("this credential cannot rename sandboxes")
            if dst is not None:
                raise Exists("a sandbox of that name exists")
            sb = self.index.sandbox_by_inode(src.id)
            assert sb is not None
            with self.index.txn():
                self.index.rename_sandbox(sb.id, text)
                self.index.move_dentry(op.id, old_name, np.id, new_name)
                self.index.touch_inode(op.id, mtime_ns=now, ctime_ns=now)
                self.index.append_event("sandbox.rename", {"from": sb.name, "to": text}, text)
            return
        # A namespace renamed within its scope.
        text = check_grid_name(new_name, "namespace")
        self._require(Op.WRITE, op)
        ns = self.index.namespace_by_root(src.id)
        assert ns is not None
        with self.index.txn():
            if dst is not None:
                if KINDS[dst.kind] != KINDS[src.kind]:
                    raise IsADirectory() if KINDS[dst.kind].is_dir else NotADirectory()
                if self.index.has_children(dst.id):
                    raise NotEmpty()
                self._destroy_namespace(dst)
                self._drop_name(op, new_name, dst, now)
            self.index.rename_namespace(ns.id, text)
            self.index.move_dentry(op.id, old_name, np.id, new_name)
            self.index.touch_inode(src.id, mtime_ns=None, ctime_ns=now)
            self.index.touch_inode(op.id, mtime_ns=now, ctime_ns=now)
            place = self._place(op)
            scope = self.index.scope_by_inode(op.id)
            self.index.append_event(
                "namespace.rename",
                {
                    "id": ns.public_id,
                    "from": ns.name,
                    "to": text,
                    "sandbox": place.sandbox,
                    "scope": scope.name if scope else None,
                },
                place.sandbox,
            )
        if dst is not None:
            self._reap(dst.id)

    # ---- open files ---------------------------------------------------------------------------

    def _acquire(self, row: InodeRow) -> FileData:
        data = self.files.get(row.id)
        if data is None:
            data = FileData(
                self.io,
                self.index,
                self.nursery,
                ino=row.id,
                size=row.size,
                mtime_ns=row.mtime_ns,
                ctime_ns=row.ctime_ns,
                committed=self.index.block_map(row.id) if row.size else {},
            )
            self.files[row.id] = data
        data.users += 1
        return data

    def _release_data(self, data: FileData) -> None:
        data.users -= 1
        if data.users == 0 and data.clean:
            del self.files[data.ino]
            self._reap(data.ino)

    def _open_handle(self, row: InodeRow, flags: int) -> int:
        data = self._acquire(row)
        data.opens += 1
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(row.id, flags, data)
        return fh

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise BadHandle()
        return h

    def _open_virtual(self, ino: int, flags: int) -> int:
        writing = _changes_file(flags)
        self.snap.open(ino, writing)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(ino, flags, None)
        return fh

    async def open(self, ino: int, flags: int, caller: Caller) -> int:
        if is_virtual(ino):
            return self._open_virtual(ino, flags)
        row = self._row(ino)
        kind = KINDS[row.kind]
        if kind.is_dir:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise IsADirectory()
        elif kind is not NodeKind.FILE:
            raise NotSupported("special files are opened by the kernel, not artifactfs")
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._require(Op.WRITE, row)
        fh = self._open_handle(row, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            data = self.handles[fh].data
            assert data is not None
            if data.size:
                await data.truncate(0)
        return fh

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if is_virtual(h.ino):
            return await self.snap.read(h.ino, off, size)
        data = h.data
        assert data is not None
        return await data.read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        self._refuse_virtual(h.ino)
        data = h.data
        assert data is not None
        if h.flags & os.O_ACCMODE == os.O_RDONLY:
            raise BadHandle("file is open read-only")
        if not self.view.writable:
            # The credential expired or was revoked: no more writes, even through open files.
            raise AccessDenied("this mount's credential no longer allows writes")
        if h.flags & os.O_APPEND:
            off = data.size
        if off + len(buf) > MAX_FILE_SIZE:
            raise FileTooBig()
        return await data.write(off, buf)

    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        if h.data is not None:
            await h.data.commit()
        # What was closed survives a crash of the daemon: into the redo log (or committed)
        # now, together with the metadata operations grouped before it (its creation, ...).
        # A read-only close has nothing of its own to keep (`cp -a` closes each source).
        if _changes_file(h.flags):
            self.index.persist()

    async def fsync(self, fh: int, datasync: bool) -> None:
        data = self._handle(fh).data
        if data is not None:
            await data.commit(durable=True)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None and is_virtual(h.ino):
            self.snap.close(h.ino)
            return
        if h is None or h.data is None:
            return
        data = h.data
        try:
            # After a flush there is nothing to make durable; a release with changes of its
            # own (mmap writes flushed after close) persists them as a close does.
            if not data.clean:
                await data.commit()
                self.index.persist()
        finally:
            data.opens -= 1
            data.users -= 1
            if data.users == 0:
                self.files.pop(data.ino, None)
                row = self.index.get_inode(data.ino)
                if row is not None and row.nlink == 0:
                    self._reap(data.ino)  # a hash still running then records nothing
                elif data.hashing:
                    self.hashing[data.ino] = data
                    self.nursery.start_soon(self._forget_when_hashed, data)
                elif row is not None and row.sha256 is None:
                    self.nursery.start_soon(self._digest_later, data.ino)

    async def _forget_when_hashed(self, data: FileData) -> None:
        await data.wait_hashed()
        if self.hashing.get(data.ino) is data:
            del self.hashing[data.ino]

    async def checkpoint(self, ns: NamespaceRow, name: str, creator: str) -> CheckpointRow:
        """Take checkpoint `name` of `ns` once the whole-file digests being computed are
        recorded: a manifest names every file's digest, and one still hashing would
        otherwise be read back and hashed again."""
        await self.digests_settled()
        return await self.checkpoints.create(ns, name, creator=creator)

    async def digests_settled(self) -> None:
        """Wait until every whole-file digest being computed is recorded."""
        for data in [*self.files.values(), *self.hashing.values()]:
            await data.wait_hashed()

    async def _digest_later(self, ino: int) -> None:
        try:
            await self.file_digest(ino)
        except Exception as exc:  # a file removed meanwhile, or a storage error: logged
            log.debug("digest of inode %d not computed: %s", ino, exc)

    async def file_digest(self, ino: int) -> bytes:
        """The whole-content SHA-256 of a file, computed once per content and kept."""
        row = self._row(ino)
        if KINDS[row.kind] is not NodeKind.FILE:
            raise NoData()
        data = self.files.get(ino) or self.hashing.get(ino)
        if data is not None:
            if not data.clean:
                await data.commit()
            await data.wait_hashed()  # records the digest of what it hashed
            row = self._row(ino)
        if row.sha256 is not None:
            return row.sha256
        data = self._acquire(row)
        try:
            async with data.lock:
                row = self._row(ino)
                if row.sha256 is not None:
                    return row.sha256
                blocks = self.index.block_map(ino)
                digest = await trio.to_thread.run_sync(
                    self.io.hash_content, blocks, row.size, limiter=self.io.limiter
                )
                with self.index.txn():
                    self.index.set_sha256(ino, digest)
                return digest
        finally:
            self._release_data(data)

    # ---- directories --------------------------------------------------------------------------

    async def opendir(self, ino: int, caller: Caller) -> int:
        if is_virtual(ino):
            if not self.snap.node(ino).is_dir:
                raise NotADirectory()
            self._snap_visible(ino)
            return ino
        row = self._row(ino)
        if not KINDS[row.kind].is_dir:
            raise NotADirectory()
        return ino

    async def dot_attrs(self, ino: int) -> tuple[Attr, Attr]:
        """Attributes of a directory and of its parent (the grid root is its own parent)."""
        return self._lookup(ino, b"."), self._lookup(ino, b"..")

    async def readdir(self, ino: int, after: int, limit: int = 256) -> list[DirEntry]:
        if is_virtual(ino):
            # Interned after the last await: the adapter remembers them before anyone sweeps.
            return [
                DirEntry(e.name, e.attr, e.next_offset)
                for e in await self.snap.readdir(ino, after, limit)
            ]
        out: list[DirEntry] = []
        grid = KINDS[self._row(ino).kind] in (NodeKind.ROOT, NodeKind.SANDBOX)
        while len(out) < limit:
            rows = self.index.list_children(ino, after, limit)
            if not rows:
                break
            for dentry_id, name, row in rows:
                after = dentry_id
                if grid and not self._visible(row):
                    continue
                out.append(DirEntry(name, self._attr(row), dentry_id))
            if len(rows) < limit:
                break
        return out

    # ---- statfs -------------------------------------------------------------------------------

    async def statfs(self) -> FsStats:
        _, used = self.index.stored_bytes()
        free = self.io.backend.usage()[1]
        frsize = 4096
        inodes = self.index.count_inodes()
        free_inodes = max(free // frsize, 1 << 20)
        return FsStats(
            block_size=frsize,
            total_blocks=(used + free) // frsize,
            free_blocks=free // frsize,
            avail_blocks=free // frsize,
            total_inodes=inodes + free_inodes,
            free_inodes=free_inodes,
            name_max=NAME_MAX,
        )

    # ---- extended attributes ------------------------------------------------------------------

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if is_virtual(ino):
            if name == XATTR_SHA256:
                digest = self.snap.sha256(ino)
                if digest is None:
                    raise NoData()
                return digest.hex().encode()
            return self.snap.xattr(ino, name)
        if not name.startswith(STORED_XATTR_PREFIXES):
            # Never stored (setxattr refuses them): `ls -l` and `cp -a` ask every file for
            # system.posix_acl_access, and that answer costs no query.
            raise NoData()
        if not name.startswith(b"user.artifactfs."):
            # The hot path: the kernel asks for security.capability before every write.
            value = self.index.get_xattr(ino, name)
            if value is None:
                raise NoData()
            return value
        row = self._row(ino)
        if name == XATTR_SHA256:
            if KINDS[row.kind] is not NodeKind.FILE:
                raise NoData()
            return (await self.file_digest(ino)).hex().encode()
        if name == XATTR_NAMESPACE:
            ns = self.index.namespace_by_root(ino)
            if ns is None:
                raise NoData()
            return ns.public_id.encode()
        value = self.index.get_xattr(ino, name)
        if value is None:
            raise NoData()
        return value

    async def listxattr(self, ino: int) -> list[bytes]:
        # The attributes artifactfs computes (READONLY_XATTRS) are answered by name and not
        # listed, as CephFS lists none of its virtual ones: `cp -a`, `rsync -X` and
        # `tar --xattrs` would otherwise copy a digest out as a plain user attribute that no
        # longer matches once the copy changes, and try to set it on every copy made here
        # (EPERM) after computing it.
        if is_virtual(ino):
            return self.snap.xattr_names(ino)
        self._row(ino)  # ENOENT for an inode that is gone
        # Only what getxattr answers (an imported checkpoint could carry other names).
        return [n for n in self.index.list_xattrs(ino) if n.startswith(STORED_XATTR_PREFIXES)]

    async def setxattr(self, ino: int, name: bytes, value: bytes, caller: Caller) -> None:
        self._refuse_virtual(ino)
        row = self._row(ino)
        if name == acl.ACL_ACCESS:
            await self._set_access_acl(row, value, caller)
            return
        if name == acl.ACL_DEFAULT:
            raise NotSupported("default ACLs are not stored; new files take the mode and umask")
        if name in READONLY_XATTRS:
            raise NotPermitted(f"{name.decode()} is computed by artifactfs and read-only")
        self._check_xattr_name(name)
        self._require(Op.WRITE, row)
        total = self.index.xattr_total(ino) + len(name) + len(value)
        old = self.index.get_xattr(ino, name)
        if old is not None:
            total -= len(name) + len(old)
        if total > XATTR_TOTAL_MAX:
            raise NoSpace("no room for more extended attributes on this file")
        now = _now()
        with self.index.txn():
            self.index.set_xattr(ino, name, value)
            self.index.touch_inode(ino, mtime_ns=None, ctime_ns=now)
        data = self.files.get(ino)
        if data is not None:
            data.ctime_ns = now

    async def removexattr(self, ino: int, name: bytes, caller: Caller) -> None:
        self._refuse_virtual(ino)
        row = self._row(ino)
        if name in READONLY_XATTRS:
            raise NotPermitted(f"{name.decode()} is computed by artifactfs and read-only")
        self._require(Op.WRITE, row)
        if name in acl.ACL_NAMES:
            # No ACL is ever stored, and removing one that is not there succeeds (as on ext4):
            # `cp -a` of a directory removes the copy's default ACL.
            return
        now = _now()
        with self.index.txn():
            if not self.index.remove_xattr(ino, name):
                raise NoData()
            self.index.touch_inode(ino, mtime_ns=None, ctime_ns=now)
        data = self.files.get(ino)
        if data is not None:
            data.ctime_ns = now

    async def _set_access_acl(self, row: InodeRow, value: bytes, caller: Caller) -> None:
        """A minimal access ACL is the mode's permission bits (core/acl.py): a chmod of them.
        Ownership was checked by the kernel, as for a chmod (inode_owner_or_capable)."""
        mode = stat.S_IMODE(row.mode) & ~0o777 | acl.mode_of_access_acl(value)
        if mode & stat.S_ISGID and not _in_group(caller, row.gid):
            # As ext4 (posix_acl_update_mode): set-gid goes unless the caller could set it.
            mode &= ~stat.S_ISGID
        await self.setattr(row.id, AttrChanges(mode=mode), caller)

    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if not name:
            raise InvalidArgument("empty attribute name")
        if len(name) > 255:
            raise OutOfRange("attribute name longer than 255 bytes")
        if not name.startswith(STORED_XATTR_PREFIXES):
            raise NotSupported("only user.*, trusted.* and security.* attributes are stored")


def _in_group(caller: Caller, gid: int) -> bool:
    """Whether `caller` may keep a set-gid bit of a file of group `gid`: root, a member
    by its primary group, or by a supplementary one (from /proc; not a member if it cannot
    be read, which only costs the bit, as a chmod by a non-member would)."""
    if caller.uid == 0 or caller.gid == gid or gid in caller.groups:
        return True
    if caller.pid <= 0:
        return False
    try:
        with open(f"/proc/{caller.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return gid in {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return False


def _changes_file(flags: int) -> bool:
    """An open with these flags may change the file (written to, or truncated)."""
    return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
