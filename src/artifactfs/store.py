"""A store on disk: its directory, config, index and blob backend, opened together.

Layout of a store directory (mode 0700, private to the account that runs the daemon):
    store.json        StoreConfig (format, store id, block size, backend and its settings)
    index.sqlite3     the metadata index (WAL mode; -wal and -shm beside it)
    index.sqlite3-redo/  each running daemon's redo log of closes not yet committed
                      (index/redo.py)
    blobs/sha256/...  the local blob backend (local stores)
    cache/sha256/...  the block cache of a remote (S3) store (blobs/cached.py)
    s3-credentials.json  optional, mode 0600: S3 keys (else the standard boto3 chain)
    logs/             daemon logs of background mounts

Keys are never written into store.json, logs or events: only into the 0600 credentials file.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field

from artifactfs.blobs.cached import CachedBackend
from artifactfs.blobs.journal import Journal, journal_dir
from artifactfs.blobs.local import LocalBackend
from artifactfs.blobs.s3 import (
    S3Backend,
    S3Credentials,
    S3Location,
    check_credentials_file_private,
    read_credentials_file,
    write_credentials_file,
)
from artifactfs.core.blockio import DEFAULT_BLOCK_SIZE
from artifactfs.core.nodes import ROOT_INODE, NodeKind
from artifactfs.core.uploads import fetch_latest_backup
from artifactfs.errors import NotFound, StorageError, StoreError, StoreMissing
from artifactfs.index.db import Index

CONFIG_NAME = "store.json"
INDEX_NAME = "index.sqlite3"
CREDENTIALS_NAME = "s3-credentials.json"
CACHE_DIR = "cache"
STORE_FORMAT = 1
DEFAULT_CACHE_SIZE = 10 << 30


class S3Settings(BaseModel):
    """Where a remote store's blocks live, and how its local cache behaves. No keys here."""

    endpoint: str | None = None
    bucket: str
    prefix: str = ""
    region: str | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    # Writes wait this long for uploads when the cache is full of blocks not yet uploaded,
    # then fail with ENOSPC; reads of blocks only in the bucket give up (EIO) after about
    # fetch_timeout seconds when the store does not answer.
    full_wait: float = 60.0
    fetch_timeout: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 20.0

    def location(self) -> S3Location:
        return S3Location(self.endpoint, self.bucket, self.prefix, self.region)


class StoreConfig(BaseModel):
    """store.json: written once by `init`."""

    format: int = STORE_FORMAT
    store_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    block_size: int = DEFAULT_BLOCK_SIZE
    backend: Literal["local", "s3"] = "local"
    s3: S3Settings | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


def default_store_path() -> Path:
    return platformdirs.user_data_path("artifactfs") / "store"


def is_store(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def init_store(
    path: Path,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    s3: S3Settings | None = None,
    credentials: S3Credentials | None = None,
) -> tuple[StoreConfig, bool]:
    """Create a store at `path` (idempotent). Returns (config, created).

    With `s3`, the store's blocks go to that bucket: it must exist and the credentials (given,
    or boto3's standard chain) must reach it, or a one-line `StoreError` says which is wrong.
    Given credentials are kept in a 0600 file in the store, never in store.json.
    """
    if is_store(path):
        return load_config(path), False
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path} exists, is not empty and is not an artifactfs store")
    if block_size < 4096 or block_size & (block_size - 1):
        raise StoreError("block size must be a power of two of at least 4096")
    if s3 is not None:
        check_bucket(s3, credentials)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    (path / "blobs").mkdir(mode=0o700, exist_ok=True)
    (path / "logs").mkdir(mode=0o700, exist_ok=True)
    if s3 is not None:
        (path / CACHE_DIR).mkdir(mode=0o700, exist_ok=True)
        if credentials is not None:
            write_credentials_file(path / CREDENTIALS_NAME, credentials)
    config = StoreConfig(block_size=block_size, backend="s3" if s3 else "local", s3=s3)
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
    write_config(path, config)
    return config, True


@dataclass
class RestoreReport:
    backup: str
    lost: int  # blocks not uploaded at backup time and gone: files using them read EIO


def restore_store(
    path: Path, s3: S3Settings, credentials: S3Credentials | None = None
) -> tuple[StoreConfig, RestoreReport]:
    """Create a store at `path` from the newest index backup in the bucket: every namespace,
    checkpoint and file as of that backup, with blocks read from the bucket. `path` must be
    new or empty."""
    if is_store(path) or (path.exists() and any(path.iterdir())):
        raise StoreError(f"{path} is not empty: restore into a new directory")
    check_bucket(s3, credentials)
    remote = S3Backend(s3.location(), credentials, connect_timeout=s3.connect_timeout,
                       read_timeout=s3.read_timeout, attempts=3)  # fmt: skip
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        for sub in ("blobs", "logs", CACHE_DIR):
            (path / sub).mkdir(mode=0o700, exist_ok=True)
        try:
            name = fetch_latest_backup(remote, path / INDEX_NAME)
        except NotFound as exc:
            raise StoreError(exc.message) from None
        index = Index(path / INDEX_NAME)
        try:
            lost = _settle_restored_queue(index, remote)
            store_id = index.get_meta("store_id") or uuid.uuid4().hex
            block_size = int(index.get_meta("block_size") or DEFAULT_BLOCK_SIZE)
            with index.txn():
                index.forget_host_state()
                index.append_event("store.restore", {"backup": name, "lost_blocks": lost})
        finally:
            index.close()
    finally:
        remote.close()
    if credentials is not None:
        write_credentials_file(path / CREDENTIALS_NAME, credentials)
    config = StoreConfig(store_id=store_id, block_size=block_size, backend="s3", s3=s3)
    write_config(path, config)
    return config, RestoreReport(name, lost)


