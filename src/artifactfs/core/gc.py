"""Garbage collection: reclaim blobs nothing references, and sessions past their expiry.

A blob (block, manifest or manifest chunk) is *referenced* when a live block map names it
(`blocks`, which keeps the rows of open-unlinked files until they are reaped), when it waits in
the journal of small blocks (`blobs/journal.py`), or when a checkpoint reaches it: every
checkpoint root and every clean directory's recorded manifest (`dir_manifests`: the next
checkpoint reuses those digests without storing them again) is walked, each distinct manifest
once, collecting manifest, chunk and block digests. Everything else in the backend, or in
`blobs`, is garbage once it is older than the grace period.

One run (`collect`):
  1. sessions: `sess-*` scopes whose `expires_ns` passed are removed through `FileSystem`
     in the admin view (`rm -r` of each namespace, then `rmdir` of the scope), so the events,
     the checkpoints that go with a namespace and the grid rules are the ones `rmdir` applies;
  2. list the backend (digest, size, mtime), THEN read the references in one read snapshot
     of the index (a second connection) and walk the manifests;
  3. candidates: listed blobs and `blobs` rows that are not referenced and are older than the
     grace period (backend mtime and `blobs.created_ns`), and not written since a checkpoint
     build that is still running began (the `building` table is its write intent);
  4. per batch, ONE write transaction re-checks every candidate against the index as it is
     now (block maps, journal, clean directories, a `blobs` row written meanwhile), walks any
     checkpoint recorded since the snapshot first, and deletes the `blobs` rows of what is
     still garbage; only after that commit are the blobs deleted from the backend, each only
     if it is still older than the cutoff (see below);
  5. a `gc.run` event records the run.

Why this is safe with mounts writing (the argument the race test checks):
  - A writer commits a block map only after its put, and the commit writes the `blobs` row
    and the `blocks` row together; a small block is journalled (`blobs/journal.py`) before
    the commit that first names it and put by the mover after it, its journal segment going
    only once the put is synced: a candidate deleted before such a commit is put again. A
    checkpoint is recorded (row, manifests' `blobs` rows, clean directories) in one unit
    after its manifests are stored, with a `building` row committed before.
  - Listing before the snapshot: any blob that was referenced when the snapshot was taken
    is in the reference set, so it is not a candidate, whatever the listing saw; a blob put
    after the listing is not listed and so never deleted in this run.
  - A candidate that a writer references between the snapshot and the deletion is caught by
    the re-check: the deleting transaction holds the write lock, so a commit either happened
    before it (the re-check sees its `blocks`/`dir_manifests` row, or its
    checkpoint, which is walked first) or happens after the `blobs` row is gone.
  - What the re-check cannot see is a writer between its put and its commit. For a blob it
    wrote, the put made the blob's mtime young: the grace period (default one hour, longer
    than a file stays dirty in practice) protects it. With a grace of 0 only committed data
    is protected: exactly what the race test asserts.
  - A writer whose put finds the blob ALREADY stored (a dedup hit) while that blob is garbage,
    and whose commit lands after the re-check: the put refreshes the blob's mtime, and the
    backend deletes a blob only if its mtime is still older than the cutoff, checked after
    renaming it aside (`delete_if_older`, `delete_many_if_older`), so either the put saw it
    gone and stored it again, or the delete saw it young and kept it. After deleting, gc
    still re-reads the index and reports any deleted digest that became referenced meanwhile
    and is stored nowhere (`lost`, in the report, the event and the log) so that `fsck` can
    name the damage.

On a remote (S3) store the listing is the local cache and the bucket (a cached block's mtime
is when it was put or fetched, a bucket object's its LastModified); a block the cache holds
pinned (not yet uploaded) is never a candidate: it is the only copy and the uploader owns it
(an unreferenced one is freed by a later run once uploaded). A deleted block leaves the cache
first, then the bucket, in batched DeleteObjects requests.

Must not import pyfuse3 or write SQL. Backend calls and the manifest walk run in worker
threads; the deleting transactions too (on gc's own connection), so a mount sharing the
process is never stalled by more than one batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from artifactfs.blobs.backend import BlobBackend
from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.journal import JournalReader
from artifactfs.core.fs import FileSystem
from artifactfs.core.manifest import ManifestError, child_digests, decode
from artifactfs.core.nodes import Caller, NodeKind
from artifactfs.core.progress import Progress
from artifactfs.core.restore import CHANGE_ENTRY, CHANGE_ORPHAN
from artifactfs.errors import ArtifactFsError, Corrupt, NotFound, StorageError
from artifactfs.index.db import CheckpointRow, Index, ScopeRow, pid_alive

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0
DELETE_BATCH = 1000
# Backend mtimes have coarse resolution on some filesystems: a build's intent covers blobs
# written up to this long before its row.
BUILD_SLACK_NS = 2 * 10**9


class GcError(ArtifactFsError):
    """gc stopped without deleting anything."""

    exit_code = 4


@dataclass(slots=True)
class References:
    """What the index and the checkpoints reference, from one snapshot."""

    digests: set[bytes] = field(default_factory=set)  # blocks, manifests, chunks
    walked: set[bytes] = field(default_factory=set)  # manifests whose children were added
    roots: set[bytes] = field(default_factory=set)  # checkpoint roots walked
    broken: dict[bytes, str] = field(default_factory=dict)  # manifest -> why not readable


@dataclass(slots=True)
class GcReport:
    dry_run: bool
    grace_s: float
    listed: int = 0  # blobs in the backend
    referenced: int = 0  # distinct digests referenced
    blobs: int = 0  # blobs deleted (or that would be)
    nbytes: int = 0
    rows: int = 0  # `blobs` rows without a stored blob dropped
    kept_young: int = 0  # garbage younger than the grace period
    kept_building: int = 0  # garbage a running checkpoint build may still record
    kept_pinned: int = 0  # garbage not yet uploaded from a remote store's cache
    kept_touched: int = 0  # garbage a writer used again while gc deleted
    sessions: list[str] = field(default_factory=list)  # sandbox/sess-id
    namespaces: int = 0  # namespaces removed with them
    lost: list[bytes] = field(default_factory=list)  # see the module doc
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def walk_manifests(
    load: Callable[[bytes], bytes],
    roots: Iterable[bytes],
    refs: References,
    progress: Progress | None = None,
) -> None:
    """Worker thread: add every manifest, chunk and block reachable from `roots` to `refs`,
    each distinct manifest read once. Unreadable ones go to `refs.broken`."""
    todo = [r for r in roots if r not in refs.walked]
    while todo:
        digest = todo.pop()
        if digest in refs.walked:
            continue
        refs.walked.add(digest)
        refs.digests.add(digest)
        try:
            m = decode(load(digest), digest)
        except NotFound:
            refs.broken[digest] = "missing"
            continue
        except ManifestError as exc:
            refs.broken[digest] = f"corrupt ({exc.message})"
            continue
        except Corrupt as exc:  # a remote store's fetch verifies the digest itself
            refs.broken[digest] = f"corrupt ({exc.message})"
            continue
        except StorageError as exc:
            refs.broken[digest] = f"unreadable ({exc.message})"
            continue
        refs.digests.update(d for _, d in m.self_entry.blocks)
        for e in m.entries.values():
            refs.digests.update(d for _, d in e.blocks)
        todo.extend(d for d in child_digests(m) if d not in refs.walked)
        if progress is not None:
            progress("walk", 1, None)


@dataclass(slots=True)
class _Snapshot:
    refs: References
    rows: dict[bytes, tuple[int, int]]  # blobs rows: digest -> (size, created_ns)
    checkpoints: list[CheckpointRow]
    building: list[tuple[int, int]]


def _read_snapshot(path: Path, backend: BlobBackend, progress: Progress | None) -> _Snapshot:
    """Worker thread: the references as of one read snapshot, manifests walked."""
    snap = Index(path)
    try:
        with snap.read_txn():
            refs = References()
            refs.digests |= snap.ops_block_digests()
            rows = snap.ops_blob_rows()
            clean = snap.ops_clean_dir_digests()
            checkpoints = snap.ops_checkpoints()
            building = snap.ops_building()
    finally:
        snap.conn.close()
    refs.digests |= JournalReader.beside(path).digests()
    for cp in checkpoints:
        walk_manifests(backend.get, [cp.root], refs, progress)
        refs.roots.add(cp.root)
    before = set(refs.broken)
    walk_manifests(backend.get, clean, refs, progress)
    # A clean directory's children are clean directories with rows of their own and live
    # files: a missing manifest there hides nothing from gc (fsck reports it).
    for d in set(refs.broken) - before:
        del refs.broken[d]
    return _Snapshot(refs, rows, checkpoints, building)


def live_mounts(index: Index) -> bool:
    return bool(index.live_mounts())


# ---- sessions -------------------------------------------------------------------------------


async def _remove_tree(fs: FileSystem, root: int, caller: Caller, held: list[int] | None) -> None:
    """rm -r of everything below directory `root` (not `root` itself), bottom-up. Inodes
    removed are kept from being reaped and listed in `held` unless it is None."""
    index = fs.index
    stack: list[tuple[int, bool]] = [(root, False)]
    while stack:
        ino, expanded = stack.pop()
        children = index.children(ino)
        if not expanded:
            stack.append((ino, True))
            stack.extend((c.id, False) for _, c in children if NodeKind(c.kind) is NodeKind.DIR)
            continue
        for name, child in children:
            if held is not None:
                fs.remember(child.id)
                held.append(child.id)
            if NodeKind(child.kind).is_dir:
                await fs.rmdir(ino, name, caller)
            else:
                await fs.unlink(ino, name, caller)


async def destroy_scope(fs: FileSystem, scope: ScopeRow, caller: Caller) -> int:
    """Remove a scope with every namespace in it, as `rm -r` of its directory would; returns
    the number of namespaces removed.

    When a mount of the store is running, removed inodes are not deleted here (that mount may
    hold one open): they are announced in the change feed as orphans, as a restore does, and
    the mounts drop the names from the kernel's cache and reclaim them.
    """
    index = fs.index
    running = live_mounts(index)
    held: list[int] | None = [] if running else None
    sandbox = index.sandbox_by_id(scope.sandbox_id)
    assert sandbox is not None
    count = 0
    for name, child in index.children(scope.inode):
        if held is not None:
            fs.remember(child.id)
            held.append(child.id)
        if NodeKind(child.kind).is_dir:
            await _remove_tree(fs, child.id, caller, held)
            await fs.rmdir(scope.inode, name, caller)
        else:
            await fs.unlink(scope.inode, name, caller)
        count += 1
    if held is not None:
        fs.remember(scope.inode)
        held.append(scope.inode)
    await _remove_scope_dir(fs, sandbox.inode, sandbox.name, scope, caller)
    if held is not None:
        feed: list[tuple[int, int, bytes | None]] = [
            (CHANGE_ENTRY, sandbox.inode, scope.name.encode())
        ]
        feed += [(CHANGE_ORPHAN, ino, None) for ino in held]
        with index.txn():
            index.append_changes(feed)
        for ino in held:
            fs.lookups.pop(ino, None)  # no reap here: the mounts reclaim them
    return count


async def _remove_scope_dir(
    fs: FileSystem, sandbox_ino: int, sandbox: str, scope: ScopeRow, caller: Caller
) -> None:
    """`rmdir` of an (empty) expired scope directory.

    The policy hides an expired session scope from every view, the administrative one
    included, so `FileSystem.rmdir` answers NotFound for it; until FileSystem has an
    operation for this, the same steps are taken here through the index's named queries
    (the scope row, its name, the link counts, the `scope.destroy` event) and the inode is
    reaped as rmdir would.
    """
    name = scope.name.encode()
    try:
        await fs.rmdir(sandbox_ino, name, caller)
        return
    except NotFound:
        pass
    index = fs.index
    now = time.time_ns()
    with index.txn():
        row = index.get_inode(scope.inode)
        if row is None or index.has_children(scope.inode):
            return
        index.delete_scope(scope.id)
        index.append_event(
            "scope.destroy", {"scope": scope.name, "sandbox": sandbox, "expired": True}, sandbox
        )
        index.remove_dentry(sandbox_ino, name)
        index.add_nlink(scope.inode, -row.nlink, ctime_ns=now)
        index.add_nlink(sandbox_ino, -1)
        index.touch_inode(sandbox_ino, mtime_ns=now, ctime_ns=now)
    fs.reap_orphan(scope.inode)


# ---- blobs ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Listing:
    blobs: dict[bytes, tuple[int, int]]  # digest -> (size, mtime ns)
    pinned: set[bytes]  # in a remote store's cache, not yet uploaded


def _list_backend(backend: BlobBackend, progress: Progress | None) -> _Listing:
    """Worker thread: every stored blob. A remote store's cache is listed with its pinned bits
    (its own walk), the bucket after it; a block in both keeps the cache's (younger) mtime."""
    out: dict[bytes, tuple[int, int]] = {}
    pinned: set[bytes] = set()
    n = 0

    def add(digest: bytes, size: int, mtime: float) -> None:
        nonlocal n
        out.setdefault(digest, (size, int(mtime * 1e9)))
        n += 1
        if progress is not None and n % 256 == 0:
            progress("list", 256, None)

    if isinstance(backend, CachedBackend):
        for digest, size, mtime, uploaded in backend.cached_blocks():
            add(digest, size, mtime)
            if not uploaded:
                pinned.add(digest)
        for digest, size, mtime in backend.remote.iterate():
            add(digest, size, mtime)
    else:
        for digest, size, mtime in backend.iterate():
            add(digest, size, mtime)
    if progress is not None:
        progress("list", n % 256, None)
    return _Listing(out, pinned)


