"""artifactfs: a content-addressed artifact store presented as a mountable FUSE grid.

`artifactfs.open_store(path, credential=None)` opens a store from Python (see
`artifactfs.api` and docs/API.md).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_store"]


def __getattr__(name: str) -> Any:
    # Lazily: `import artifactfs` (the CLI) need not load the core and its event loops.
    if name == "open_store":
        from artifactfs.api import open_store

        return open_store
    raise AttributeError(name)
