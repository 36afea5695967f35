"""The Python API: a store without a mount, for programs (trio or asyncio).

    async with await artifactfs.open_store("/var/lib/artifactfs/store") as store:
        await store.create_namespace("acme/user-alice/proj")
        await store.write_file("acme/user-alice/proj/src/main.py", b"print('hi')\\n")
        print(await store.read_file("acme/user-alice/proj/src/main.py"))
        await store.checkpoint_create("acme/user-alice/proj", "v1")

Paths are grid paths, as under a mountpoint: `sandbox/scope/namespace/...`. Opened with a
credential (`credential="alice.cred"`), the store shows and allows exactly what a mount with
that credential would: the same `FileSystem` core and the same policy serve both.

How it runs: the core is trio code, so the store runs it on its own trio loop in a background
thread, and every API call crosses to that loop (`trio.from_thread.run`) from a worker thread
of the caller's event loop (`anyio.to_thread`): the same calls work under trio and asyncio.
The store registers as a mount of the store and publishes its changes in the change feed, so
running mounts show what the API wrote within a second; what mounts write, the API reads at
once (it has no kernel cache). Every operation commits before it returns.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import trio
from pydantic import BaseModel

from artifactfs.core.blockio import BlockIO
from artifactfs.core.changefeed import follow_changes
from artifactfs.core.diff import diff as diff_trees
from artifactfs.core.fs import FileSystem
from artifactfs.core.nodes import ROOT_INODE, Attr, Caller
from artifactfs.core.policy import ADMIN
from artifactfs.core.restore import restore as restore_tree
from artifactfs.core.uploads import Uploader
from artifactfs.credentials import authenticate, read_credential_file
from artifactfs.errors import InvalidArgument, IsADirectory, NotADirectory, NotFound
from artifactfs.index.db import NamespaceRow
from artifactfs.store import Store

T = TypeVar("T")
CHUNK = 1 << 20


class StatResult(BaseModel):
    ino: int
    kind: Literal["directory", "file", "symlink", "special"]
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int


class CheckpointInfo(BaseModel):
    name: str
    created_ns: int
    creator: str
    files: int
    bytes: int
    root: str


class Change(BaseModel):
    path: str
    kind: Literal["added", "removed", "modified", "type-changed"]


def _parts(path: str) -> list[bytes]:
    parts = [os.fsencode(p) for p in path.strip("/").split("/") if p and p != "."]
    if any(p == b".." for p in parts):
        raise InvalidArgument(f"{path!r}: '..' is not allowed in an API path")
    return parts


def _stat(a: Attr) -> StatResult:
    kind: Literal["directory", "file", "symlink", "special"]
    if stat.S_ISDIR(a.mode):
        kind = "directory"
    elif stat.S_ISREG(a.mode):
        kind = "file"
    elif stat.S_ISLNK(a.mode):
        kind = "symlink"
    else:
        kind = "special"
    return StatResult(
        ino=a.ino, kind=kind, mode=a.mode, nlink=a.nlink, uid=a.uid, gid=a.gid, size=a.size,
        atime_ns=a.atime_ns, mtime_ns=a.mtime_ns, ctime_ns=a.ctime_ns, btime_ns=a.btime_ns,
    )


class _Engine:
    """Runs on the store's trio thread: the core and the operations the API offers."""

    def __init__(self, path: Path, credential: Path | None) -> None:
        self.store = Store(path)
        self.io = BlockIO(
            self.store.backend, self.store.config.block_size, journal=self.store.open_journal()
        )
        view = ADMIN
        if credential is not None:
            token = read_credential_file(credential)
            cred = authenticate(
                path, self.store.config.store_id, self.store.index, token
            )
            view = cred.view()
            self.credential_id: str | None = cred.id
        else:
            self.credential_id = None
        self.fs = FileSystem(self.store.index, self.io, view=view)
        self.caller = Caller(uid=os.getuid(), gid=os.getgid(), umask=0o022)
        self.mount_id = 0

    async def run(self, started: Callable[[trio.lowlevel.TrioToken], None]) -> None:
        index = self.store.index
        try:
            with index.txn():
                index.drop_dead_mounts()
                others = bool(index.mounts())
                seen = index.max_change_seq()
                mount_id = index.register_mount(
                    os.getpid(), f"api:{os.getpid()}", seen, self.credential_id
                )
            self.mount_id = mount_id
            index.publish_changes(mount_id)
            async with trio.open_nursery() as nursery:
                self.fs.start(nursery, reclaim_orphans=not others)
                # No kernel cache to drop: orphans are reclaimed and the feed acknowledged (a
                # restore waits until every registered mount has seen its changes).
                nursery.start_soon(follow_changes, index, self.fs, mount_id, seen)
                remote = self.store.remote
                uploader = Uploader(index, remote) if remote is not None else None
                if uploader is not None:
                    nursery.start_soon(uploader.run)
                self._stop = trio.Event()
                started(trio.lowlevel.current_trio_token())
                await self._stop.wait()
                await self.fs.shutdown()
                if uploader is not None:  # as a mount does at unmount
                    await uploader.drain(600.0)
                nursery.cancel_scope.cancel()
        finally:
            with index.txn():
                if self.mount_id:
                    index.unregister_mount(self.mount_id)
            self.store.close()

    async def stop(self) -> None:
        self._stop.set()

    # ---- paths ---------------------------------------------------------------------------------

    def _done(self) -> None:
        # The API holds no references between calls (as a kernel that forgets at once).
        self.fs.forget(list(self.fs.lookups.items()))

    async def resolve(self, path: str) -> int:
        ino = ROOT_INODE
        for name in _parts(path):
            a = await self.fs.lookup(ino, name, self.caller)
            if stat.S_ISLNK(a.mode):
                raise NotFound(f"{path}: the API does not follow symlinks")
            ino = a.ino
        return ino

    async def parent(self, path: str) -> tuple[int, bytes]:
        parts = _parts(path)
        if not parts:
            raise InvalidArgument("the grid root has no parent")
        parent = await self.resolve("/".join(os.fsdecode(p) for p in parts[:-1]))
        if not stat.S_ISDIR((await self.fs.getattr(parent)).mode):
            raise NotADirectory(f"{path}: a parent is not a directory")
        return parent, parts[-1]

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await fn(*args)
        finally:
            self._done()

    # ---- files -----------------------------------------------------------------------------

    async def parent_for_write(self, path: str) -> tuple[int, bytes]:
        """Like `parent`, making missing directories inside the namespace (not grid levels:
        sandboxes, scopes and namespaces are made on purpose)."""
        parts = _parts(path)
        if len(parts) <= 4:
            return await self.parent(path)
        ino = await self.resolve("/".join(os.fsdecode(p) for p in parts[:3]))
        for name in parts[3:-1]:
            try:
                ino = (await self.fs.lookup(ino, name, self.caller)).ino
            except NotFound:
                ino = (await self.fs.mkdir(ino, name, 0o755, self.caller)).ino
        return ino, parts[-1]

    async def open_for_write(self, path: str, append: bool = False) -> int:
        parent, name = await self.parent_for_write(path)
        try:
            ino = (await self.fs.lookup(parent, name, self.caller)).ino
        except NotFound:
            fh, _ = await self.fs.create(parent, name, 0o644, os.O_WRONLY, self.caller)
            return fh
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        return await self.fs.open(ino, flags, self.caller)

    async def write_chunk(self, fh: int, off: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            pos += await self.fs.write(fh, off + pos, data[pos : pos + CHUNK])

    async def close(self, fh: int) -> None:
        try:
            await self.fs.flush(fh)
        finally:
            await self.fs.release(fh)

    async def write_file(self, path: str, data: bytes) -> None:
        fh = await self.open_for_write(path)
        try:
            await self.write_chunk(fh, 0, data)
        finally:
            await self.close(fh)

    async def open_for_read(self, path: str) -> int:
        ino = await self.resolve(path)
        if stat.S_ISDIR((await self.fs.getattr(ino)).mode):
            raise IsADirectory(f"{path} is a directory")
        return await self.fs.open(ino, os.O_RDONLY, self.caller)

    async def read_chunk(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    async def read_file(self, path: str) -> bytes:
        fh = await self.open_for_read(path)
        try:
            out = bytearray()
            while piece := await self.fs.read(fh, len(out), CHUNK):
                out += piece
            return bytes(out)
        finally:
            await self.fs.release(fh)

    # ---- directories and namespaces ---------------------------------------------------------

    async def listdir(self, path: str) -> list[str]:
        ino = await self.resolve(path)
        if not stat.S_ISDIR((await self.fs.getattr(ino)).mode):
            raise NotADirectory(f"{path} is not a directory")
        names: list[str] = []
        after = 0
        while entries := await self.fs.readdir(ino, after):
            names.extend(os.fsdecode(e.name) for e in entries)
            after = entries[-1].next_offset
        return names

    async def stat(self, path: str) -> StatResult:
        return _stat(await self.fs.getattr(await self.resolve(path)))

    async def mkdir(self, path: str, mode: int) -> None:
        parent, name = await self.parent(path)
        await self.fs.mkdir(parent, name, mode, self.caller)

    async def makedirs(self, path: str) -> None:
        ino = ROOT_INODE
        for name in _parts(path):
            try:
                ino = (await self.fs.lookup(ino, name, self.caller)).ino
            except NotFound:
                ino = (await self.fs.mkdir(ino, name, 0o755, self.caller)).ino

    async def create_namespace(self, path: str, kind: str) -> str:
        parts = _parts(path)
        if len(parts) != 3:
            raise InvalidArgument(f"{path!r} is not a namespace path (sandbox/scope/name)")
        await self.makedirs("/".join(os.fsdecode(p) for p in parts[:2]))
        parent, name = await self.parent(path)
        if kind == "workspace":
            a = await self.fs.mkdir(parent, name, 0o755, self.caller)
        elif kind == "blob":
            a = await self.fs.mknod(parent, name, stat.S_IFREG | 0o644, 0, self.caller)
        else:
            raise InvalidArgument(f"namespace kind must be workspace or blob, not {kind!r}")
        ns = self.store.index.namespace_by_root(a.ino)
        assert ns is not None
        return ns.public_id

    async def remove(self, path: str, recursive: bool) -> None:
        parent, name = await self.parent(path)
        a = await self.fs.lookup(parent, name, self.caller)
        if not stat.S_ISDIR(a.mode):
            await self.fs.unlink(parent, name, self.caller)
            return
        if recursive:
            for child in await self.listdir(path):
                await self.remove(f"{path.rstrip('/')}/{child}", True)
        await self.fs.rmdir(parent, name, self.caller)

    async def rename(self, src: str, dst: str) -> None:
        sp, sn = await self.parent(src)
        dp, dn = await self.parent(dst)
        await self.fs.rename(sp, sn, dp, dn, 0, self.caller)

    # ---- metadata ----------------------------------------------------------------------------

    async def set_metadata(self, path: str, key: str, value: bytes) -> None:
        await self.fs.setxattr(await self.resolve(path), _xattr(key), value, self.caller)

    async def get_metadata(self, path: str, key: str) -> bytes:
        return await self.fs.getxattr(await self.resolve(path), _xattr(key))

    async def list_metadata(self, path: str) -> list[str]:
        names = await self.fs.listxattr(await self.resolve(path))
        return [os.fsdecode(n).removeprefix("user.") for n in names]

    async def remove_metadata(self, path: str, key: str) -> None:
        await self.fs.removexattr(await self.resolve(path), _xattr(key), self.caller)

    # ---- checkpoints -------------------------------------------------------------------------

    async def namespace(self, path: str, *, write: bool = False) -> NamespaceRow:
        ino = await self.resolve(path)
        ns = self.store.index.namespace_by_root(ino)
        if ns is None:
            raise InvalidArgument(f"{path} is not a namespace (sandbox/scope/name)")
        if write:
            self.fs.require_write(ino)
        return ns

    async def checkpoint_create(self, path: str, name: str) -> CheckpointInfo:
        ns = await self.namespace(path, write=True)
        row = await self.fs.checkpoint(ns, name, creator=self._actor())
        return _info(row)

    async def checkpoint_list(self, path: str) -> list[CheckpointInfo]:
        ns = await self.namespace(path)
        return [_info(r) for r in self.fs.checkpoints.list(ns.id)]

    async def checkpoint_delete(self, path: str, name: str) -> None:
        ns = await self.namespace(path, write=True)
        await self.fs.checkpoints.delete(ns, name, actor=self._actor())

    async def checkpoint_restore(self, path: str, name: str) -> int:
        ns = await self.namespace(path, write=True)
        row = self.fs.checkpoints.get(ns.id, name)
        result = await restore_tree(self.fs.checkpoints, ns, row.root, actor=self._actor(),
                                    name=name)
        return result.changed

    async def checkpoint_diff(self, path: str, a: str, b: str | None) -> list[Change]:
        ns = await self.namespace(path)
        cp = self.fs.checkpoints
        root_b = None if b is None else cp.get(ns.id, b).root
        changes = await diff_trees(cp, ns, cp.get(ns.id, a).root, root_b)
        return [Change(path=c.path, kind=c.kind) for c in changes]

    def _actor(self) -> str:
        return f"api:uid {os.getuid()}" if self.credential_id is None else (
            f"api:credential {self.credential_id}"
        )


def _xattr(key: str) -> bytes:
    return os.fsencode(key if key.startswith("user.") else f"user.{key}")


def _info(row: Any) -> CheckpointInfo:
    return CheckpointInfo(
        name=row.name, created_ns=row.created_ns, creator=row.creator, files=row.files,
        bytes=row.bytes, root=row.root.hex(),
    )


class ArtifactStore:
    """An open store; use as `async with await open_store(path) as store:`."""

    def __init__(self, engine: _Engine, thread: threading.Thread,
                 token: trio.lowlevel.TrioToken) -> None:
        self._engine = engine
        self._thread = thread
        self._token = token
        self._closed = False

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._closed:
            raise InvalidArgument("the store is closed")
        engine, token = self._engine, self._token

        def cross() -> T:
            return trio.from_thread.run(engine.call, fn, *args, trio_token=token)

        return await anyio.to_thread.run_sync(cross)

    async def __aenter__(self) -> ArtifactStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit everything and close the store (waits for background stores)."""
        if self._closed:
            return
        await self._run(self._engine.stop)
        self._closed = True
        await anyio.to_thread.run_sync(self._thread.join)

    # files
    async def write_file(self, path: str, data: bytes) -> None:
        """Create or replace the file at `path` with `data` (committed on return); missing
        directories inside the namespace are made."""
        await self._run(self._engine.write_file, path, bytes(data))

    async def read_file(self, path: str) -> bytes:
        return await self._run(self._engine.read_file, path)

    async def write_stream(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Create or replace `path` from an async iterable of chunks; returns bytes written."""
        fh = await self._run(self._engine.open_for_write, path)
        off = 0
        try:
            async for chunk in chunks:
                await self._run(self._engine.write_chunk, fh, off, bytes(chunk))
                off += len(chunk)
        finally:
            await self._run(self._engine.close, fh)
        return off

    async def read_stream(self, path: str, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """The content of `path`, chunk by chunk."""
        fh = await self._run(self._engine.open_for_read, path)
        off = 0
        try:
            while piece := await self._run(self._engine.read_chunk, fh, off, chunk_size):
                off += len(piece)
                yield piece
        finally:
            await self._run(self._engine.release, fh)

    # directories and namespaces
    async def listdir(self, path: str = "") -> list[str]:
        return await self._run(self._engine.listdir, path)

    async def stat(self, path: str) -> StatResult:
        return await self._run(self._engine.stat, path)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except (NotFound, NotADirectory):
            return False
        return True

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        await self._run(self._engine.mkdir, path, mode)

    async def makedirs(self, path: str) -> None:
        await self._run(self._engine.makedirs, path)

    async def create_namespace(self, path: str, kind: str = "workspace") -> str:
        """Create namespace `sandbox/scope/name` (sandbox and scope too if missing and
        allowed); returns its id."""
        return await self._run(self._engine.create_namespace, path, kind)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, an empty directory, or with `recursive` a whole tree (a namespace
        root removes the namespace)."""
        await self._run(self._engine.remove, path, recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self._run(self._engine.rename, src, dst)

    # metadata (user.* xattrs; `key` may omit the "user." prefix)
    async def set_metadata(self, path: str, key: str, value: bytes | str) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        await self._run(self._engine.set_metadata, path, key, raw)

    async def get_metadata(self, path: str, key: str) -> bytes:
        return await self._run(self._engine.get_metadata, path, key)

    async def list_metadata(self, path: str) -> list[str]:
        return await self._run(self._engine.list_metadata, path)

    async def remove_metadata(self, path: str, key: str) -> None:
        await self._run(self._engine.remove_metadata, path, key)

    # checkpoints
    async def checkpoint_create(self, namespace: str, name: str) -> CheckpointInfo:
        return await self._run(self._engine.checkpoint_create, namespace, name)

    async def checkpoint_list(self, namespace: str) -> list[CheckpointInfo]:
        return await self._run(self._engine.checkpoint_list, namespace)

    async def checkpoint_restore(self, namespace: str, name: str) -> int:
        """Make the namespace exactly checkpoint `name`; returns how many entries changed."""
        return await self._run(self._engine.checkpoint_restore, namespace, name)

    async def checkpoint_diff(
        self, namespace: str, a: str, b: str | None = None
    ) -> list[Change]:
        """Changes from checkpoint `a` to checkpoint `b` (default: the live namespace)."""
        return await self._run(self._engine.checkpoint_diff, namespace, a, b)

    async def checkpoint_delete(self, namespace: str, name: str) -> None:
        await self._run(self._engine.checkpoint_delete, namespace, name)


async def open_store(
    path: str | os.PathLike[str], credential: str | os.PathLike[str] | None = None
) -> ArtifactStore:
    """Open the store at `path` (administrative view, or what `credential` allows)."""
    store_path = Path(path).expanduser().absolute()
    cred_path = None if credential is None else Path(credential)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def started(token: trio.lowlevel.TrioToken) -> None:
        box["token"] = token
        ready.set()

    def main() -> None:
        try:
            engine = _Engine(store_path, cred_path)
            box["engine"] = engine
            trio.run(engine.run, started)
        except BaseException as exc:  # reported to the opener
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, name=f"artifactfs-api {store_path}", daemon=True)
    thread.start()
    await anyio.to_thread.run_sync(ready.wait)
    if "error" in box:
        thread.join()
        raise box["error"]
    return ArtifactStore(box["engine"], thread, box["token"])
