"""Checkpoints as portable files: export one to a self-contained file, import it elsewhere.

The file is a CBOR sequence (RFC 8742: CBOR items one after another), written and read as a
stream so that neither side holds a namespace's contents in memory:

    header    {"format": "artifactfs-checkpoint", "version": 1, "block_size": int,
               "checkpoint": {"name", "kind" ("workspace"|"blob"), "created_ns", "creator",
                              "root" (32-byte digest), "files", "bytes"},
               "source": {"namespace": public id, "path": grid path, "store": store id},
               "exported_ns": int}                      (canonical CBOR)
    items     ["m", digest, manifest bytes]  every manifest reachable from the root, once
                                              (the chunks of a big directory included)
              ["b", digest, block bytes]     every block those manifests name, once
              (a manifest comes before the blocks of its files; order is otherwise free)
    trailer   {"end": {"manifests": n, "blocks": n, "manifest_bytes": n, "block_bytes": n,
                       "header_sha256": sha256 of the canonical header}}

Export reads each manifest and block once (worker threads), checks it against its digest (a
store with a corrupt blob refuses to export it rather than write a file nobody can import),
writes a temporary file beside the target, syncs it and renames it into place.

Import never changes the store before the whole file has been checked. Pass 1 reads the file
through: every item is re-hashed against its digest, manifests are parsed, the trailer's
counts and header digest must match, and everything reachable from the root must be present
(so a flipped byte, a truncated file or a missing item is refused with nothing changed).
Pass 2 reads the file again, hashes each item again (the file could have changed between
the passes) and puts the blobs the tree needs into the backend, then syncs it. Only then does
the index change: the namespace is created (sandbox and scope too if missing, through
`FileSystem`, as a mount would), the checkpoint row is inserted under its original name, and
`restore` materialises the live tree. If any of that fails, the namespace, its checkpoint row
and the grid directories the import created are removed again; blobs already put and never
named by the index are what gc reclaims.

Must not import pyfuse3 or write SQL.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import cbor2
import trio

from artifactfs.core.checkpoints import Checkpoints, check_checkpoint_name
from artifactfs.core.fs import FileSystem
from artifactfs.core.grid import (
    GridPath,
    create_namespace,
    grid_path_of,
    namespace_at,
    remove_namespace,
)
from artifactfs.core.manifest import FILE, Entry, Manifest, ManifestError, decode
from artifactfs.core.nodes import Caller
from artifactfs.core.progress import Progress
from artifactfs.core.restore import CHANGE_ENTRY, CHANGE_INODE, restore
from artifactfs.errors import (
    Corrupt,
    Exists,
    FsError,
    InvalidArgument,
    NotFound,
    StorageError,
)
from artifactfs.index.db import CheckpointRow, NamespaceRow

FORMAT = "artifactfs-checkpoint"
FORMAT_VERSION = 1
MANIFEST, BLOCK = "m", "b"
# A manifest bigger than this is refused on import (a directory of ~a million entries).
MAX_MANIFEST = 256 << 20
# Work per worker-thread hop.
MANIFESTS_PER_HOP = 64
BYTES_PER_HOP = 32 << 20


@dataclass(slots=True)
class ExportResult:
    path: Path
    manifests: int
    blocks: int
    block_bytes: int
    size: int  # bytes of the file


@dataclass(slots=True)
class ImportResult:
    namespace: NamespaceRow
    checkpoint: CheckpointRow
    manifests: int
    blocks: int
    stored: int  # blobs this store did not have yet
    changed: int  # what the restore changed


def _entries(m: Manifest) -> Iterator[Entry]:
    if m.kind == "blob":
        yield m.self_entry
    else:
        yield from m.entries.values()


# ---- export --------------------------------------------------------------------------------


class _Writer:
    """The export file being written (worker threads, one call at a time)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        self.f: BinaryIO = open(self.tmp, "xb")  # noqa: SIM115 (closed by finish/abort)
        self.manifests = self.blocks = self.manifest_bytes = self.block_bytes = 0

    def header(self, data: bytes) -> None:
        self.f.write(data)

    def put_manifests(self, items: list[tuple[bytes, bytes]]) -> None:
        for digest, data in items:
            cbor2.dump([MANIFEST, digest, data], self.f)
            self.manifests += 1
            self.manifest_bytes += len(data)

    def copy_blocks(self, read: Callable[[bytes], bytes], digests: list[bytes]) -> int:
        n = 0
        for digest in digests:
            data = _read_for_export(read, digest)
            if hashlib.sha256(data).digest() != digest:
                raise Corrupt(
                    f"block {digest.hex()} is corrupt in this store: nothing was exported; "
                    "run `artifactfs checkpoint verify` to see what it affects"
                )
            cbor2.dump([BLOCK, digest, data], self.f)
            self.blocks += 1
            self.block_bytes += len(data)
            n += len(data)
        return n

    def finish(self, trailer: dict[str, Any]) -> int:
        cbor2.dump(trailer, self.f)
        self.f.flush()
        os.fsync(self.f.fileno())
        size = self.f.tell()
        self.f.close()
        os.rename(self.tmp, self.dest)
        fd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _read_for_export(read: Callable[[bytes], bytes], digest: bytes) -> bytes:
    try:
        return read(digest)
    except StorageError as exc:
        raise StorageError(
            f"{exc.message}: nothing was exported; run `artifactfs checkpoint verify` to see "
            "what it affects"
        ) from None


