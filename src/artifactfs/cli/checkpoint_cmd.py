"""`artifactfs checkpoint`: create, list, diff, restore, delete, verify, export and import
checkpoints of a namespace, on a store directly (no mount needed; running mounts of the store
see a restore at once through the change feed).

A namespace is named by its grid path (`acme/user-alice/proj`) or by its id (the value of the
`user.artifactfs.namespace` xattr). Every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import trio
import typer
from pydantic import BaseModel, TypeAdapter

from artifactfs.cli.common import MARKUP, StoreOption, examples
from artifactfs.cli.progress import phases
from artifactfs.cli.session import Session, actor, human, run, when
from artifactfs.core.diff import diff as diff_trees
from artifactfs.core.grid import parse_grid_path
from artifactfs.core.portable import (
    ExportResult,
    ImportResult,
    export_checkpoint,
    import_checkpoint,
)
from artifactfs.core.restore import restore as restore_tree
from artifactfs.core.verify import VerifyReport, verify_tree
from artifactfs.errors import ArtifactFsError, Exists, InvalidName
from artifactfs.index.db import CheckpointRow

app = typer.Typer(
    name="checkpoint",
    help="Take, list, compare, restore, verify, export and import checkpoints of a namespace.",
    no_args_is_help=True,
    rich_markup_mode=MARKUP,
    epilog=examples(
        "artifactfs checkpoint create acme/user-alice/proj before-upgrade",
        "artifactfs checkpoint list acme/user-alice/proj --json",
        "artifactfs checkpoint restore acme/user-alice/proj before-upgrade --yes",
    ),
)

NsArg = Annotated[
    str,
    typer.Argument(
        metavar="NS",
        help="The namespace: grid path SANDBOX/SCOPE/NAME (acme/user-alice/proj) or its id.",
        show_default=False,
    ),
]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The checkpoint's name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for programs.")]

KIND_LETTER = {"added": "A", "removed": "D", "modified": "M", "type-changed": "T"}


class NotConfirmed(ArtifactFsError):
    """Not confirmed: nothing was changed."""


class VerifyFailed(ArtifactFsError):
    """The checkpoint failed verification."""

    exit_code = 4


# ---- --json results ----------------------------------------------------------------------------


class CheckpointItem(BaseModel):
    """One line of `checkpoint list --json`."""

    name: str
    created: datetime  # local time with its offset
    created_ns: int
    creator: str
    files: int
    bytes: int  # logical bytes the checkpoint captures
    manifest_bytes: int  # metadata it wrote when taken
    root: str  # hex digest of its root manifest


class PathChange(BaseModel):
    """One line of `checkpoint diff --json`."""

    path: str
    kind: Literal["added", "removed", "modified", "type-changed"]


class VerifyFinding(BaseModel):
    kind: str  # missing-manifest, corrupt-manifest, missing-block, corrupt-block, ...
    digest: str  # hex: the manifest, block or file content digest at fault
    paths: list[str]  # some affected paths, relative to the namespace root
    more: int  # affected paths beyond those listed
    detail: str


class VerifyResult(BaseModel):
    """`checkpoint verify --json`."""

    namespace: str
    checkpoint: str
    clean: bool
    manifests: int
    blocks: int
    block_bytes: int
    files: int
    findings: list[VerifyFinding]


def _item(r: CheckpointRow) -> CheckpointItem:
    return CheckpointItem(
        name=r.name,
        created=datetime.fromtimestamp(r.created_ns / 1e9).astimezone(),
        created_ns=r.created_ns,
        creator=r.creator,
        files=r.files,
        bytes=r.bytes,
        manifest_bytes=r.manifest_bytes,
        root=r.root.hex(),
    )


_ITEMS = TypeAdapter(list[CheckpointItem])
_CHANGES = TypeAdapter(list[PathChange])


# ---- commands ----------------------------------------------------------------------------------


@app.command(
    epilog=examples(
        "artifactfs checkpoint create acme/user-alice/proj before-upgrade",
        "artifactfs checkpoint create acme/shared/dataset v3 --store /var/lib/artifactfs/store",
    )
)
def create(ns: NsArg, name: NameArg, store: StoreOption = None) -> None:
    """Take a checkpoint of a namespace.

    Costs what changed since the previous checkpoint; a progress bar shows on a terminal.
    """

    async def go(s: Session) -> tuple[str, CheckpointRow]:
        row, where = s.namespace(ns)
        labels = {"scan": "finding changed directories", "encode": "encoding directories"}
        try:
            with phases(labels) as progress:
                return where, await s.cp.create(row, name, actor(), progress=progress)
        except Exists:
            raise Exists(
                f"checkpoint {name!r} of {where} already exists: choose another name, or "
                f"delete it first (artifactfs checkpoint delete {where} {name})"
            ) from None
        except InvalidName as exc:
            raise InvalidName(
                f"{exc.message}: a checkpoint name is 1-255 bytes of UTF-8 without '/'"
            ) from None

    where, row = run(store, go)
    typer.echo(
        f"created checkpoint {row.name} of {where}: {row.files} files, {human(row.bytes)} "
        f"({row.manifest_bytes} bytes of new metadata)"
    )


@app.command(
    "list",
    epilog=examples(
        "artifactfs checkpoint list acme/user-alice/proj",
        "artifactfs checkpoint list acme/user-alice/proj --json | jq -r '.[].name'",
    ),
)
def list_(ns: NsArg, as_json: JsonOption = False, store: StoreOption = None) -> None:
    """List the checkpoints of a namespace, oldest first: name, time, size, files.

    With --json: an array of objects (name, created, created_ns, creator, files, bytes,
    manifest_bytes, root).
    """

    async def go(s: Session) -> list[CheckpointRow]:
        row, _ = s.namespace(ns)
        return s.cp.list(row.id)

    rows = run(store, go)
    if as_json:
        typer.echo(_ITEMS.dump_json([_item(r) for r in rows], indent=2).decode())
        return
    if not rows:
        typer.echo("no checkpoints")
        return
    width = max(4, *(len(r.name) for r in rows))
    typer.echo(f"{'NAME':<{width}}  {'CREATED':<19}  {'SIZE':>10}  {'FILES':>8}")
    for r in rows:
        typer.echo(f"{r.name:<{width}}  {when(r.created_ns)}  {human(r.bytes):>10}  {r.files:>8}")


@app.command(
    epilog=examples(
        "artifactfs checkpoint diff acme/user-alice/proj before-upgrade",
        "artifactfs checkpoint diff acme/user-alice/proj v1 v2 --json",
    )
)
def diff(
    ns: NsArg,
    a: Annotated[str, typer.Argument(metavar="A", help="The checkpoint to compare from.")],
    b: Annotated[
        str | None,
        typer.Argument(metavar="[B]", help="The checkpoint to compare to (default: live state)."),
    ] = None,
    as_json: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """Compare checkpoint A with checkpoint B, or with the live namespace.

    Prints one line per path: A added, D removed, M modified, T type changed. With --json:
    an array of objects (path, kind: added, removed, modified or type-changed).
    """

    async def go(s: Session) -> list[PathChange]:
        row, where = s.namespace(ns)
        ra = s.checkpoint(row, where, a).root
        rb = None if b is None else s.checkpoint(row, where, b).root
        changes = await diff_trees(s.cp, row, ra, rb)
        return [PathChange(path=c.path, kind=c.kind) for c in changes]

    changes = run(store, go)
    if as_json:
        typer.echo(_CHANGES.dump_json(changes, indent=2).decode())
        return
    for c in changes:
        typer.echo(f"{KIND_LETTER[c.kind]} {c.path}")


@app.command(
    epilog=examples(
        "artifactfs checkpoint restore acme/user-alice/proj before-upgrade",
        "artifactfs checkpoint restore acme/user-alice/proj before-upgrade --yes",
    )
)
def restore(
    ns: NsArg,
    name: NameArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOption = None,
) -> None:
    """Make the live namespace exactly a checkpoint (asks first unless --yes).

    Contents, modes, owners, times, links and xattrs, in one transaction; running mounts
    show the restored state at once. A progress bar shows on a terminal.
    """

    async def go(s: Session) -> tuple[str, int, bool]:
        row, where = s.namespace(ns)
        cp_row = s.checkpoint(row, where, name)
        if not yes:
            if not sys.stdin.isatty():
                raise NotConfirmed(
                    f"restoring {where} to {name!r} replaces its live contents and there is "
                    "no terminal to ask: pass --yes to confirm"
                )
            changes = await diff_trees(s.cp, row, cp_row.root, None)
            if not changes:
                return where, 0, True
            prompt = (
                f"Restore {where} to checkpoint {name} of {when(cp_row.created_ns)}? "
                f"{len(changes)} paths differ and will be replaced"
            )
            ok = await trio.to_thread.run_sync(lambda: typer.confirm(prompt, default=False))
            if not ok:
                raise NotConfirmed("not confirmed: nothing was restored")
        labels = {"load": "reading manifests", "apply": "restoring directories"}
        with phases(labels) as progress:
            result = await restore_tree(
                s.cp, row, cp_row.root, actor=actor(), name=name, progress=progress
            )
        return where, result.changed, result.mounts_acked

    where, changed, acked = run(store, go)
    plural = "" if changed == 1 else "s"
    typer.echo(f"restored {where} to checkpoint {name}: {changed} change{plural}")
    if not acked:
        typer.echo(
            "warning: a running mount has not applied the restore yet; it will shortly",
            err=True,
        )


@app.command(
    epilog=examples(
        "artifactfs checkpoint delete acme/user-alice/proj before-upgrade",
        "artifactfs checkpoint delete acme/user-alice/proj before-upgrade && artifactfs gc",
    )
)
def delete(ns: NsArg, name: NameArg, store: StoreOption = None) -> None:
    """Delete a checkpoint (the live namespace is not touched).

    The blocks only it used are reclaimed by the next `artifactfs gc`.
    """

    async def go(s: Session) -> str:
        row, where = s.namespace(ns)
        s.checkpoint(row, where, name)
        await s.cp.delete(row, name, actor())
        return where

    where = run(store, go)
    typer.echo(f"deleted checkpoint {name} of {where}")


@app.command(
    epilog=examples(
        "artifactfs checkpoint verify acme/user-alice/proj before-upgrade",
        "artifactfs checkpoint verify acme/user-alice/proj before-upgrade --json",
    )
)
def verify(
    ns: NsArg, name: NameArg, as_json: JsonOption = False, store: StoreOption = None
) -> None:
    """Check a checkpoint end to end against its digests.

    Re-hashes every manifest and block and every file's content digest. Exits 0 when all
    is intact, 4 with the problems listed otherwise. With --json: one object (clean, counts,
    findings with their kind, digest and affected paths).
    """

    async def go(s: Session) -> tuple[str, VerifyReport]:
        row, where = s.namespace(ns)
        cp_row = s.checkpoint(row, where, name)
        labels = {"manifests": "reading manifests", "files": "verifying files"}
        with phases(labels, byte_phases={"files"}) as progress:
            return where, await verify_tree(s.io, cp_row.root, progress=progress)

    where, report = run(store, go)
    if as_json:
        typer.echo(_verify_result(where, name, report).model_dump_json(indent=2))
    elif report.clean:
        typer.echo(
            f"checkpoint {name} of {where} is intact: {report.manifests} manifests, "
            f"{report.blocks} blocks ({human(report.block_bytes)}), "
            f"{report.files} file contents verified"
        )
    else:
        for finding in report.findings:
            typer.echo(str(finding))
    if not report.clean:
        listed = "in the JSON" if as_json else "above"
        raise VerifyFailed(
            f"checkpoint {name} of {where} is damaged: {len(report.findings)} problem(s) "
            f"listed {listed}; restore the namespace from another checkpoint, or the blobs "
            "from a backup"
        )


@app.command(
    epilog=examples(
        "artifactfs checkpoint export acme/user-alice/proj before-upgrade proj.afsckpt",
        "artifactfs checkpoint export acme/shared/dataset v3 /backup/dataset-v3.afsckpt",
    )
)
def export(
    ns: NsArg,
    name: NameArg,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The file to write.")],
    store: StoreOption = None,
) -> None:
    """Write a checkpoint to one self-contained file, for import into another store.

    The file holds the checkpoint's record, manifests and blocks, each with its digest. A
    progress bar shows on a terminal.
    """

    async def go(s: Session) -> tuple[str, ExportResult]:
        row, where = s.namespace(ns)
        s.checkpoint(row, where, name)
        labels = {"manifests": "exporting manifests", "blocks": "exporting blocks"}
        with phases(labels, byte_phases={"blocks"}) as progress:
            result = await export_checkpoint(
                s.cp,
                row,
                name,
                file.expanduser().absolute(),
                actor=actor(),
                store_id=s.store.config.store_id,
                progress=progress,
            )
        return where, result

    where, result = run(store, go)
    typer.echo(
        f"exported checkpoint {name} of {where} to {file}: {result.manifests} manifests, "
        f"{result.blocks} blocks, {human(result.size)}"
    )


@app.command(
    "import",
    epilog=examples(
        "artifactfs checkpoint import proj.afsckpt acme/shared/proj-copy",
        "artifactfs checkpoint import /backup/dataset-v3.afsckpt acme/shared/dataset-v3 "
        "--store /var/lib/artifactfs/store",
    ),
)
def import_(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="An exported checkpoint.")],
    target: Annotated[
        str,
        typer.Argument(
            metavar="SANDBOX/SCOPE/NAME",
            help="The new namespace (its sandbox and scope are created if missing).",
        ),
    ],
    store: StoreOption = None,
) -> None:
    """Bring an exported checkpoint into this store as a new namespace.

    Every digest is checked before anything changes; then the checkpoint is recorded under
    its original name and the namespace made exactly its tree. A progress bar shows on a
    terminal.
    """
    where = parse_grid_path(target)
    path = file.expanduser().absolute()

    async def go(s: Session) -> ImportResult:
        labels = {
            "check": "checking the file",
            "store": "storing blocks",
            "load": "reading manifests",
            "apply": "restoring directories",
        }
        with phases(labels, byte_phases={"check", "store"}) as progress:
            return await import_checkpoint(
                s.fs, path, where, actor=actor(), caller=s.caller, progress=progress
            )

    result = run(store, go)
    typer.echo(
        f"imported checkpoint {result.checkpoint.name} as {where} "
        f"(id {result.namespace.public_id}): {result.checkpoint.files} files, "
        f"{human(result.checkpoint.bytes)}; {result.stored} new blobs"
    )


def _verify_result(where: str, name: str, report: VerifyReport) -> VerifyResult:
    return VerifyResult(
        namespace=where,
        checkpoint=name,
        clean=report.clean,
        manifests=report.manifests,
        blocks=report.blocks,
        block_bytes=report.block_bytes,
        files=report.files,
        findings=[
            VerifyFinding(
                kind=f.kind,
                digest=f.digest.hex(),
                paths=list(f.paths),
                more=f.more,
                detail=f.detail,
            )
            for f in report.findings
        ],
    )
