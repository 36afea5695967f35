"""`artifactfs sync`: wait until every block of an S3 store is in its bucket, then back the
index up there.

When a mount of the store is running, its uploader does the work and this command watches the
queue; when none is, this command uploads itself (the same `Uploader` as a mount).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated

import trio
import typer

from artifactfs.cli.common import StoreOption, resolve_store
from artifactfs.core.uploads import Uploader, backup_index, wait_for_queue
from artifactfs.errors import ArtifactFsError, StorageError
from artifactfs.store import Store

log = logging.getLogger(__name__)


class SyncIncomplete(ArtifactFsError):
    """Some blocks are not in the bucket yet."""

    exit_code = 4


def sync(
    store: StoreOption = None,
    timeout: Annotated[
        float, typer.Option(help="Give up after this many seconds (exit status 4).")
    ] = 3600.0,
    backup: Annotated[
        bool, typer.Option(help="Back the index up to the bucket once the queue is empty.")
    ] = True,
) -> None:
    """Upload every block of an S3 store not yet in its bucket, and back up the index.

    Waits for a running mount's uploader, or uploads itself when no mount runs. Exits 4 if
    blocks are still waiting when the timeout ends.
    """
    logging.basicConfig(level=logging.WARNING, format="artifactfs: %(message)s")
    path = resolve_store(store)
    st = Store(path)
    try:
        if st.remote is None:
            typer.echo("local store: nothing to upload")
            return
        trio.run(_sync, st, timeout, backup)
    finally:
        st.close()


async def _sync(st: Store, timeout: float, backup: bool) -> None:
    backend = st.remote
    assert backend is not None
    total, total_bytes = st.index.upload_queue_stats()
    with _progress(total, total_bytes) as show:
        if st.index.live_mount_pids():
            done = await wait_for_queue(st.index, timeout, show)
        else:
            async with trio.open_nursery() as nursery:
                up = Uploader(st.index, backend, backup_interval=None)
                nursery.start_soon(up.run)
                nursery.start_soon(_watch, st, show)
                done = await up.drain(timeout)
                nursery.cancel_scope.cancel()
    left, left_bytes = st.index.upload_queue_stats()
    if not done or left:
        raise SyncIncomplete(
            f"{left} blocks ({left_bytes} bytes) are not in the bucket after {timeout:.0f} s; "
            "they stay in the local cache and upload later"
        )
    typer.echo(f"all blocks are in {backend.remote.location.describe()}")
    if backup:
        try:
            name = await backup_index(st.index, backend.remote)
        except StorageError as exc:
            raise SyncIncomplete(f"index backup failed: {exc.message}") from None
        typer.echo(f"index backed up as {backend.remote.index_key(name)}")


async def _watch(st: Store, show: Callable[[int, int], None]) -> None:
    while True:
        show(*st.index.upload_queue_stats())
        await trio.sleep(0.25)


class _progress:
    """A progress bar of bytes uploaded on a terminal; silent otherwise."""

    def __init__(self, total: int, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.bar = None
        if sys.stderr.isatty() and total:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("uploading {task.fields[blocks]} blocks"), BarColumn(),
                DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("sync", total=total_bytes, blocks=total)

    def __enter__(self) -> Callable[[int, int], None]:
        if self.bar is not None:
            self.bar.start()
        return self.show

    def show(self, left: int, left_bytes: int) -> None:
        if self.bar is not None:
            done = max(0, self.total_bytes - left_bytes)
            self.bar.update(self.task, completed=done, blocks=left)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
