"""fsck: the index checked against itself and against the blob store, one check per invariant
of `index/schema.py`, with repairs of what needs no guessing.

Checks, in order (each finding names its kind, what it is about and whether it was repaired):
  - the grid root exists (inode 1, kind ROOT);
  - dentries naming a missing inode or parent (repair: drop the dentry);
  - rows of blocks/xattrs/symlinks/dir_manifests/dirty_dirs for missing inodes (repair: drop);
  - link counts (repair: set nlink to the count of names; an inode with no name at all is
    reported, not repaired: giving it one would be a guess);
  - sandboxes, scopes and namespaces whose inode is missing (reported);
  - against the blob store: every digest a block map or a checkpoint (walked from its root
    manifest, chunks included) references must be stored or journalled: a missing one is
    reported with the files (grid paths) and checkpoints it breaks; a referenced blob without
    a `blobs` row gets one (repair); a `blobs` row for a blob that is neither stored nor
    referenced is dropped (repair); a stored blob nothing knows is an orphan (repair: delete
    it when older than the grace period, so a running mount's in-flight put is left alone);
    checkpoint manifests that are missing or do not parse are reported with their checkpoint;
  - with `verify`, every stored blob is re-hashed against its digest (a corrupt one is
    reported with what it breaks; never repaired: only a backup has the right bytes).

On a remote (S3) store "stored" means in the bucket or in the local cache, listed in that
order (a block uploaded and evicted meanwhile is then seen in the bucket). A referenced block
only in the cache is present while the index queues it for upload (`uploaded = 0`); if the
index says it was uploaded, the bucket lost it (`not-in-bucket`, repaired by uploading the
cached copy again, which `upload` re-hashes first). Orphans are looked for in both places and
deleted from both (batched DeleteObjects). `verify` re-hashes every cached copy and every
object downloaded straight from the bucket (several GETs at a time, not through the cache): a
corrupt object is rewritten from a good cached copy, a corrupt cached copy dropped when the
bucket's is good; with no good copy anywhere it is only reported. Blob store repairs run
after the index's transaction, so no network call holds it.

Everything is read first, from one read snapshot; repairs then run in one transaction. Repairs
are refused while a mount of the store is running (its in-memory state would disagree).

Must not import pyfuse3 or write SQL. Synchronous: the CLI calls it directly; a mount would
call it from a worker thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from artifactfs.blobs.backend import BlobBackend
from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.journal import JournalReader
from artifactfs.core.gc import DEFAULT_GRACE_S, References, live_mounts, walk_manifests
from artifactfs.core.grid import grid_path_of
from artifactfs.core.nodes import ROOT_INODE, NodeKind
from artifactfs.core.progress import Progress
from artifactfs.errors import ArtifactFsError, NotFound, StorageError
from artifactfs.index.db import CheckpointRow, Index

ROOT_MISSING = "root-missing"
DANGLING_DENTRY = "dangling-dentry"
ORPHAN_ROWS = "orphan-rows"
WRONG_NLINK = "wrong-nlink"
UNNAMED_INODE = "unnamed-inode"
GRID_WITHOUT_INODE = "grid-without-inode"
MISSING_BLOB = "missing-blob"
CORRUPT_BLOB = "corrupt-blob"
BROKEN_MANIFEST = "broken-manifest"
UNRECORDED_BLOB = "unrecorded-blob"
STALE_BLOB_ROW = "stale-blob-row"
ORPHAN_BLOB = "orphan-blob"
NOT_IN_BUCKET = "not-in-bucket"

MAX_NAMED = 5  # files or checkpoints named per finding, then a count
VERIFY_THREADS = 8  # concurrent GETs when verifying a bucket (latency, not bandwidth, bound)


class RepairRefused(ArtifactFsError):
    """fsck --repair needs the store's mounts to be stopped."""

    exit_code = 2


