"""Store statistics: what the grid holds, what it costs in storage, and what is running.

`gather` reads everything from one read snapshot of the index; the only backend calls are
`usage()` (bytes used and free on the medium) and, on a remote store, the local cache's figures
(no network). The result is a pydantic model, so the CLI's
`--json` output has a typed, documented shape.

Must not import pyfuse3 or write SQL.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel

from artifactfs.blobs.backend import BlobBackend
from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.journal import JournalReader
from artifactfs.index.db import Index


class ScopeStats(BaseModel):
    sandbox: str
    scope: str
    kind: str  # shared, user, session
    workspaces: int
    blobs: int  # blob namespaces


class MountStats(BaseModel):
    pid: int
    mountpoint: str
    started: datetime
    credential: str | None  # None: the administrative view


class CacheStats(BaseModel):
    """The local block cache of a remote (S3) store, as its directory holds it now."""

    blocks: int
    used_bytes: int
    budget_bytes: int
    pinned_bytes: int  # not yet uploaded: the only copy, never evicted


class StoreStats(BaseModel):
    sandboxes: int
    namespaces: int
    scopes: list[ScopeStats]
    files: int  # linked regular files
    logical_bytes: int  # their sizes summed
    unique_blocks: int  # distinct blocks the live files use
    unique_block_bytes: int  # their stored bytes
    dedup_ratio: float  # logical bytes / unique block bytes (1.0 when empty)
    checkpoints: int
    checkpoint_bytes: int  # logical bytes the checkpoints capture
    manifest_bytes: int  # metadata the checkpoints wrote
    blobs: int  # rows of `blobs`: blocks and manifests the index knows are stored
    blob_bytes: int
    pending_blocks: int  # the journal of small blocks not yet in the backend
    pending_bytes: int
    upload_queue: int  # blobs not yet uploaded (remote stores)
    upload_queue_bytes: int
    backend_used_bytes: int  # as the backend counts it (an estimate on local disk)
    backend_free_bytes: int
    cache: CacheStats | None  # None: a local store
    mounts: list[MountStats]


def gather(index: Index, backend: BlobBackend) -> StoreStats:
    index.flush()
    with index.read_txn():
        scopes = [
            ScopeStats(sandbox=sb, scope=sc, kind=k, workspaces=w, blobs=b)
            for sb, sc, k, w, b in index.ops_namespace_counts()
        ]
        files, logical = index.ops_file_totals()
        nblocks, unique = index.ops_unique_block_totals()
        cps, cp_bytes, manifest_bytes = index.ops_checkpoint_totals()
        nblobs, blob_bytes = index.stored_bytes()
        pending, pending_bytes = JournalReader.beside(index.path).totals()
        queue, queue_bytes = index.upload_queue_stats()
        mounts = [
            MountStats(
                pid=m.pid,
                mountpoint=m.mountpoint,
                started=datetime.fromtimestamp(m.started_ns / 1e9, UTC),
                credential=m.credential,
            )
            for m in index.live_mounts()
        ]
        namespaces = index.count_namespaces()
    used, free = backend.usage()
    cache = None
    if isinstance(backend, CachedBackend):
        # This process scanned the cache directory when it opened the store: the figures are
        # those of every process's puts, uploads and evictions up to then.
        cache_used, pinned, budget = backend.cache_usage()
        cache = CacheStats(
            blocks=backend.cached_count(),
            used_bytes=cache_used,
            budget_bytes=budget,
            pinned_bytes=pinned,
        )
    return StoreStats(
        sandboxes=len({s.sandbox for s in scopes}),
        namespaces=namespaces,
        scopes=scopes,
        files=files,
        logical_bytes=logical,
        unique_blocks=nblocks,
        unique_block_bytes=unique,
        dedup_ratio=round(logical / unique, 3) if unique else 1.0,
        checkpoints=cps,
        checkpoint_bytes=cp_bytes,
        manifest_bytes=manifest_bytes,
        blobs=nblobs,
        blob_bytes=blob_bytes,
        pending_blocks=pending,
        pending_bytes=pending_bytes,
        upload_queue=queue,
        upload_queue_bytes=queue_bytes,
        backend_used_bytes=used,
        backend_free_bytes=free,
        cache=cache,
        mounts=mounts,
    )
