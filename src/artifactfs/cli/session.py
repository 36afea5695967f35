"""The store as the store-level commands open it (checkpoint, credential, ...): no mount,
no nursery, so nothing a running mount depends on is touched."""

from __future__ import annotations

import getpass
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import trio

from artifactfs.cli.common import resolve_store
from artifactfs.core.blockio import BlockIO
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.fs import FileSystem
from artifactfs.core.grid import find_namespace, grid_path_of
from artifactfs.core.nodes import Caller
from artifactfs.errors import NotFound, StoreMissing
from artifactfs.index.db import CheckpointRow, NamespaceRow
from artifactfs.store import Store, is_store
from artifactfs.units import human as human  # re-exported for the commands

T = TypeVar("T")


class Session:
    """An open store with the core objects a checkpoint command needs (no daemon, no nursery:
    FileSystem.start would reclaim unlinked inodes a running mount may still hold open)."""

    def __init__(self, store: Path | None) -> None:
        path = resolve_store(store)
        if not is_store(path):
            raise StoreMissing(
                f"no artifactfs store at {path}: pass --store, or run `artifactfs init {path}`"
            )
        self.store = Store(path)
        # Small blocks a mount has committed but not stored yet are read from its journal
        # (FileSystem sets that up).
        self.io = BlockIO(self.store.backend, block_size=self.store.config.block_size)
        self.fs = FileSystem(self.store.index, self.io)
        self.cp: Checkpoints = self.fs.checkpoints
        self.caller = Caller(uid=os.getuid(), gid=os.getgid())

    def namespace(self, ref: str) -> tuple[NamespaceRow, str]:
        ns = find_namespace(self.store.index, ref)
        return ns, grid_path_of(self.store.index, ns)

    def checkpoint(self, ns: NamespaceRow, where: str, name: str) -> CheckpointRow:
        try:
            return self.cp.get(ns.id, name)
        except NotFound:
            raise NotFound(
                f"no checkpoint {name!r} in {where}: see `artifactfs checkpoint list {where}`"
            ) from None

    def close(self) -> None:
        self.fs.forget(list(self.fs.lookups.items()))
        self.cp.close()
        self.store.close()


def run(store: Path | None, fn: Callable[[Session], Awaitable[T]]) -> T:
    session = Session(store)
    try:
        return trio.run(fn, session)
    finally:
        session.close()


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid {os.getuid()}"


def when(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")
