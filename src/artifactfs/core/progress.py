"""The progress callback every long-running core operation takes (gc, fsck, checkpoints,
restore, verify, export): progress(phase, advance, total), total None while unknown. It may
be called from a worker thread; cli/progress.py draws it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int | None], None]
