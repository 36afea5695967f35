"""The terminal progress display every long-running command shares (gc, fsck, checkpoint
create, restore, verify, export and import).

The core reports progress as `progress(phase, advance, total)` (`core.gc.Progress`): one call
per step of work, `total` None while unknown. `phases` turns that into one transient rich line
per phase on stderr, and into nothing at all when stderr is not a terminal, so pipes, logs
and `--json` output never see it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from artifactfs.core.progress import Progress

if TYPE_CHECKING:
    from rich.progress import Task
    from rich.text import Text


@contextlib.contextmanager
def phases(
    labels: dict[str, str], *, byte_phases: Collection[str] = ()
) -> Iterator[Progress | None]:
    """A transient progress display on stderr when it is a terminal (None otherwise): one
    line per phase, a bar when the phase's total is known, a count otherwise. Phases in
    `byte_phases` count bytes and show as sizes (12.5/40.0 MB)."""
    if not sys.stderr.isatty():
        yield None
        return
    # Imported here: rich costs ~50 ms and most runs (pipes, tests, cron) never draw a bar.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
    )
    from rich.progress import Progress as Bar

    class Amount(ProgressColumn):
        """Bytes as sizes, everything else as done/total."""

        def __init__(self) -> None:
            super().__init__()
            self.nbytes = DownloadColumn()
            self.count = MofNCompleteColumn()

        def render(self, task: Task) -> Text:
            column = self.nbytes if task.fields.get("nbytes") else self.count
            return column.render(task)

    with Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        Amount(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, object] = {}

        def advance(phase: str, n: int, total: int | None) -> None:
            task = tasks.get(phase)
            if task is None:
                task = tasks[phase] = bar.add_task(
                    labels.get(phase, phase), total=total, nbytes=phase in byte_phases
                )
            bar.update(task, advance=n, total=total)  # type: ignore[arg-type]

        yield advance