def _settle_restored_queue(index: Index, remote: S3Backend) -> int:
    """Blocks queued at backup time: those the bucket has since received are marked uploaded;
    the rest (in the old machine's cache or journal, and never uploaded) are lost and marked
    uploaded so the queue can drain (fsck reports them). Returns how many are lost."""
    queue = [d for d, _ in index.upload_queue(1 << 62)]
    with ThreadPoolExecutor(8) as pool:
        present = dict(zip(queue, pool.map(remote.has, queue), strict=True))
    lost = [d for d in queue if not present[d]]
    with index.txn():
        index.mark_uploaded([d for d in queue if present[d]] + lost)
    return len(lost)


def write_config(path: Path, config: StoreConfig) -> None:
    # The config is written last: its presence is what makes the directory a store.
    tmp = path / (CONFIG_NAME + ".tmp")
    tmp.write_text(config.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)


# The bucket check of init and mount answers in a second or fails fast: a HEAD needs no long
# read timeout, and one retry is enough for a hiccup. Measured against a SIGSTOPped server:
# about 2 x read timeout; a refused connection fails at once.
CHECK_CONNECT_TIMEOUT = 3.0
CHECK_READ_TIMEOUT = 5.0


def check_bucket(s3: S3Settings, credentials: S3Credentials | None) -> None:
    """One-line `StoreError` unless the bucket exists and the credentials may use it."""
    remote = S3Backend(
        s3.location(),
        credentials,
        connect_timeout=min(s3.connect_timeout, CHECK_CONNECT_TIMEOUT),
        read_timeout=min(s3.read_timeout, CHECK_READ_TIMEOUT),
        attempts=1,  # botocore's retries after the first try
    )
    try:
        remote.check_bucket()
    except StorageError as exc:
        raise StoreError(exc.message) from None
    finally:
        remote.close()


def check_store_bucket(path: Path) -> None:
    """For an S3 store: one-line `StoreError` unless its bucket answers and its keys (the
    store's file or boto3's chain) may use it. A local store passes."""
    config = load_config(path)
    if config.backend == "s3" and config.s3 is not None:
        check_bucket(config.s3, store_credentials(path))


def store_credentials(path: Path) -> S3Credentials | None:
    """The store's own S3 keys (0600 file), or None for boto3's standard chain."""
    file = path / CREDENTIALS_NAME
    if not file.exists():
        return None
    try:
        check_credentials_file_private(file)
        return read_credentials_file(file)
    except StorageError as exc:
        raise StoreError(exc.message) from None


def open_remote(path: Path, s3: S3Settings) -> S3Backend:
    return S3Backend(
        s3.location(),
        store_credentials(path),
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        attempts=2,
    )


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
        self.backend: LocalBackend | CachedBackend
        s3 = self.config.s3
        if self.config.backend == "s3":
            if s3 is None:
                raise StoreError(f"{path / CONFIG_NAME} names the s3 backend without settings")
            # New blobs are recorded as not yet uploaded: the index is the upload queue.
            self.index.remote = True
            self.backend = CachedBackend(
                path / CACHE_DIR,
                open_remote(path, s3),
                budget=s3.cache_size,
                full_wait=s3.full_wait,
                fetch_timeout=s3.fetch_timeout,
            )
        else:
            # Puts are atomic (temp + rename) but synced in batches: fsync of a file syncs the
            # blob store (one syncfs) before its index commit. See docs/ARCHITECTURE.md.
            self.backend = LocalBackend(path / "blobs", durable=False, max_open_files=1024)
        self._journal: Journal | None = None

    @property
    def journal_dir(self) -> Path:
        return journal_dir(self.path)

    def open_journal(self) -> Journal:
        """This process's journal of small blocks (a daemon's or the API's), closed with the
        store: what it still holds then is adopted by the next daemon to start."""
        if self._journal is None:
            self._journal = Journal(self.journal_dir)
        return self._journal

    @property
    def remote(self) -> CachedBackend | None:
        """The cached S3 backend of a remote store, None for a local one."""
        return self.backend if isinstance(self.backend, CachedBackend) else None

    def check_private(self) -> None:
        """The store must be private to its owner: anyone who can read it bypasses the mount."""
        st = os.stat(self.path)
        if st.st_mode & 0o077:
            raise StoreError(
                f"{self.path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                f"run `chmod 700 {self.path}`"
            )

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self.backend.close()
        self.index.close()