@dataclass(slots=True)
class Finding:
    kind: str
    message: str
    repairable: bool = False
    repaired: bool = False

    def __str__(self) -> str:
        tag = " [repaired]" if self.repaired else ""
        return f"{self.kind}: {self.message}{tag}"


@dataclass(slots=True)
class FsckReport:
    findings: list[Finding] = field(default_factory=list)
    inodes: int = 0
    blobs: int = 0  # stored blobs listed (on S3: in the bucket or the cache)
    verified: int = 0  # blobs (on S3: objects and cached copies) re-hashed
    checkpoints: int = 0
    bucket_objects: int | None = None  # S3 stores: objects in the bucket
    cached: int | None = None  # S3 stores: blocks in the local cache

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def unrepaired(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


def inode_path(index: Index, ino: int) -> str:
    """A grid path of `ino` (one of its names), or `inode N` when it has none."""
    parts: list[str] = []
    cur = ino
    for _ in range(4096):
        if cur == ROOT_INODE:
            return "/".join(reversed(parts)) or "/"
        up = index.parent_of(cur)
        if up is None:
            break
        parts.append(up[1].decode("utf-8", errors="backslashreplace"))
        cur = up[0]
    return f"inode {ino}" + (f" ({'/'.join(reversed(parts))})" if parts else "")


def _named(items: list[str]) -> str:
    more = len(items) - MAX_NAMED
    return ", ".join(items[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def check(
    index: Index,
    backend: BlobBackend,
    *,
    verify: bool = False,
    repair: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    progress: Progress | None = None,
) -> FsckReport:
    """Check the store (see the module doc); with `repair`, fix what needs no guessing."""
    if repair and live_mounts(index):
        raise RepairRefused(
            "a mount of this store is running: unmount it before `fsck --repair` "
            "(plain `fsck` is safe while mounted)"
        )
    index.flush()
    report = FsckReport()
    fixes: list[tuple[Finding, Callable[[], None]]] = []  # index repairs, one transaction
    blob_fixes: list[tuple[Finding, Callable[[], object]]] = []  # blob store repairs
    orphans: list[tuple[Finding, bytes]] = []  # deleted together (batched on S3)

    def finding(kind: str, message: str, fix: Callable[[], None] | None = None) -> Finding:
        found = Finding(kind, message, repairable=fix is not None)
        report.findings.append(found)
        if fix is not None:
            fixes.append((found, fix))
        return found

    with index.read_txn():
        root = index.get_inode(ROOT_INODE)
        if root is None or root.kind != NodeKind.ROOT:
            finding(ROOT_MISSING, "the grid root (inode 1) is missing or not a directory root")
        report.inodes = index.count_inodes()

        dangling = index.dangling_dentries()
        for parent, name, ino in dangling:
            text = name.decode("utf-8", errors="backslashreplace")
            finding(
                DANGLING_DENTRY,
                f"entry {text!r} in directory {parent} names inode {ino}, which does not exist"
                if index.get_inode(ino) is None
                else f"entry {text!r} of inode {ino} is in directory {parent}, which does not "
                "exist",
                partial(index.ops_remove_dentry_exact, parent, name, ino),
            )

        for table, inos in index.ops_orphan_rows().items():
            finding(
                ORPHAN_ROWS,
                f"{len(inos)} inode(s) missing but named by rows of {table}: "
                f"{_named([str(i) for i in inos])}",
                partial(index.ops_delete_orphan_rows, table, inos),
            )

        for table, gname, ino in index.ops_grid_rows_without_inode():
            finding(
                GRID_WITHOUT_INODE,
                f"{table[:-1] if table != 'namespaces' else 'namespace'} {gname!r} has no "
                f"directory (inode {ino} is missing)",
            )

        unnamed = {ino for ino, _ in index.ops_unnamed_live_inodes()}
        for ino, have, want in index.link_count_mismatches():
            if ino in unnamed:
                continue
            finding(
                WRONG_NLINK,
                f"{inode_path(index, ino)} has link count {have}, its names say {want}",
                lambda: None,  # set from the repaired state, see below
            )
        for ino in sorted(unnamed):
            finding(
                UNNAMED_INODE,
                f"inode {ino} is live (nlink > 0) but has no name: its contents are unreachable",
            )

        # ---- against the blob store
        rows = index.ops_blob_rows()
        pending = JournalReader.beside(index.path).digests()
        block_digests = index.ops_block_digests()
        checkpoints = index.ops_checkpoints()
        report.checkpoints = len(checkpoints)
        stored = _list_stored(backend, progress)
        report.blobs = len(stored.blobs)
        if stored.bucket is not None:
            report.bucket_objects = len(stored.bucket)
            report.cached = len(stored.cached)

        refs = References()
        per_checkpoint: dict[int, References] = {}
        for cp in checkpoints:
            sub = References()
            walk_manifests(backend.get, [cp.root], sub)
            per_checkpoint[cp.id] = sub
            refs.digests |= sub.digests
            refs.broken.update(sub.broken)
            if progress is not None:
                progress("walk", 1, len(checkpoints))

        def breaks(digests: set[bytes]) -> str:
            users = index.ops_inodes_using(digests)
            files = sorted({inode_path(index, i) for inos in users.values() for i in inos})
            cps = [
                _checkpoint_name(index, cp)
                for cp in checkpoints
                if per_checkpoint[cp.id].digests & digests
            ]
            parts = []
            if files:
                parts.append(f"breaks file(s) {_named(files)}")
            if cps:
                parts.append(f"checkpoint(s) {_named(cps)}")
            return "; ".join(parts) or "nothing references it"

        remote = backend if isinstance(backend, CachedBackend) else None
        referenced = block_digests | refs.digests
        cache_only: list[bytes] = []  # referenced, in a remote store's cache, not in the bucket
        for digest in sorted(referenced):
            if digest in stored.blobs or digest in pending:
                if digest not in rows:
                    size = stored.blobs[digest][0] if digest in stored.blobs else -1
                    if size >= 0:
                        finding(
                            UNRECORDED_BLOB,
                            f"blob {digest.hex()} is stored and used but has no blobs row",
                            partial(index.record_blobs, [(digest, size)], time.time_ns()),
                        )
                if stored.in_cache_only(digest) and digest not in pending:
                    cache_only.append(digest)
                continue
            if digest in refs.broken:
                continue  # reported as a broken manifest below
            where = "the bucket and the local cache" if remote else "the blob store"
            finding(
                MISSING_BLOB, f"blob {digest.hex()} is missing from {where}: {breaks({digest})}"
            )
        # In the cache only: fine while the upload queue has it (`uploaded = 0`: the
        # uploader's work), lost from the bucket if the index says it was uploaded.
        if remote is not None:
            for digest, uploaded in sorted(index.upload_states(cache_only).items()):
                if uploaded:
                    found = finding(
                        NOT_IN_BUCKET,
                        f"blob {digest.hex()} was uploaded but the bucket does not have it (the "
                        f"local cache has a copy, which may be evicted): {breaks({digest})}",
                    )
                    found.repairable = True
                    blob_fixes.append((found, partial(remote.upload, digest)))
        for digest, why in sorted(refs.broken.items()):
            cps = [
                _checkpoint_name(index, cp)
                for cp in checkpoints
                if digest in per_checkpoint[cp.id].broken
            ]
            finding(
                BROKEN_MANIFEST,
                f"manifest {digest.hex()} is {why}: breaks checkpoint(s) {_named(cps)}",
            )
        for digest in sorted(rows.keys() - stored.blobs.keys() - pending - referenced):
            finding(
                STALE_BLOB_ROW,
                f"blobs row {digest.hex()} names a blob that is neither stored nor used",
                partial(index.ops_delete_blob_rows, [digest]),
            )
        cutoff = time.time() - grace_s
        for digest in sorted(stored.blobs.keys() - rows.keys() - referenced - pending):
            size, mtime = stored.blobs[digest]
            old = mtime < cutoff
            found = finding(
                ORPHAN_BLOB,
                f"blob {digest.hex()} ({size} bytes) is stored{stored.where(digest)} but "
                "nothing knows it"
                + ("" if old else " (younger than the grace period: left alone)"),
            )
            if old:
                found.repairable = True
                orphans.append((found, digest))

        if verify:
            if remote is not None:
                bad_bucket, bad_cache = _verify_remote(remote, stored, report, progress)
            else:
                bad_bucket, bad_cache = _verify_local(backend, stored, report, progress), {}
            for digest, why in sorted(bad_bucket.items()):
                # A good cached copy (verified just now) can be uploaded again: no guessing.
                good_copy = remote is not None and digest in stored.cached
                good_copy = good_copy and digest not in bad_cache
                what = f"object of blob {digest.hex()} in the bucket" if remote else (
                    f"blob {digest.hex()}")  # fmt: skip
                found = finding(
                    CORRUPT_BLOB,
                    f"{what} {why}: {breaks({digest})}"
                    + ("; the local cache has a good copy" if good_copy else ""),
                )
                if good_copy and remote is not None:
                    found.repairable = True
                    blob_fixes.append((found, partial(remote.upload, digest)))
            for digest, why in sorted(bad_cache.items()):
                assert remote is not None
                # The bucket's copy (verified just now) is read again after dropping this one.
                good_copy = stored.bucket is not None and digest in stored.bucket
                good_copy = good_copy and digest not in bad_bucket
                message = f"cached copy of blob {digest.hex()} {why}"
                if good_copy:
                    found = finding(CORRUPT_BLOB, message + "; the bucket has a good copy")
                    found.repairable = True
                    blob_fixes.append((found, partial(remote.drop_cached, digest)))
                else:
                    finding(CORRUPT_BLOB, f"{message} and is the only copy: {breaks({digest})}")

    if repair:
        if fixes:
            with index.txn():
                for _, fix in fixes:
                    fix()
                # Link counts as the repaired entries leave them (a dangling entry of a
                # directory was counted in its parent's). An inode left with no name keeps it.
                for ino, _, want in index.link_count_mismatches():
                    if want > 0:
                        index.ops_set_nlink(ino, want)
            for f, _ in fixes:
                f.repaired = True
        # Blob store repairs after the index's (network calls stay out of its transaction).
        for f, blob_fix in blob_fixes:
            try:
                blob_fix()
                f.repaired = True
            except ArtifactFsError as exc:
                f.message += f" (repair failed: {exc.message})"
        if orphans:
            try:
                _delete_stored(backend, [d for _, d in orphans])
                for f, _ in orphans:
                    f.repaired = True
            except ArtifactFsError as exc:
                for f, _ in orphans:
                    f.message += f" (repair failed: {exc.message})"
    return report


@dataclass(slots=True)
class _Stored:
    """What the blob store holds. On a remote store: the bucket's objects and the cache's
    copies too; `blobs` is their union with the newer mtime."""

    blobs: dict[bytes, tuple[int, float]]  # digest -> (size, mtime)
    bucket: dict[bytes, tuple[int, float]] | None = None  # None: not a remote store
    cached: dict[bytes, bool] = field(default_factory=dict)  # cached copy -> uploaded

    def where(self, digest: bytes) -> str:
        if self.bucket is None:
            return ""
        places = [("the bucket", digest in self.bucket), ("the local cache", digest in self.cached)]
        return " in " + " and ".join(p for p, have in places if have)

    def in_cache_only(self, digest: bytes) -> bool:
        return self.bucket is not None and digest in self.cached and digest not in self.bucket


def _list_stored(backend: BlobBackend, progress: Progress | None) -> _Stored:
    def tick() -> None:
        if progress is not None:
            progress("list", 1, None)

    if not isinstance(backend, CachedBackend):
        blobs: dict[bytes, tuple[int, float]] = {}
        for digest, size, mtime in backend.iterate():
            blobs[digest] = (size, mtime)
            tick()
        return _Stored(blobs)
    # The cache first: a block uploaded and evicted while we list is then seen in the bucket,
    # never in neither.
    cached: dict[bytes, bool] = {}
    blobs = {}
    for digest, size, mtime, uploaded in backend.cached_blocks():
        cached[digest] = uploaded
        blobs[digest] = (size, mtime)
        tick()
    bucket: dict[bytes, tuple[int, float]] = {}
    for digest, size, mtime in backend.remote.iterate():
        bucket[digest] = (size, mtime)
        have = blobs.get(digest)
        blobs[digest] = (size, max(mtime, have[1]) if have is not None else mtime)
        tick()
    return _Stored(blobs, bucket, cached)


def _verify_local(
    backend: BlobBackend, stored: _Stored, report: FsckReport, progress: Progress | None
) -> dict[bytes, str]:
    """Re-hash every stored blob; returns the bad ones with why."""
    bad: dict[bytes, str] = {}
    total = len(stored.blobs)
    for digest in sorted(stored.blobs):
        _tally(_rehash(backend.get, digest), digest, bad, report)
        if progress is not None:
            progress("verify", 1, total)
    return bad


def _verify_remote(
    backend: CachedBackend, stored: _Stored, report: FsckReport, progress: Progress | None
) -> tuple[dict[bytes, str], dict[bytes, str]]:
    """Re-hash every object downloaded from the bucket (straight from it, not through the
    cache, several GETs at a time) and every cached copy. Returns (bad objects, bad copies)."""
    assert stored.bucket is not None
    total = len(stored.bucket) + len(stored.cached)
    bad_bucket: dict[bytes, str] = {}
    bad_cache: dict[bytes, str] = {}
    for digest in sorted(stored.cached):
        _tally(_rehash(backend.local.get, digest), digest, bad_cache, report)
        if progress is not None:
            progress("verify", 1, total)
    digests = sorted(stored.bucket)
    with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="artifactfs-fsck") as pool:
        for digest, outcome in zip(
            digests, pool.map(partial(_rehash, backend.remote.get), digests), strict=True
        ):
            _tally(outcome, digest, bad_bucket, report)
            if progress is not None:
                progress("verify", 1, total)
    return bad_bucket, bad_cache


@dataclass(slots=True, frozen=True)
class _Rehash:
    read: bool  # the bytes were read (and so re-hashed)
    problem: str  # "" when they hash to the digest


def _rehash(get: Callable[[bytes], bytes], digest: bytes) -> _Rehash | None:
    """Read and re-hash one blob; None if it is gone (deleted meanwhile by a running gc)."""
    try:
        data = get(digest)
    except NotFound:
        return None
    except StorageError as exc:
        return _Rehash(False, f"cannot be read ({exc.message})")
    if hashlib.sha256(data).digest() != digest:
        return _Rehash(True, "does not match its digest")
    return _Rehash(True, "")


def _tally(
    outcome: _Rehash | None, digest: bytes, bad: dict[bytes, str], report: FsckReport
) -> None:
    if outcome is None:
        return
    if outcome.read:
        report.verified += 1
    if outcome.problem:
        bad[digest] = outcome.problem


def _delete_stored(backend: BlobBackend, digests: list[bytes]) -> None:
    if isinstance(backend, CachedBackend):
        backend.delete_many(digests)  # from the cache, then batched DeleteObjects
        return
    for digest in digests:
        backend.delete(digest)


def _checkpoint_name(index: Index, cp: CheckpointRow) -> str:
    ns = index.namespace_by_id(cp.namespace_id)
    where = grid_path_of(index, ns) if ns is not None else f"namespace #{cp.namespace_id}"
    return f"{where}@{cp.name}"
