"""Sizes as people read them, for messages and logs at every layer."""

from __future__ import annotations


def human(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps it at 1 or more: 512 B, 1.5 MiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
