"""`artifactfs init`: create a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from artifactfs.cli.common import StoreOption, resolve_store
from artifactfs.core.blockio import DEFAULT_BLOCK_SIZE
from artifactfs.store import init_store


def init(
    store_arg: Annotated[
        Path | None, typer.Argument(metavar="[STORE]", help="Where to create the store.")
    ] = None,
    store: StoreOption = None,
    block_size: Annotated[
        int, typer.Option(help="Block size in bytes (a power of two).")
    ] = DEFAULT_BLOCK_SIZE,
) -> None:
    """Create a store (idempotent).

    Example: artifactfs init /var/lib/artifactfs/store
    """
    path = resolve_store(store_arg or store)
    config, created = init_store(path, block_size=block_size)
    if created:
        typer.echo(f"created store {config.store_id} at {path}")
    else:
        typer.echo(f"store {config.store_id} already exists at {path}")
