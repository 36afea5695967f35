"""`artifactfs fsck`: check the index against itself and against the blob store.

Exit status (as e2fsck's): 0 clean, 1 problems found and all repaired, 4 problems left.
"""

from __future__ import annotations

from typing import Annotated

import typer

from artifactfs.cli.common import StoreOption
from artifactfs.cli.gc_cmd import parse_duration
from artifactfs.cli.progress import phases
from artifactfs.cli.session import Session
from artifactfs.core.fsck import FsckReport, check
from artifactfs.core.gc import DEFAULT_GRACE_S
from artifactfs.errors import ArtifactFsError


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
    store: StoreOption = None,
) -> None:
    """Check the store: the index against itself and against the blob store.

    Lists one line per problem; exits 0 when clean, 1 when every problem was repaired, 4
    when problems remain (a missing or corrupt block names the files and checkpoints it
    breaks). On an S3 store the bucket's keys are checked against the index (blocks still
    waiting for upload count as present in the local cache) and --verify downloads and
    re-hashes every object.

    Example: artifactfs fsck --verify
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
