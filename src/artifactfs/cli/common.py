"""Option types and helpers shared by the subcommands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Final

import typer

from artifactfs.store import default_store_path

StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help=f"Store directory (default: the user's data directory, {default_store_path()}).",
        show_default=False,
    ),
]


# Help texts are rendered by rich: it keeps line breaks (click's plain formatter would rewrap
# example lines into one paragraph).
MARKUP: Final = "rich"


def examples(*lines: str) -> str:
    """An `epilog=` listing example invocations, one per line.

    The leading newline keeps the indentation: typer dedents help text with
    `inspect.cleandoc`, which strips the first line and the indent the others share."""
    # A backslash keeps rich from reading "[...]" as markup.
    return "\nExamples:\n" + "\n".join("  " + line.replace("[", "\\[") for line in lines)


def resolve_store(path: Path | None) -> Path:
    return (path or default_store_path()).expanduser().absolute()


def setup_logging(debug: bool = False, stream: object = None) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,  # type: ignore[arg-type]
    )