def _read_manifests(
    read: Callable[[bytes], bytes], digests: list[bytes]
) -> list[tuple[bytes, bytes, Manifest]]:
    out = []
    for digest in digests:
        data = _read_for_export(read, digest)
        try:
            out.append((digest, data, decode(data, digest)))
        except ManifestError:
            raise Corrupt(
                f"manifest {digest.hex()} is corrupt in this store: nothing was exported; "
                "run `artifactfs checkpoint verify` to see what it affects"
            ) from None
    return out


async def export_checkpoint(
    cp: Checkpoints,
    ns: NamespaceRow,
    name: str,
    dest: Path,
    *,
    actor: str,
    store_id: str = "",
    progress: Progress | None = None,
) -> ExportResult:
    """Write checkpoint `name` of `ns` to the file `dest` (which must not exist).

    `progress`: phases "manifests" (count) and "blocks" (bytes; the total is the checkpoint's
    logical size, which blocks shared between files or holes leave short of)."""
    row = cp.get(ns.id, name)
    io = cp.io
    if dest.exists():
        raise Exists(f"{dest} already exists: choose another file name or remove it first")
    if not dest.parent.is_dir():
        raise NotFound(f"directory {dest.parent} does not exist: create it first")
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "block_size": io.block_size,
        "checkpoint": {
            "name": row.name,
            "kind": ns.kind,
            "created_ns": row.created_ns,
            "creator": row.creator,
            "root": row.root,
            "files": row.files,
            "bytes": row.bytes,
        },
        "source": {
            "namespace": ns.public_id,
            "path": grid_path_of(cp.index, ns),
            "store": store_id,
        },
        "exported_ns": time.time_ns(),
    }
    header_bytes = cbor2.dumps(header, canonical=True)
    try:
        writer = await trio.to_thread.run_sync(_Writer, dest)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror}") from None
    try:
        await trio.to_thread.run_sync(writer.header, header_bytes, limiter=io.limiter)
        seen_m = {row.root}
        seen_b: set[bytes] = set()
        queue = collections.deque([row.root])
        while queue:
            batch = [queue.popleft() for _ in range(min(MANIFESTS_PER_HOP, len(queue)))]
            loaded = await trio.to_thread.run_sync(
                _read_manifests, io._get, batch, limiter=io.limiter
            )
            blocks: list[bytes] = []
            for _, _, m in loaded:
                for c in m.chunks:
                    if c not in seen_m:
                        seen_m.add(c)
                        queue.append(c)
                for e in _entries(m):
                    for _, b in e.blocks:
                        if b not in seen_b:
                            seen_b.add(b)
                            blocks.append(b)
                    if e.manifest is not None and e.manifest not in seen_m:
                        seen_m.add(e.manifest)
                        queue.append(e.manifest)
            await trio.to_thread.run_sync(
                writer.put_manifests, [(d, data) for d, data, _ in loaded], limiter=io.limiter
            )
            if progress is not None:
                progress("manifests", len(loaded), None)
            per_hop = max(1, BYTES_PER_HOP // io.block_size)
            for i in range(0, len(blocks), per_hop):
                n = await trio.to_thread.run_sync(
                    writer.copy_blocks, io._get, blocks[i : i + per_hop], limiter=io.limiter
                )
                if progress is not None:
                    progress("blocks", n, row.bytes)
        trailer = {
            "end": {
                "manifests": writer.manifests,
                "blocks": writer.blocks,
                "manifest_bytes": writer.manifest_bytes,
                "block_bytes": writer.block_bytes,
                "header_sha256": hashlib.sha256(header_bytes).digest(),
            }
        }
        size = await trio.to_thread.run_sync(writer.finish, trailer, limiter=io.limiter)
    except BaseException:
        writer.abort()
        raise
    with cp.index.txn():
        cp.index.append_event(
            "checkpoint.export",
            {
                "namespace": ns.public_id,
                "name": row.name,
                "root": row.root.hex(),
                "actor": actor,
                "file": str(dest),
                "manifests": writer.manifests,
                "blocks": writer.blocks,
                "bytes": size,
            },
            sandbox=cp.sandbox_of(ns),
        )
    return ExportResult(dest, writer.manifests, writer.blocks, writer.block_bytes, size)


# ---- import --------------------------------------------------------------------------------


def _damaged(path: Path, what: str) -> Corrupt:
    return Corrupt(
        f"{path} is damaged ({what}): nothing was imported; export the checkpoint again"
    )


@dataclass(slots=True)
class _MInfo:
    kind: str
    children: list[tuple[bytes, str]]  # (manifest, its kind): chunks, then child directories
    blocks: set[bytes]
    files: int
    nbytes: int
    bad: str = ""  # why this manifest cannot be part of a tree, if it cannot


@dataclass(slots=True)
class Header:
    name: str
    kind: str
    created_ns: int
    creator: str
    root: bytes
    files: int
    nbytes: int
    block_size: int
    source: dict[str, Any]
    canonical: bytes


class _Reader:
    """One pass over an export file (worker threads, one call at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.f: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
        self.dec = cbor2.CBORDecoder(self.f)
        self.items = 0
        self.trailer: dict[str, Any] | None = None

    def close(self) -> None:
        self.f.close()

    def _next(self) -> Any:
        try:
            return self.dec.decode()
        except cbor2.CBORDecodeEOF:
            if self.items == 0:
                raise InvalidArgument(f"{self.path} is empty or not a checkpoint export") from None
            raise _damaged(self.path, f"it ends after item {self.items} without a trailer: "
                           "the file is truncated") from None
        except Exception as exc:  # cbor2 raises several types for garbage
            if self.items == 0:
                raise InvalidArgument(
                    f"{self.path} is not an artifactfs checkpoint export"
                ) from None
            raise _damaged(self.path, f"item {self.items + 1} does not parse: {exc}") from None

    def header(self) -> Header:
        doc = self._next()
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InvalidArgument(f"{self.path} is not an artifactfs checkpoint export")
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InvalidArgument(
                f"{self.path} was exported by a newer artifactfs (format {version}): "
                "upgrade artifactfs to import it"
            )
        try:
            c = doc["checkpoint"]
            h = Header(
                name=str(c["name"]),
                kind=str(c["kind"]),
                created_ns=int(c["created_ns"]),
                creator=str(c["creator"]),
                root=bytes(c["root"]),
                files=int(c["files"]),
                nbytes=int(c["bytes"]),
                block_size=int(doc["block_size"]),
                source=dict(doc.get("source") or {}),
                canonical=cbor2.dumps(doc, canonical=True),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(self.path, f"the header lacks {exc}") from None
        if h.kind not in ("workspace", "blob") or len(h.root) != 32:
            raise _damaged(self.path, "the header is malformed")
        try:
            check_checkpoint_name(h.name)
        except FsError:
            raise _damaged(self.path, f"the checkpoint name {h.name!r} is not valid") from None
        self.items = 1
        return h

    def item(self) -> tuple[str, bytes, bytes] | None:
        """The next item, or None at the trailer (kept in self.trailer)."""
        doc = self._next()
        self.items += 1
        if isinstance(doc, dict) and isinstance(doc.get("end"), dict):
            self.trailer = doc["end"]
            if self.f.read(1):
                raise _damaged(self.path, "there is data after the trailer")
            return None
        if (
            not isinstance(doc, list)
            or len(doc) != 3
            or doc[0] not in (MANIFEST, BLOCK)
            or not isinstance(doc[1], bytes)
            or len(doc[1]) != 32
            or not isinstance(doc[2], bytes)
        ):
            raise _damaged(self.path, f"item {self.items} is not a manifest or a block")
        kind, digest, data = doc
        if hashlib.sha256(data).digest() != digest:
            what = "manifest" if kind == MANIFEST else "block"
            raise _damaged(
                self.path, f"{what} {digest.hex()} (item {self.items}) does not match its digest"
            )
        return kind, digest, data


@dataclass(slots=True)
class _Scan:
    """Pass 1: what the file holds, checked item by item."""

    reader: _Reader
    header: Header
    block_size: int
    manifests: dict[bytes, _MInfo] = field(default_factory=dict)
    blocks: dict[bytes, int] = field(default_factory=dict)  # digest -> size
    manifest_sizes: dict[bytes, int] = field(default_factory=dict)
    done: bool = False

    def step(self, budget: int) -> int:
        """Read items until `budget` bytes are read or the trailer is reached."""
        read = 0
        while read < budget:
            got = self.reader.item()
            if got is None:
                self.done = True
                break
            kind, digest, data = got
            read += len(data)
            if kind == BLOCK:
                if len(data) > self.block_size:
                    raise _damaged(self.reader.path, f"block {digest.hex()} is too big")
                self.blocks[digest] = len(data)
                continue
            if len(data) > MAX_MANIFEST:
                raise _damaged(self.reader.path, f"manifest {digest.hex()} is too big")
            try:
                m = decode(data, digest)
            except ManifestError as exc:
                what = f"manifest {digest.hex()}: {exc.message}"
                raise _damaged(self.reader.path, what) from None
            self.manifest_sizes[digest] = len(data)
            self.manifests[digest] = self._info(m)
        return read

    def _info(self, m: Manifest) -> _MInfo:
        info = _MInfo(m.kind, [(c, "chunk") for c in m.chunks], set(), 0, 0)
        bs = self.block_size
        for e in _entries(m):
            if e.type == FILE:
                info.files += 1
                info.nbytes += e.size
                for idx, b in e.blocks:
                    if idx < 0 or idx * bs >= max(e.size, 1):
                        info.bad = "a block beyond the end of its file"
                    info.blocks.add(b)
            elif e.is_dir:
                if e.manifest is None:
                    info.bad = "a directory without a manifest"
                else:
                    info.children.append((e.manifest, "dir"))
        return info

    def check(self) -> tuple[set[bytes], int, int]:
        """Everything reachable from the root is present and well formed. Returns the
        manifests the tree needs, and its file count and bytes."""
        path, h = self.reader.path, self.header
        t = self.reader.trailer or {}
        want = (t.get("manifests"), t.get("blocks"), t.get("header_sha256"))
        have = (len(self.manifests), len(self.blocks), hashlib.sha256(h.canonical).digest())
        if want != have:
            raise _damaged(path, "the trailer does not match the items or the header")
        root = self.manifests.get(h.root)
        if root is None:
            raise _damaged(path, "the root manifest is missing")
        if root.kind != ("dir" if h.kind == "workspace" else "blob"):
            raise _damaged(path, f"the root manifest is not a {h.kind}")
        # Depth-first from the root: every reachable manifest present and well formed; totals
        # bottom-up (a shared subtree counts once per place, as a checkpoint counts it).
        totals: dict[bytes, tuple[int, int]] = {}
        active: set[bytes] = set()
        stack: list[tuple[bytes, bool]] = [(h.root, False)]
        while stack:
            d, expanded = stack.pop()
            info = self.manifests.get(d)
            if info is None:
                raise _damaged(path, f"manifest {d.hex()} is missing")
            if expanded:
                files, nbytes = info.files, info.nbytes
                for c, _ in info.children:
                    files += totals[c][0]
                    nbytes += totals[c][1]
                totals[d] = (files, nbytes)
                active.discard(d)
                continue
            if d in totals:
                continue
            if info.bad:
                raise _damaged(path, f"manifest {d.hex()} has {info.bad}")
            missing = next((b for b in info.blocks if b not in self.blocks), None)
            if missing is not None:
                raise _damaged(path, f"block {missing.hex()} is missing")
            active.add(d)
            stack.append((d, True))
            for c, kind in info.children:
                child = self.manifests.get(c)
                if child is None:
                    raise _damaged(path, f"manifest {c.hex()} is missing")
                if child.kind != kind:
                    raise _damaged(path, f"manifest {c.hex()} is not a {kind}")
                if c in active:
                    raise _damaged(path, "the manifests form a cycle")
                if c not in totals:
                    stack.append((c, False))
        files, nbytes = totals[h.root]
        if (files, nbytes) != (h.files, h.nbytes):
            raise _damaged(path, "the header's file count or size does not match the tree")
        return set(totals), files, nbytes


class _Store:
    """Pass 2: put what the tree needs into the backend (worker threads)."""

    def __init__(self, reader: _Reader, put: Callable[[bytes, bytes], bool], need: set[bytes]):
        self.reader = reader
        self.put = put
        self.need = need
        self.stored = 0
        self.done = False

    def step(self, budget: int) -> int:
        read = 0
        while read < budget:
            got = self.reader.item()  # hashes again: the file may have changed since pass 1
            if got is None:
                self.done = True
                break
            _, digest, data = got
            read += len(data)
            if digest in self.need and self.put(digest, data):
                self.stored += 1
        return read


async def _steps(
    step: Callable[[int], int],
    done: Callable[[], bool],
    limiter: trio.CapacityLimiter,
    progress: Progress | None,
    phase: str,
    total: int,
) -> None:
    while not done():
        n = await trio.to_thread.run_sync(step, BYTES_PER_HOP, limiter=limiter)
        if progress is not None:
            progress(phase, n, total)


async def read_header(path: Path) -> Header:
    """The header of an export file (checked as pass 1 checks it)."""
    reader = await trio.to_thread.run_sync(_Reader, path)
    try:
        return await trio.to_thread.run_sync(reader.header)
    finally:
        reader.close()


async def import_checkpoint(
    fs: FileSystem,
    path: Path,
    target: GridPath,
    *,
    actor: str,
    caller: Caller,
    progress: Progress | None = None,
) -> ImportResult:
    """Import the export file `path` as a new namespace at `target` (see the module doc).

    `progress`: phases "check" and "store" (bytes of the file's items, of the file's size:
    each pass reads it through), then the restore's "load" and "apply"."""
    cp, index, io = fs.checkpoints, fs.index, fs.io
    if namespace_at(index, target) is not None:
        raise Exists(
            f"namespace {target} already exists: import under another name, or remove it first"
        )
    # Pass 1: check everything, change nothing.
    reader = await trio.to_thread.run_sync(_Reader, path)
    try:
        header = await trio.to_thread.run_sync(reader.header)
        if header.block_size != io.block_size:
            raise InvalidArgument(
                f"{path} holds blocks of {header.block_size} bytes but this store uses "
                f"{io.block_size}: import it into a store made with "
                f"`artifactfs init --block-size {header.block_size}`"
            )
        scan = _Scan(reader, header, io.block_size)
        size = os.fstat(reader.f.fileno()).st_size
        await _steps(scan.step, lambda: scan.done, io.limiter, progress, "check", size)
        need_manifests, files, nbytes = scan.check()
    finally:
        reader.close()
    need_blocks: set[bytes] = set()
    for d in need_manifests:
        need_blocks |= scan.manifests[d].blocks
    sizes = {d: scan.manifest_sizes[d] for d in need_manifests}
    sizes.update((b, scan.blocks[b]) for b in need_blocks)

    # Pass 2: the blobs, synced before any index row names them.
    reader = await trio.to_thread.run_sync(_Reader, path)
    try:
        await trio.to_thread.run_sync(reader.header)
        store = _Store(reader, io.backend.put, set(sizes))
        await _steps(store.step, lambda: store.done, io.limiter, progress, "store", size)
    finally:
        reader.close()
    await io.sync()

    # The index: namespace, checkpoint row, live tree.
    ns, created = await create_namespace(fs, target, header.kind, caller)
    row: CheckpointRow | None = None
    try:
        now = time.time_ns()
        with index.txn():
            new_meta = sum(sizes[d] for d in need_manifests if not index.known_blob(d))
            index.record_blobs(sizes.items(), now)
            index.append_changes(_feed(fs, [ns.root_inode, *created]))
            row = index.insert_checkpoint(
                ns.id, header.name, header.root, header.created_ns, header.creator,
                files, nbytes, new_meta,
            )
            index.append_event(
                "checkpoint.import",
                {
                    "namespace": ns.public_id,
                    "path": str(target),
                    "name": header.name,
                    "root": header.root.hex(),
                    "actor": actor,
                    "creator": header.creator,
                    "created_ns": header.created_ns,
                    "source": header.source,
                    "file": str(path),
                    "manifests": len(need_manifests),
                    "blocks": len(need_blocks),
                    "blobs_stored": store.stored,
                },
                sandbox=target.sandbox,
            )
        result = await restore(
            cp, ns, header.root, actor=actor, name=header.name, progress=progress
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await _undo(fs, ns, row, created, caller)
        raise
    fresh = index.namespace_by_id(ns.id)  # a restored blob has a new root inode
    assert fresh is not None and row is not None
    return ImportResult(
        fresh, row, len(need_manifests), len(need_blocks), store.stored, result.changed
    )


def _feed(fs: FileSystem, inodes: list[int]) -> list[tuple[int, int, bytes | None]]:
    """Change-feed rows saying that these grid names appeared or went, so that running
    mounts of the store drop cached (negative or stale) entries for them."""
    feed: list[tuple[int, int, bytes | None]] = []
    for ino in inodes:
        up = fs.index.parent_of(ino)
        if up is not None:
            feed += [(CHANGE_ENTRY, up[0], up[1]), (CHANGE_INODE, up[0], None)]
    return feed


async def _undo(
    fs: FileSystem, ns: NamespaceRow, row: CheckpointRow | None, created: list[int],
    caller: Caller,
) -> None:
    index = fs.index
    if row is not None and index.checkpoint_by_name(ns.id, row.name) is not None:
        with index.txn():
            index.delete_checkpoint(row.id)
    fresh = index.namespace_by_id(ns.id)
    if fresh is not None:
        feed = _feed(fs, [fresh.root_inode, *created])  # while the names still exist
        await remove_namespace(fs, fresh, created, caller)
        with index.txn():
            index.append_changes(feed)