def _delete_blobs(backend: BlobBackend, digests: list[bytes], cutoff_ns: int) -> list[bytes]:
    """Worker thread: delete what is still older than `cutoff_ns`; returns what went. A
    backend that can delete only what is still old closes the window of a writer whose put
    found the garbage blob present (a put refreshes the blob's mtime) after the re-check."""
    if isinstance(backend, CachedBackend):
        gone = backend.delete_many_if_older(digests, cutoff_ns)
    else:
        guarded = getattr(backend, "delete_if_older", None)
        if guarded is None:
            for d in digests:
                backend.delete(d)
            return digests
        # False: kept young, or absent (a `blobs` row without a blob): only the first stays.
        gone = [d for d in digests if guarded(d, cutoff_ns) or not backend.has(d)]
    if len(gone) < len(digests):
        kept = set(digests) - set(gone)
        for d in sorted(kept):
            log.info("gc kept blob %s: a writer used it again meanwhile", d.hex())
    return gone


async def collect(
    index: Index,
    backend: BlobBackend,
    *,
    fs: FileSystem | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    actor: str = "gc",
    progress: Progress | None = None,
    now_ns: int | None = None,
) -> GcReport:
    """One gc run (see the module doc). `index` is gc's own connection to the store's index
    (no group commit); `fs`, a FileSystem in the admin view on it, is needed to expire
    sessions (None skips them). `now_ns` stands for the clock in session expiry (tests)."""
    started = time.monotonic()
    report = GcReport(dry_run=dry_run, grace_s=grace_s)
    index.flush()

    # 1. sessions past their expiry
    if fs is not None:
        expired = index.ops_expired_sessions(now_ns if now_ns is not None else time.time_ns())
        caller = Caller(uid=os.getuid(), gid=os.getgid())
        for scope, sandbox in expired:
            report.sessions.append(f"{sandbox}/{scope.name}")
            if dry_run:
                report.namespaces += len(index.children(scope.inode))
            else:
                report.namespaces += await destroy_scope(fs, scope, caller)
        index.flush()

    # 2. list, then snapshot
    list_start = time.time_ns()
    listing = await trio.to_thread.run_sync(_list_backend, backend, progress)
    listed = listing.blobs
    report.listed = len(listed)
    snap = await trio.to_thread.run_sync(_read_snapshot, index.path, backend, progress)
    refs = snap.refs
    if refs.broken:
        names = await trio.to_thread.run_sync(_checkpoints_reaching, snap, backend)
        raise GcError(
            f"{len(refs.broken)} checkpoint manifest(s) cannot be read "
            f"({', '.join(sorted(names)[:5])}): gc deleted nothing, because what only those "
            "manifests reference cannot be known; run `artifactfs fsck` and delete or "
            "re-import the damaged checkpoints"
        )
    report.referenced = len(refs.digests)

    # 3. candidates
    cutoff = list_start - int(grace_s * 1e9)
    row_cutoff = time.time_ns() - int(grace_s * 1e9)
    builds = [s for pid, s in snap.building if pid_alive(pid)]
    build_floor = min(builds) - BUILD_SLACK_NS if builds else None
    doomed: dict[bytes, int] = {}  # digest -> size; -1: only a `blobs` row
    for digest in listed.keys() | snap.rows.keys():
        if digest in refs.digests:
            continue
        if digest in listing.pinned:
            # Not yet uploaded: its row stays too, so the uploader uploads it and a later
            # run frees it from the cache and the bucket together.
            report.kept_pinned += 1
            continue
        stored = listed.get(digest)
        row = snap.rows.get(digest)
        if (stored is not None and stored[1] >= cutoff) or (
            row is not None and row[1] >= row_cutoff
        ):
            report.kept_young += 1
            continue
        if stored is not None and build_floor is not None and stored[1] >= build_floor:
            report.kept_building += 1
            continue
        doomed[digest] = stored[0] if stored is not None else -1

    if dry_run:
        report.blobs = sum(1 for s in doomed.values() if s >= 0)
        report.nbytes = sum(s for s in doomed.values() if s >= 0)
        report.rows = sum(1 for s in doomed.values() if s < 0)
        report.seconds = time.monotonic() - started
        return report

    # 4. re-check, delete rows, delete blobs; batch by batch
    order = sorted(doomed)
    total = len(order)
    for i in range(0, total, DELETE_BATCH):
        batch = order[i : i + DELETE_BATCH]
        gone, touched = await _delete_batch(index, backend, batch, refs, row_cutoff, progress)
        report.kept_touched += len(touched)
        for d in gone:
            size = doomed[d]
            if size >= 0:
                report.blobs += 1
                report.nbytes += size
            else:
                report.rows += 1
        if progress is not None:
            progress("delete", len(batch), total)
        # Anything deleted that a writer named meanwhile (the dedup-hit window).
        late = index.ops_referenced_or_young(gone, row_cutoff)
        if late:
            # A writer that stored it again after the delete lost nothing.
            late = {d for d in late if not await trio.to_thread.run_sync(backend.has, d)}
        if late:
            report.lost.extend(sorted(late))
            for d in sorted(late):
                log.error("gc deleted blob %s while a writer started using it", d.hex())

    report.seconds = time.monotonic() - started
    with index.txn():
        index.append_event(
            "gc.run",
            {
                "actor": actor,
                "grace_s": grace_s,
                "blobs": report.blobs,
                "bytes": report.nbytes,
                "rows": report.rows,
                "kept_young": report.kept_young,
                "kept_pinned": report.kept_pinned,
                "kept_touched": report.kept_touched,
                "sessions": report.sessions,
                "namespaces": report.namespaces,
                "lost": [d.hex() for d in report.lost],
                "seconds": round(report.seconds, 3),
            },
        )
    return report


