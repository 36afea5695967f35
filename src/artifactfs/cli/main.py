"""The `artifactfs` command: subcommands are registered here; errors become one line."""

from __future__ import annotations

import sys

import typer

from artifactfs.cli.checkpoint_cmd import app as checkpoint_app
from artifactfs.cli.common import MARKUP, examples
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
    rich_markup_mode=MARKUP,
    epilog=examples(
        "artifactfs init && artifactfs mount",
        "artifactfs checkpoint create acme/user-alice/proj before-upgrade",
        "artifactfs umount ~/grid",
    )
    + "\n\nExit codes: 0 ok, 1 failed (one line on stderr says why), 2 store missing or "
    "damaged, or a wrong command line, 3 mount failed, 4 verification failed or problems "
    "left, 5 credential refused.",
)
# Examples are registered with the commands (not in their docstrings) so that every command
# shows them the same way, after its options; tests/test_cli_polish.py checks each has some.
app.command(
    epilog=examples(
        "artifactfs init",
        "artifactfs init /var/lib/artifactfs/store --block-size 4194304",
        "artifactfs init /var/lib/artifactfs/store --backend s3 "
        "--endpoint https://s3.example.com --bucket artifacts --cache-size 20G",
        "artifactfs init /var/lib/artifactfs/store --restore-from-bucket "
        "--endpoint https://s3.example.com --bucket artifacts",
    )
)(init)
app.command(
    epilog=examples(
        "artifactfs mount",
        "artifactfs mount /var/lib/artifactfs/store /srv/grid -o allow_other",
        "artifactfs mount /var/lib/artifactfs/store /mnt/alice --credential alice.cred",
        "artifactfs mount /var/lib/artifactfs/store /srv/grid --foreground",
    )
)(mount)
app.command(
    epilog=examples(
        "artifactfs umount ~/grid",
        "artifactfs umount /srv/grid --timeout 600",
        "artifactfs umount /srv/grid --lazy",
    )
)(umount)
app.command(
    epilog=examples(
        "artifactfs sync --store /var/lib/artifactfs/store",
        "artifactfs sync --store /var/lib/artifactfs/store --timeout 600 --no-backup",
    )
)(sync)
app.command(
    epilog=examples(
        "artifactfs gc --dry-run",
        "artifactfs gc --grace 2h --store /var/lib/artifactfs/store",
    )
)(gc)
app.command(
    epilog=examples(
        "artifactfs fsck",
        "artifactfs fsck --verify",
        "artifactfs fsck --json | jq -r '.findings[].kind'",
        "artifactfs fsck --repair --store /var/lib/artifactfs/store",
    )
)(fsck)
app.command(
    epilog=examples(
        "artifactfs stats",
        "artifactfs stats --json | jq .dedup_ratio",
    )
)(stats)
app.command(
    epilog=examples(
        "artifactfs log --since 1h",
        "artifactfs log --type checkpoint. --sandbox acme --json",
        "artifactfs log --follow --type credential.",
    )
)(log)
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
