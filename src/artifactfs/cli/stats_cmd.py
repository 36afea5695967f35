"""`artifactfs stats`: what the store holds and costs, and which mounts run."""

from __future__ import annotations

from typing import Annotated

import typer

from artifactfs.cli.common import StoreOption
from artifactfs.cli.session import Session, human, when
from artifactfs.core.stats import StoreStats, gather


def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for programs.")] = False,
    store: StoreOption = None,
) -> None:
    """Show what the store holds and costs, and which mounts run.

    Namespaces per sandbox and scope, files, logical and stored bytes (dedup ratio),
    checkpoints, blobs, the journal and upload queue, the local block cache of an S3 store
    (used of its budget, and how much is not yet uploaded), and running mounts.
    """
    session = Session(store)
    try:
        result = gather(session.store.index, session.store.backend)
    finally:
        session.close()
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    typer.echo(render(result))


def render(s: StoreStats) -> str:
    lines = [
        f"sandboxes   {s.sandboxes}, namespaces {s.namespaces}",
    ]
    for sc in s.scopes:
        lines.append(
            f"  {sc.sandbox}/{sc.scope:<24} {sc.workspaces} workspace(s), {sc.blobs} blob(s)"
        )
    lines += [
        f"files       {s.files}, {human(s.logical_bytes)} logical",
        f"blocks      {s.unique_blocks} distinct, {human(s.unique_block_bytes)} stored "
        f"(dedup ratio {s.dedup_ratio:.2f})",
        f"checkpoints {s.checkpoints}, capturing {human(s.checkpoint_bytes)}, "
        f"{human(s.manifest_bytes)} of manifests",
        f"blobs       {s.blobs}, {human(s.blob_bytes)} (backend: {human(s.backend_used_bytes)} "
        f"used, {human(s.backend_free_bytes)} free)",
        f"journal     {s.pending_blocks} block(s), {human(s.pending_bytes)}",
        f"uploads     {s.upload_queue} queued, {human(s.upload_queue_bytes)}",
    ]
    if s.cache is not None:
        c = s.cache
        share = 100 * c.used_bytes / c.budget_bytes if c.budget_bytes else 0.0
        lines.append(
            f"cache       {c.blocks} block(s), {human(c.used_bytes)} of {human(c.budget_bytes)} "
            f"({share:.0f}%), {human(c.pinned_bytes)} not yet uploaded"
        )
    lines += [
        f"mounts      {len(s.mounts)}",
    ]
    for m in s.mounts:
        who = f"credential {m.credential}" if m.credential else "admin view"
        lines.append(
            f"  pid {m.pid} at {m.mountpoint} since "
            f"{when(int(m.started.timestamp() * 1e9))} ({who})"
        )
    return "\n".join(lines)