async def _delete_batch(
    index: Index,
    backend: BlobBackend,
    batch: list[bytes],
    refs: References,
    row_cutoff: int,
    progress: Progress | None,
) -> tuple[list[bytes], list[bytes]]:
    """Re-check `batch` in one write transaction, drop the rows of what is still garbage,
    then delete those blobs. Returns (the digests deleted, rows only included; those whose
    blob a writer refreshed meanwhile and the backend kept)."""

    def recheck() -> tuple[list[bytes], list[bytes]]:
        """(roots of checkpoints recorded since the snapshot, or else the digests whose rows
        this transaction deleted)."""
        with index.txn():
            new = [c.root for c in index.ops_checkpoints() if c.root not in refs.roots]
            if new:
                return new, []
            again = index.ops_referenced_or_young(batch, row_cutoff)
            keep = [d for d in batch if d not in again and d not in refs.digests]
            index.ops_delete_blob_rows(keep)
            return [], keep

    def walk(roots: list[bytes]) -> None:
        walk_manifests(backend.get, roots, refs, progress)
        refs.roots.update(roots)

    while True:
        new_roots, keep = await trio.to_thread.run_sync(recheck)
        if not new_roots:
            break
        # Checkpoints recorded since the snapshot: walk them, then re-check.
        await trio.to_thread.run_sync(walk, new_roots)
        if refs.broken:
            raise GcError(
                "a checkpoint recorded during gc cannot be read: gc stopped; run `artifactfs fsck`"
            )
    deleted = await trio.to_thread.run_sync(_delete_blobs, backend, keep, row_cutoff)
    # A kept blob lost its row in the re-check: the writer's commit (INSERT OR IGNORE) wrote
    # it again, or a later run finds the blob unreferenced.
    touched = set(keep) - set(deleted)
    return [d for d in keep if d not in touched], sorted(touched)


def _checkpoints_reaching(snap: _Snapshot, backend: BlobBackend) -> list[str]:
    """Names (namespace id/checkpoint) of the checkpoints whose walk reaches a broken
    manifest, for the error message."""
    out = []
    for cp in snap.checkpoints:
        sub = References()
        walk_manifests(backend.get, [cp.root], sub)
        if sub.broken:
            out.append(f"checkpoint {cp.name!r} of namespace #{cp.namespace_id}")
    return out
