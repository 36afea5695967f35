"""Checkpoints: take, list, delete and read them (restore and diff live in their own modules).

Taking a checkpoint of a namespace:
  1. commit what the process has grouped (`Index.flush`), so the snapshot includes it;
  2. in a worker thread, on a second SQLite connection holding one read transaction (a
     consistent snapshot; the mount keeps writing meanwhile), walk down from the namespace
     root through *dirty* directories only, encode each as a manifest (`manifest.py`), reuse
     the recorded digest of every clean one, store the new manifests and sync the blob store;
  3. on the calling thread, in one index transaction: insert the checkpoint row, record the
     manifests as blobs, and mark the encoded directories clean, except those that changed
     after the snapshot (their dirty seq moved past it) and their ancestors.
So its time and the bytes it writes grow with what changed since the previous checkpoint.

Must not import pyfuse3 or write SQL (the index does).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.manifest import (
    DIR,
    FILE,
    Entry,
    Manifest,
    decode,
    digest_of,
    encode,
    entry_type,
    split,
)
from artifactfs.core.names import check_name
from artifactfs.core.nodes import NodeKind
from artifactfs.core.progress import Progress
from artifactfs.errors import Exists, InvalidName, NotFound
from artifactfs.index.db import CheckpointRow, Index, InodeRow, NamespaceRow

log = logging.getLogger(__name__)

MANIFEST_CACHE = 4096


def check_checkpoint_name(name: str) -> bytes:
    raw = name.encode("utf-8", errors="surrogateescape")
    check_name(raw)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"checkpoint name {raw!r} is not valid UTF-8") from None
    return raw


def entry_from_row(
    row: InodeRow,
    *,
    xattrs: dict[bytes, bytes] | None = None,
    target: bytes | None = None,
    blocks: list[tuple[int, bytes]] | None = None,
    sha256: bytes | None = None,
    manifest: bytes | None = None,
) -> Entry:
    t = entry_type(row.kind)
    linked = t == FILE and row.nlink > 1
    return Entry(
        type=t,
        mode=row.mode,
        uid=row.uid,
        gid=row.gid,
        atime_ns=row.atime_ns,
        mtime_ns=row.mtime_ns,
        ctime_ns=row.ctime_ns,
        btime_ns=row.btime_ns,
        size=row.size if t in (FILE, "l") else 0,
        rdev=row.rdev,
        xattrs=dict(sorted((xattrs or {}).items())),
        target=target,
        sha256=(sha256 if sha256 is not None else row.sha256) if t == FILE else None,
        blocks=tuple(blocks or ()) if t == FILE else (),
        manifest=manifest,
        link=row.id if linked else None,
        nlink=row.nlink if linked else 1,
    )


@dataclass(slots=True)
class BuiltDir:
    ino: int
    digest: bytes
    files: int
    nbytes: int
    child_dirs: list[int]


@dataclass(slots=True)
class Built:
    """What building a tree produced (step 2 above)."""

    root: bytes
    files: int
    nbytes: int
    seq: int  # the highest dirty seq in the snapshot
    dirs: list[BuiltDir] = field(default_factory=list)  # children before parents
    new: dict[bytes, bytes] = field(default_factory=dict)  # manifests not stored before
    hashed: list[tuple[int, bytes, int, int]] = field(default_factory=list)  # ino, sha, size, mt
    manifests: dict[bytes, Manifest] = field(default_factory=dict)  # the encoded ones


class TreeBuilder:
    """Encodes the live state of one namespace from an index snapshot (worker thread)."""

    def __init__(
        self,
        snap: Index,
        io: BlockIO,
        *,
        store_new: bool,
        reuse: bool = True,
        progress: Progress | None = None,
    ) -> None:
        self.snap = snap
        self.io = io
        self.store_new = store_new
        self.reuse = reuse  # False re-encodes everything (tests compare the two)
        self.progress = progress  # phases "scan" (dirty directories found), "encode"

    def _file_entry(
        self,
        row: InodeRow,
        xattrs: dict[bytes, bytes] | None,
        blocks: list[tuple[int, bytes]] | None,
        out: Built,
    ) -> Entry:
        sha = row.sha256
        if sha is None:
            sha = self.io.hash_content(dict(blocks or ()), row.size)
            out.hashed.append((row.id, sha, row.size, row.mtime_ns))
        return entry_from_row(row, xattrs=xattrs, blocks=blocks, sha256=sha)

    def _emit(self, m: Manifest, out: Built) -> bytes:
        """Encode `m` as stored (a big directory as chunks + top); returns its digest.
        `out.manifests` gets every piece as stored (unmerged), like the manifest cache."""
        top, chunks = split(m)
        for piece in (*chunks, top):
            data = encode(piece)
            digest = digest_of(data)
            out.manifests[digest] = piece
            if digest not in out.new and not self.snap.known_blob(digest):
                out.new[digest] = data
        return digest

    def build(self, root: InodeRow) -> Built:
        """Encode the namespace whose root is `root`, reusing clean directories."""
        out = Built(root=b"", files=0, nbytes=0, seq=self.snap.max_dirty_seq())
        if NodeKind(root.kind) is NodeKind.FILE:
            entry = self._file_entry(
                root, self.snap.xattrs_of(root.id), self.snap.blocks_of(root.id), out
            )
            out.root = self._emit(Manifest("blob", entry), out)
            out.files, out.nbytes = 1, root.size
        else:
            self._build_tree(root, out)
        if self.store_new:
            for digest, data in out.new.items():
                self.io.backend.put(digest, data)
            if out.new:
                self.io.backend.sync()
        return out

    def _build_tree(self, root: InodeRow, out: Built) -> None:
        # Top-down: find the dirty directories (a clean one ends its branch)...
        order: list[tuple[InodeRow, list[tuple[bytes, InodeRow]]]] = []
        known: dict[int, tuple[bytes, int, int]] = {}
        queue = collections.deque([root])
        while queue:
            row = queue.popleft()
            state = self.snap.dir_state(row.id) if self.reuse else None
            if state is not None:
                known[row.id] = (state.digest, state.files, state.bytes)
                continue
            children = self.snap.children(row.id)
            order.append((row, children))
            queue.extend(c for _, c in children if NodeKind(c.kind) is NodeKind.DIR)
            if self.progress is not None:
                self.progress("scan", 1, None)
        # ...then bottom-up: encode each once its child directories have digests.
        for row, children in reversed(order):
            blocks = self.snap.children_blocks(row.id)
            xattrs = self.snap.children_xattrs(row.id)
            links = self.snap.children_symlinks(row.id)
            entries: dict[bytes, Entry] = {}
            files = nbytes = 0
            child_dirs = []
            for name, c in sorted(children, key=lambda nc: nc[0]):
                ck = NodeKind(c.kind)
                if ck is NodeKind.DIR:
                    digest, f, b = known[c.id]
                    files += f
                    nbytes += b
                    child_dirs.append(c.id)
                    entries[name] = entry_from_row(c, xattrs=xattrs.get(c.id), manifest=digest)
                elif ck is NodeKind.FILE:
                    entries[name] = self._file_entry(c, xattrs.get(c.id), blocks.get(c.id), out)
                    files += 1
                    nbytes += c.size
                else:
                    entries[name] = entry_from_row(
                        c, xattrs=xattrs.get(c.id), target=links.get(c.id)
                    )
            self_entry = entry_from_row(row, xattrs=self.snap.xattrs_of(row.id))
            digest = self._emit(Manifest("dir", self_entry, entries), out)
            known[row.id] = (digest, files, nbytes)
            out.dirs.append(BuiltDir(row.id, digest, files, nbytes, child_dirs))
            if self.progress is not None:
                self.progress("encode", 1, len(order))
        out.root, out.files, out.nbytes = known[root.id]


class Checkpoints:
    """Checkpoint operations of one store, for the daemon, the CLI and the API alike."""

    def __init__(self, index: Index, io: BlockIO) -> None:
        self.index = index
        self.io = io
        self._reader: Index | None = None
        self._lock = trio.Lock()
        self._cache: collections.OrderedDict[bytes, Manifest] = collections.OrderedDict()
        # Called with (kind, ino, name) lists after a restore changes the live tree.
        self.on_changes: Callable[[list[tuple[int, int, bytes | None]]], None] | None = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.conn.close()
            self._reader = None

    def _snapshot_index(self) -> Index:
        if self._reader is None:
            self._reader = Index(self.index.path)
        return self._reader

    # ---- reading -------------------------------------------------------------------------------

    def list(self, namespace_id: int) -> list[CheckpointRow]:
        return self.index.checkpoints_of(namespace_id)

    def get(self, namespace_id: int, name: str) -> CheckpointRow:
        row = self.index.checkpoint_by_name(namespace_id, name)
        if row is None:
            raise NotFound(f"no checkpoint named {name!r}")
        return row

    # The cache holds manifests as stored: a chunked directory's top (no entries) and its
    # chunks separately; `manifest()` merges them for callers that want a whole directory.

    def cached_manifest(self, digest: bytes) -> Manifest | None:
        m = self._cache.get(digest)
        if m is not None:
            self._cache.move_to_end(digest)
        return m

    def remember(self, digest: bytes, m: Manifest) -> None:
        self._cache[digest] = m
        self._cache.move_to_end(digest)
        while len(self._cache) > MANIFEST_CACHE:
            self._cache.popitem(last=False)

    def load_raw_sync(self, digest: bytes) -> Manifest:
        """Worker thread: one stored manifest or chunk, fetched, verified and parsed."""
        m = self._cache.get(digest)  # no reordering off the trio thread
        if m is None:
            m = decode(self.io._get(digest), digest)
        return m

    def load_manifest_sync(self, digest: bytes) -> Manifest:
        """Worker thread: a whole manifest (a chunked directory with its entries merged)."""
        return self._merge(self.load_raw_sync(digest), self.load_raw_sync)

    @staticmethod
    def _merge(top: Manifest, load: Callable[[bytes], Manifest]) -> Manifest:
        if not top.chunks:
            return top
        entries: dict[bytes, Entry] = {}
        for c in top.chunks:
            entries.update(load(c).entries)
        return Manifest(top.kind, top.self_entry, entries, top.chunks)

    async def raw(self, digest: bytes) -> Manifest:
        """One stored manifest or chunk, unmerged (a diff compares chunks by digest)."""
        m = self.cached_manifest(digest)
        if m is None:
            m = await trio.to_thread.run_sync(
                self.load_raw_sync, digest, limiter=self.io.limiter
            )
            self.remember(digest, m)
        return m

    async def manifest(self, digest: bytes) -> Manifest:
        top = await self.raw(digest)
        if not top.chunks:
            return top
        pieces = {c: await self.raw(c) for c in top.chunks}
        return self._merge(top, pieces.__getitem__)

    # ---- taking and deleting ---------------------------------------------------------------

    async def build(
        self,
        root_ino: int,
        *,
        store_new: bool,
        reuse: bool = True,
        progress: Progress | None = None,
    ) -> Built:
        """Encode a namespace's current committed state (worker thread, own snapshot)."""
        self.index.flush()

        def run() -> Built:
            snap = self._snapshot_index()
            with snap.read_txn():
                root = snap.get_inode(root_ino)
                if root is None:
                    raise NotFound("the namespace no longer exists")
                return TreeBuilder(
                    snap, self.io, store_new=store_new, reuse=reuse, progress=progress
                ).build(root)

        async with self._lock:
            built = await trio.to_thread.run_sync(run, limiter=self.io.limiter)
        for digest, m in built.manifests.items():
            self.remember(digest, m)
        return built

    async def create(
        self, ns: NamespaceRow, name: str, creator: str, *, progress: Progress | None = None
    ) -> CheckpointRow:
        """`progress`: phases "scan" and "encode" (directories), from the worker thread."""
        check_checkpoint_name(name)
        if self.index.checkpoint_by_name(ns.id, name) is not None:
            raise Exists(f"checkpoint {name!r} already exists")
        started = time.monotonic()
        # While the `building` row exists every change re-sequences its directories, so
        # the record step below can tell those changed after the snapshot. The row goes in
        # the same transaction as the record: no change can slip between the two.
        with self.index.txn():
            build_id = self.index.start_building(os.getpid())
        self.index.flush()
        recorded = False
        try:
            # `progress` only when given: substitutes for build (tests race a write against
            # it) keep build's original signature.
            if progress is None:
                built = await self.build(ns.root_inode, store_new=True)
            else:
                built = await self.build(ns.root_inode, store_new=True, progress=progress)
            row = self._record(ns, name, creator, built, build_id)
            recorded = True
        finally:
            if not recorded:
                with trio.CancelScope(shield=True), self.index.txn():
                    self.index.end_building(build_id)
        log.info(
            "checkpoint %s of %s: %d manifests written (%d bytes) in %.3f s",
            name,
            ns.public_id,
            len(built.new),
            row.manifest_bytes,
            time.monotonic() - started,
        )
        return row

    def _record(
        self, ns: NamespaceRow, name: str, creator: str, built: Built, build_id: int
    ) -> CheckpointRow:
        now = time.time_ns()
        with self.index.txn():
            if self.index.checkpoint_by_name(ns.id, name) is not None:
                raise Exists(f"checkpoint {name!r} already exists")
            for ino, sha, size, mtime in built.hashed:
                self.index.set_sha256_if_unchanged(ino, sha, size, mtime)
            self.index.record_blobs(((d, len(b)) for d, b in built.new.items()), now)
            kept: set[int] = set()
            for d in built.dirs:
                seq = self.index.dirty_seq(d.ino)
                if (
                    (seq is not None and seq > built.seq)
                    or any(c in kept for c in d.child_dirs)
                    or self.index.child_dir_dirty_after(d.ino, built.seq)
                ):
                    kept.add(d.ino)
                    continue
                self.index.set_clean(d.ino, d.digest, d.files, d.nbytes)
            meta_bytes = sum(len(b) for b in built.new.values())
            row = self.index.insert_checkpoint(
                ns.id, name, built.root, now, creator, built.files, built.nbytes, meta_bytes
            )
            self.index.append_event(
                "checkpoint.create",
                {
                    "namespace": ns.public_id,
                    "name": name,
                    "root": built.root.hex(),
                    "creator": creator,
                    "files": built.files,
                    "bytes": built.nbytes,
                    "manifests_written": len(built.new),
                    "manifest_bytes": meta_bytes,
                },
                sandbox=self.sandbox_of(ns),
            )
            self.index.end_building(build_id)
        return row

    async def delete(self, ns: NamespaceRow, name: str, actor: str) -> None:
        with self.index.txn():
            row = self.get(ns.id, name)
            self.index.delete_checkpoint(row.id)
            self.index.append_event(
                "checkpoint.delete",
                {"namespace": ns.public_id, "name": name, "root": row.root.hex(), "actor": actor},
                sandbox=self.sandbox_of(ns),
            )

    def sandbox_of(self, ns: NamespaceRow) -> str | None:
        scope = self.index.scope_by_id(ns.scope_id)
        sandbox = None if scope is None else self.index.sandbox_by_id(scope.sandbox_id)
        return None if sandbox is None else sandbox.name


def is_dir_entry(e: Entry) -> bool:
    return e.type == DIR
