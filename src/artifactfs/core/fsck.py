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

Everything is read first, from one read snapshot; repairs then run in one transaction. Repairs
are refused while a mount of the store is running (its in-memory state would disagree).

Must not import pyfuse3 or write SQL. Synchronous: the CLI calls it directly; a mount would
call it from a worker thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from artifactfs.blobs.backend import BlobBackend
from artifactfs.core.gc import DEFAULT_GRACE_S, References, live_mounts, walk_manifests
from artifactfs.core.grid import grid_path_of
from artifactfs.core.nodes import ROOT_INODE, NodeKind
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

MAX_NAMED = 5  # files or checkpoints named per finding, then a count

# progress(phase, advance, total)
Progress = Callable[[str, int, int | None], None]


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
    blobs: int = 0  # stored blobs listed
    verified: int = 0  # blobs re-hashed
    checkpoints: int = 0

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
    fixes: list[Callable[[], None]] = []

    def finding(kind: str, message: str, fix: Callable[[], None] | None = None) -> None:
        report.findings.append(Finding(kind, message, repairable=fix is not None))
        if fix is not None:
            fixes.append(fix)

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
        pending = index.ops_pending_digests()
        block_digests = index.ops_block_digests()
        checkpoints = index.ops_checkpoints()
        report.checkpoints = len(checkpoints)
        listed: dict[bytes, tuple[int, float]] = {}
        for digest, size, mtime in backend.iterate():
            listed[digest] = (size, mtime)
            if progress is not None:
                progress("list", 1, None)
        report.blobs = len(listed)

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

        referenced = block_digests | refs.digests
        missing: set[bytes] = set()
        for digest in sorted(referenced):
            if digest in listed or digest in pending:
                if digest not in rows:
                    size = listed[digest][0] if digest in listed else -1
                    if size >= 0:
                        finding(
                            UNRECORDED_BLOB,
                            f"blob {digest.hex()} is stored and used but has no blobs row",
                            partial(index.record_blobs, [(digest, size)], time.time_ns()),
                        )
                continue
            if digest in refs.broken:
                continue  # reported as a broken manifest below
            missing.add(digest)
            finding(
                MISSING_BLOB,
                f"blob {digest.hex()} is missing from the blob store: {breaks({digest})}",
            )
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
        for digest in sorted(rows.keys() - listed.keys() - pending - referenced):
            finding(
                STALE_BLOB_ROW,
                f"blobs row {digest.hex()} names a blob that is neither stored nor used",
                partial(index.ops_delete_blob_rows, [digest]),
            )
        cutoff = time.time() - grace_s
        for digest in sorted(listed.keys() - rows.keys() - referenced - pending):
            size, mtime = listed[digest]
            old = mtime < cutoff
            finding(
                ORPHAN_BLOB,
                f"blob {digest.hex()} ({size} bytes) is stored but nothing knows it"
                + ("" if old else " (younger than the grace period: left alone)"),
                partial(_delete_blob, backend, digest) if old else None,
            )

        if verify:
            total = len(listed)
            for digest in sorted(listed):
                try:
                    data = backend.get(digest)
                except NotFound:
                    continue  # deleted meanwhile (a running gc)
                except StorageError as exc:
                    finding(CORRUPT_BLOB, f"blob {digest.hex()} cannot be read: {exc.message}")
                    continue
                report.verified += 1
                if hashlib.sha256(data).digest() != digest:
                    finding(
                        CORRUPT_BLOB,
                        f"blob {digest.hex()} does not match its digest: {breaks({digest})}",
                    )
                if progress is not None:
                    progress("verify", 1, total)

    if repair and fixes:
        with index.txn():
            for fix in fixes:
                fix()
            # Link counts as the repaired entries leave them (a dangling entry of a directory
            # was counted in its parent's). An inode left with no name keeps its count.
            for ino, _, want in index.link_count_mismatches():
                if want > 0:
                    index.ops_set_nlink(ino, want)
        for f in report.findings:
            f.repaired = f.repairable
    return report


def _delete_blob(backend: BlobBackend, digest: bytes) -> None:
    backend.delete(digest)


def _checkpoint_name(index: Index, cp: CheckpointRow) -> str:
    ns = index.namespace_by_id(cp.namespace_id)
    where = grid_path_of(index, ns) if ns is not None else f"namespace #{cp.namespace_id}"
    return f"{where}@{cp.name}"
