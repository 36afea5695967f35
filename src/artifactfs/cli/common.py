"""Option types and helpers shared by the subcommands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

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


def resolve_store(path: Path | None) -> Path:
    return (path or default_store_path()).expanduser().absolute()


def setup_logging(debug: bool = False, stream: object = None) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,  # type: ignore[arg-type]
    )
