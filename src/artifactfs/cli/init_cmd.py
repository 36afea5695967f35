"""`artifactfs init`: create a store (local, or with its blocks in an S3 bucket), or bring one
back from the index backup in its bucket."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from artifactfs.blobs.s3 import read_credentials_file
from artifactfs.cli.common import StoreOption, resolve_store
from artifactfs.core.blockio import DEFAULT_BLOCK_SIZE
from artifactfs.errors import StorageError, StoreError
from artifactfs.store import DEFAULT_CACHE_SIZE, S3Settings, init_store, restore_store

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class BackendKind(StrEnum):
    local = "local"
    s3 = "s3"


def parse_size(text: str) -> int:
    """'10G', '512M', '1048576' -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise StoreError(f"not a size: {text!r} (examples: 10G, 512M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def init(
    store_arg: Annotated[
        Path | None, typer.Argument(metavar="[STORE]", help="Where to create the store.")
    ] = None,
    store: StoreOption = None,
    block_size: Annotated[
        int, typer.Option(help="Block size in bytes (a power of two).")
    ] = DEFAULT_BLOCK_SIZE,
    backend: Annotated[
        BackendKind, typer.Option(help="Where blocks live: this disk, or an S3 bucket.")
    ] = BackendKind.local,
    endpoint: Annotated[
        str | None, typer.Option(help="S3 endpoint URL (omit for AWS S3).")
    ] = None,
    bucket: Annotated[str | None, typer.Option(help="S3 bucket (must exist).")] = None,
    prefix: Annotated[str, typer.Option(help="Key prefix inside the bucket.")] = "",
    region: Annotated[str | None, typer.Option(help="S3 region.")] = None,
    cache_size: Annotated[
        str, typer.Option(help="Local block cache budget for an S3 store (e.g. 10G).")
    ] = f"{DEFAULT_CACHE_SIZE >> 30}G",
    credentials_file: Annotated[
        Path | None,
        typer.Option(
            help="S3 keys (JSON or AWS INI) to copy into the store (mode 0600); default: "
            "the standard AWS sources (environment, ~/.aws, instance role)."
        ),
    ] = None,
    restore_from_bucket: Annotated[
        bool,
        typer.Option(
            "--restore-from-bucket",
            help="Bring back an S3 store as of its last index backup in the bucket.",
        ),
    ] = False,
) -> None:
    """Create a store (idempotent).

    Blocks live on this disk, or in an S3 bucket behind a bounded local cache; an S3 store
    can be brought back from the index backup in its bucket.
    """
    path = resolve_store(store_arg or store)
    if backend is BackendKind.local and not restore_from_bucket:
        if bucket or endpoint or credentials_file:
            raise StoreError("--endpoint, --bucket and --credentials-file need --backend s3")
        config, created = init_store(path, block_size=block_size)
    else:
        if not bucket:
            raise StoreError("an S3 store needs --bucket")
        creds = None
        if credentials_file is not None:
            try:
                creds = read_credentials_file(credentials_file)
            except StorageError as exc:
                raise StoreError(exc.message) from None
        s3 = S3Settings(
            endpoint=endpoint, bucket=bucket, prefix=prefix.strip("/"), region=region,
            cache_size=parse_size(cache_size),
        )  # fmt: skip
        if restore_from_bucket:
            config, report = restore_store(path, s3, creds)
            typer.echo(f"restored store {config.store_id} at {path} from {report.backup}")
            if report.lost:
                typer.echo(
                    f"warning: {report.lost} blocks were not uploaded before that backup: "
                    "files using them read as I/O errors",
                    err=True,
                )
            return
        config, created = init_store(path, block_size=block_size, s3=s3, credentials=creds)
    if created:
        where = f" (blocks in {config.s3.location().describe()})" if config.s3 else ""
        typer.echo(f"created store {config.store_id} at {path}{where}")
    else:
        typer.echo(f"store {config.store_id} already exists at {path}")
