"""`artifactfs gc`: reclaim blobs nothing references and sessions past their expiry, on a store
directly (running mounts may keep writing: see core/gc.py for why that is safe)."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from artifactfs.cli.common import StoreOption
from artifactfs.cli.progress import phases
from artifactfs.cli.session import Session, actor, human, run
from artifactfs.core.gc import DEFAULT_GRACE_S, GcReport, collect
from artifactfs.errors import InvalidArgument

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)?")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> float:
    """'3600s', '90m', '1h', '2d', '0' -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise InvalidArgument(f"{text!r} is not a duration: give e.g. 30s, 15m, 1h or 2d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def summary(report: GcReport) -> str:
    verb = "would free" if report.dry_run else "freed"
    plural = "" if report.blobs == 1 else "s"
    line = f"gc {verb} {report.blobs} blob{plural} ({human(report.nbytes)})"
    sessions = len(report.sessions)
    line += f", {sessions} expired session{'' if sessions == 1 else 's'}"
    if sessions:
        line += f" ({', '.join(report.sessions)}; {report.namespaces} namespaces)"
    if report.kept_young or report.kept_building:
        line += f"; kept {report.kept_young + report.kept_building} younger than the grace period"
    if report.kept_pinned:
        line += f"; kept {report.kept_pinned} not yet uploaded (freed once in the bucket)"
    if report.kept_touched:
        line += f"; kept {report.kept_touched} a writer used again"
    return line


def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be freed; change nothing.")
    ] = False,
    grace: Annotated[
        str,
        typer.Option(
            "--grace",
            metavar="DURATION",
            help="Never collect blobs younger than this (in-flight writes of running mounts).",
        ),
    ] = f"{int(DEFAULT_GRACE_S)}s",
    store: StoreOption = None,
) -> None:
    """Reclaim unreferenced blobs and sessions past their expiry.

    Frees blobs that no file, open file, checkpoint or in-flight write references, and
    removes expired sessions with their namespaces and checkpoints. On an S3 store the blocks
    go from the local cache and the bucket (batched deletes); blocks not yet uploaded stay.

    Safe while mounts are running. Prints one summary line; the run is recorded in the log.
    """
    grace_s = parse_duration(grace)

    async def go(s: Session) -> GcReport:
        labels = {"list": "listing blobs", "walk": "walking checkpoints", "delete": "deleting"}
        with phases(labels) as progress:
            return await collect(
                s.store.index,
                s.store.backend,
                fs=s.fs,
                grace_s=grace_s,
                dry_run=dry_run,
                actor=actor(),
                progress=progress,
            )

    report = run(store, go)
    typer.echo(summary(report))
    if report.lost:
        typer.echo(
            f"warning: {len(report.lost)} blob(s) were deleted while a writer started using "
            "them: run `artifactfs fsck` to see which files they break",
            err=True,
        )
