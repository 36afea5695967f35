"""The `artifactfs` command: subcommands are registered here; errors become one line."""

from __future__ import annotations

import sys

import typer

from artifactfs.cli.checkpoint_cmd import app as checkpoint_app
from artifactfs.cli.credential_cmd import app as credential_app
from artifactfs.cli.fsck_cmd import fsck
from artifactfs.cli.gc_cmd import gc
from artifactfs.cli.init_cmd import init
from artifactfs.cli.log_cmd import log
from artifactfs.cli.mount_cmd import mount
from artifactfs.cli.stats_cmd import stats
from artifactfs.cli.sync_cmd import sync
from artifactfs.cli.umount_cmd import umount
from artifactfs.errors import ArtifactFsError

app = typer.Typer(
    name="artifactfs",
    help="A content-addressed artifact store, mounted as a grid of workspaces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(init)
app.command()(mount)
app.command()(umount)
app.command()(sync)
app.command()(gc)
app.command()(fsck)
app.command()(stats)
app.command()(log)
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(credential_app, name="credential")


def main() -> None:
    try:
        app(standalone_mode=True)
    except ArtifactFsError as exc:
        print(f"artifactfs: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
