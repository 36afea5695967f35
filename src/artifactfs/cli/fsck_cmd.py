"""`artifactfs fsck`: check the index against itself and against the blob store.

Exit status (as e2fsck's): 0 clean, 1 problems found and all repaired, 4 problems left.
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import BaseModel

from artifactfs.cli.common import StoreOption
from artifactfs.cli.gc_cmd import parse_duration
from artifactfs.cli.progress import phases
from artifactfs.cli.session import Session
from artifactfs.core.fsck import FsckReport, check
from artifactfs.core.gc import DEFAULT_GRACE_S
from artifactfs.errors import ArtifactFsError


class FindingItem(BaseModel):
    kind: str  # missing-blob, orphan-blob, wrong-nlink, ... (core/fsck.py)
    message: str
    repairable: bool
    repaired: bool


class FsckResult(BaseModel):
    """`fsck --json`: the findings and the counts the summary line gives."""

    clean: bool
    findings: list[FindingItem]
    repaired: int
    left: int
    inodes: int
    blobs: int
    verified: int | None  # None without --verify
    checkpoints: int
    bucket_objects: int | None  # S3 stores only
    cached: int | None  # S3 stores only


def result(report: FsckReport, verify: bool) -> FsckResult:
    return FsckResult(
        clean=report.clean,
        findings=[
            FindingItem(kind=f.kind, message=f.message, repairable=f.repairable,
                        repaired=f.repaired)
            for f in report.findings
        ],
        repaired=sum(1 for f in report.findings if f.repaired),
        left=len(report.unrepaired),
        inodes=report.inodes,
        blobs=report.blobs,
        verified=report.verified if verify else None,
        checkpoints=report.checkpoints,
        bucket_objects=report.bucket_objects,
        cached=report.cached,
    )  # fmt: skip


class FsckFailed(ArtifactFsError):
    """The store has problems fsck did not repair."""

    exit_code = 4


def fsck(
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Re-hash every blob against its digest (slow; on S3, downloads every object).",
        ),
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Fix what needs no guessing: orphan rows, link counts, blob rows, orphan "
            "blobs older than the grace period; on S3, blocks the bucket lost or holds "
            "corrupt are uploaded again from a good cached copy. Mounts must be stopped.",
        ),
    ] = False,
    grace: Annotated[
        str,
        typer.Option(
            "--grace", metavar="DURATION", help="Orphan blobs younger than this are left alone."
        ),
    ] = f"{int(DEFAULT_GRACE_S)}s",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (findings and counts).")
    ] = False,
    store: StoreOption = None,
) -> None:
    """Check the store: the index against itself and against the blob store.

    Lists one line per problem; exits 0 when clean, 1 when every problem was repaired, 4
    when problems remain (a missing or corrupt block names the files and checkpoints it
    breaks). On an S3 store the bucket's keys are checked against the index (blocks still
    waiting for upload count as present in the local cache) and --verify downloads and
    re-hashes every object. With --json: one object (clean, findings with kind, message,
    repairable and repaired, and the counts); the exit status is the same.
    """
    grace_s = parse_duration(grace)
    session = Session(store)
    try:
        labels = {"list": "listing blobs", "walk": "checkpoints", "verify": "verifying"}
        with phases(labels) as progress:
            report = check(
                session.store.index,
                session.store.backend,
                verify=verify,
                repair=repair,
                grace_s=grace_s,
                progress=progress,
            )
    finally:
        session.close()
    if as_json:
        typer.echo(result(report, verify).model_dump_json(indent=2))
    else:
        for finding in report.findings:
            typer.echo(str(finding))
        typer.echo(summary(report, verify))
    left = report.unrepaired
    if left:
        repairable = sum(1 for f in left if f.repairable)
        hint = " (run with --repair to fix " + str(repairable) + ")" if repairable else ""
        raise FsckFailed(f"{len(left)} problem(s) left{hint}")
    if report.findings:
        raise typer.Exit(1)


def summary(report: FsckReport, verify: bool) -> str:
    where = ""
    if report.bucket_objects is not None:
        where = f" ({report.bucket_objects} in the bucket, {report.cached} in the local cache)"
    what = (
        f"{report.inodes} inodes, {report.blobs} blobs{where}"
        + (f", {report.verified} re-hashed" if verify else "")
        + f", {report.checkpoints} checkpoints"
    )
    if report.clean:
        return f"clean: {what}"
    fixed = sum(1 for f in report.findings if f.repaired)
    return f"{len(report.findings)} problem(s), {fixed} repaired: {what}"
