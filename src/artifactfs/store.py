"""A store on disk: its directory, config, index and blob backend, opened together.

Layout of a store directory (mode 0700, private to the account that runs the daemon):
    store.json        StoreConfig (format, store id, block size, backend)
    index.sqlite3     the metadata index (WAL mode; -wal and -shm beside it)
    blobs/sha256/...  the local blob backend
    logs/             daemon logs of background mounts
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field

from artifactfs.blobs.local import LocalBackend
from artifactfs.core.blockio import DEFAULT_BLOCK_SIZE
from artifactfs.core.nodes import ROOT_INODE, NodeKind
from artifactfs.errors import StoreError, StoreMissing
from artifactfs.index.db import Index

CONFIG_NAME = "store.json"
INDEX_NAME = "index.sqlite3"
STORE_FORMAT = 1


class StoreConfig(BaseModel):
    """store.json: written once by `init`."""

    format: int = STORE_FORMAT
    store_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    block_size: int = DEFAULT_BLOCK_SIZE
    backend: Literal["local"] = "local"
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


def default_store_path() -> Path:
    return platformdirs.user_data_path("artifactfs") / "store"


def is_store(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def init_store(path: Path, *, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[StoreConfig, bool]:
    """Create a store at `path` (idempotent). Returns (config, created)."""
    if is_store(path):
        return load_config(path), False
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} exists, is not empty and is not an artifactfs store")
    if block_size < 4096 or block_size & (block_size - 1):
        raise StoreError("block size must be a power of two of at least 4096")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    (path / "blobs").mkdir(mode=0o700, exist_ok=True)
    (path / "logs").mkdir(mode=0o700, exist_ok=True)
    config = StoreConfig(block_size=block_size)
    index = Index(path / INDEX_NAME, create=True)
    try:
        now = time.time_ns()
        with index.txn():
            index.set_meta("store_id", config.store_id)
            index.set_meta("block_size", str(block_size))
            index.insert_inode(
                ino=ROOT_INODE,
                kind=NodeKind.ROOT,
                mode=stat.S_IFDIR | 0o755,
                uid=os.getuid(),
                gid=os.getgid(),
                nlink=2,
                time_ns=now,
                namespace_id=None,
            )
            index.append_event(
                "store.init", {"store_id": config.store_id, "block_size": block_size}
            )
    finally:
        index.close()
    # The config is written last: its presence is what makes the directory a store.
    tmp = path / (CONFIG_NAME + ".tmp")
    tmp.write_text(config.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)
    return config, True


def load_config(path: Path) -> StoreConfig:
    try:
        return StoreConfig.model_validate_json((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise StoreMissing(
            f"no artifactfs store at {path}: run `artifactfs init {path}` first"
        ) from None
    except ValueError as exc:
        raise StoreError(f"{path / CONFIG_NAME} is damaged: {exc}") from None


class Store:
    """An open store: config, index and backend."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = load_config(path)
        if self.config.format > STORE_FORMAT:
            raise StoreError(f"{path} was made by a newer artifactfs; upgrade to use it")
        self.index = Index(path / INDEX_NAME)
        # Puts are atomic (temp + rename) but synced in batches: fsync of a file syncs the
        # blob store (one syncfs) before its index commit. See docs/ARCHITECTURE.md.
        self.backend = LocalBackend(path / "blobs", durable=False, max_open_files=1024)

    def check_private(self) -> None:
        """The store must be private to its owner: anyone who can read it bypasses the mount."""
        st = os.stat(self.path)
        if st.st_mode & 0o077:
            raise StoreError(
                f"{self.path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                f"run `chmod 700 {self.path}`"
            )

    def close(self) -> None:
        self.backend.close()
        self.index.close()
