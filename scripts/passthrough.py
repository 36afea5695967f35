#!/usr/bin/env python3
"""A bare pyfuse3 + trio passthrough of a local directory: the "FUSE floor" for benchmarks.

scripts/bench.py compares artifactfs against this file system, so it uses the cache settings
artifactfs uses (entry and attribute timeouts 5 s, keep_cache on open, no writeback cache, mount
read-ahead 1 MiB) and does nothing else: no policy, no content addressing, one syscall (or so) per
request. It must stay small enough to read in one sitting and correct enough that a benchmark
never measures a crash.

Usage:
    python scripts/passthrough.py SOURCE MOUNTPOINT [--attr-timeout 5] [--entry-timeout 5]
        [--writeback-cache] [--threads] [-o allow_other]

Runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) and then exits 0.

Inodes: the FUSE inode number is the backing file's st_ino (the source root and inode 1 swap
places), and the daemon keeps inode -> set of backing paths (several with hard links), counted by
the kernel's lookup count and dropped at ``forget``. Renaming a directory rewrites the paths of
the known inodes below it.

Caveats (it is a benchmark reference, not a product):
 * SOURCE must be one file system: a mount point inside it could reuse inode numbers.
 * Changes made to SOURCE behind the daemon's back are seen only after the cache timeouts, and a
   rename done behind its back leaves stale paths (ENOENT) until the kernel forgets them.
 * Generation numbers are 0: an inode number reused by the backing file system while the kernel
   still holds the old inode is treated as the same file.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import pyfuse3
import trio

log = logging.getLogger("passthrough")

P = ParamSpec("P")
T = TypeVar("T")

_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
# Only used for rename flags (RENAME_NOREPLACE/RENAME_EXCHANGE); os.rename has no flags.
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def tune_read_ahead(mountpoint: str, kb: int = 1024) -> bool:
    """Set the read-ahead of the FUSE mount at *mountpoint* to *kb* KiB; return True on success.

    With the default (128 KiB here) the kernel sends 256 KiB reads at most; 1024 gives 1 MiB reads
    and lifted cold sequential reads from ~690 to ~960 MB/s (FIELD-NOTES).

    Call it only once the daemon is serving requests, from a worker thread (e.g.
    ``trio.to_thread.run_sync``) or another process, never from the FUSE loop's own thread:
    ``os.stat(mountpoint)`` waits for the daemon to answer INIT and GETATTR. Setting it earlier
    would not stick anyway: when the kernel processes the INIT reply it lowers the bdi read-ahead
    to the max_readahead it proposed at mount time.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(f"{kb}\n")
        with open(path) as f:
            return int(f.read()) == kb
    except (OSError, ValueError) as exc:
        log.warning("could not set read_ahead_kb=%d for %s: %s", kb, mountpoint, exc)
        return False


def _fuse_errors(
    fn: Callable[Concatenate[Passthrough, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Passthrough, P], Coroutine[Any, Any, T]]:
    """Turn OSError into FUSEError(errno) and anything else unexpected into a logged EIO.

    pyfuse3 ends its main loop on any exception other than FUSEError, which would leave a dead
    mount, so every handler goes through this.
    """

    @functools.wraps(fn)
    async def wrapper(self: Passthrough, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            if exc.errno is None:
                log.exception("%s: OSError without errno", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast("Callable[Concatenate[Passthrough, P], Coroutine[Any, Any, T]]", wrapper)


@dataclass(frozen=True)
class Settings:
    entry_timeout: float = 5.0
    attr_timeout: float = 5.0
    negative_timeout: float = 0.0
    writeback_cache: bool = False
    threads: bool = False
    read_ahead_kb: int = 1024

    def describe(self) -> str:
        io = ("worker threads (trio.to_thread, its default limiter of 40)" if self.threads
              else "inline on the trio thread")
        return (f"entry_timeout={self.entry_timeout}s attr_timeout={self.attr_timeout}s "
                f"negative_timeout={self.negative_timeout}s keep_cache=on "
                f"writeback_cache={'on' if self.writeback_cache else 'off'} "
                f"read_ahead_kb={self.read_ahead_kb} disk I/O: {io}")


class Passthrough(pyfuse3.Operations):
    # No EXPORT_SUPPORT: the kernel then never looks up "." or "..".
    supports_dot_lookup = False

    def __init__(self, source: str, settings: Settings) -> None:
        super().__init__()
        self.enable_writeback_cache = settings.writeback_cache
        self._settings = settings
        self._source = os.fsencode(os.path.abspath(source))
        self._root_ino = os.lstat(self._source).st_ino
        # inode -> backing paths (more than one with hard links; empty once all are unlinked
        # while the kernel still holds the inode) and the kernel's lookup count for it.
        self._paths: dict[int, set[bytes]] = {pyfuse3.ROOT_INODE: {self._source}}
        self._lookups: dict[int, int] = {}
        # Open files: FUSE fh is the backing fd; one fd per open() so access modes never mix.
        self._fd_inode: dict[int, int] = {}
        self._inode_fds: dict[int, set[int]] = {}
        # Open directories: fh -> (inode, snapshot of names taken at offset 0).
        self._dirs: dict[int, tuple[int, list[bytes]]] = {}
        self._next_dir_fh = 1
        self._is_root = os.geteuid() == 0

    # -- helpers ---------------------------------------------------------------------------

    def _ino(self, st_ino: int) -> int:
        if st_ino == self._root_ino:
            return pyfuse3.ROOT_INODE
        if st_ino == pyfuse3.ROOT_INODE:
            return self._root_ino
        return st_ino

    def _path(self, inode: int) -> bytes:
        paths = self._paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _attr(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self._ino(st.st_ino)
        attr.generation = 0
        attr.entry_timeout = self._settings.entry_timeout
        attr.attr_timeout = self._settings.attr_timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _remember(self, inode: int, path: bytes) -> None:
        """Record a reply that made the kernel count one more lookup of *inode*."""
        self._paths.setdefault(inode, set()).add(path)
        if inode != pyfuse3.ROOT_INODE:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def _drop_path(self, inode: int, path: bytes) -> None:
        paths = self._paths.get(inode)
        if paths is not None:
            paths.discard(path)

    def _move(self, inode: int, old: bytes, new: bytes, is_dir: bool) -> None:
        paths = self._paths.get(inode)
        if paths is not None and old in paths:
            paths.discard(old)
            paths.add(new)
        if not is_dir:
            return
        # Every known inode below the directory moved too: O(known inodes), but directory
        # renames are rare next to file renames (git's lock files, editors' save-as-rename).
        prefix = old + b"/"
        for other in self._paths.values():
            stale = [p for p in other if p.startswith(prefix)]
            for p in stale:
                other.discard(p)
                other.add(new + p[len(old):])

    def _own(self, path: bytes, ctx: pyfuse3.RequestContext, fd: int | None = None) -> None:
        """Give a new node to the requesting user (only possible, and needed, when run as root)."""
        if not self._is_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        # A setgid parent directory decides the group, as on a local file system.
        parent_mode = os.lstat(os.path.dirname(path)).st_mode
        gid = -1 if parent_mode & stat.S_ISGID else ctx.gid
        if fd is not None:
            os.fchown(fd, ctx.uid, gid)
        else:
            os.chown(path, ctx.uid, gid, follow_symlinks=False)

    def _open_flags(self, flags: int) -> int:
        # O_DIRECT: the kernel already bypasses its page cache for this descriptor; on the backing
        # file it would demand aligned buffers that FUSE does not guarantee (EINVAL on write).
        flags &= ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL)
        if self._settings.writeback_cache:
            # With writeback caching the kernel reads pages of write-only files and handles
            # O_APPEND itself (libfuse passthrough_ll does the same).
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def _track_fd(self, inode: int, fd: int) -> None:
        self._fd_inode[fd] = inode
        self._inode_fds.setdefault(inode, set()).add(fd)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        if self._settings.threads:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    # -- metadata --------------------------------------------------------------------------

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if self._settings.negative_timeout <= 0:
                raise
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # a cached negative entry
            negative.entry_timeout = self._settings.negative_timeout
            return negative
        attr = self._attr(st)
        self._remember(attr.st_ino, path)
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # No reply goes back for forget, and pyfuse3 awaits it in its loop: even a FUSEError
        # here would end the loop, so nothing may escape.
        try:
            for inode, nlookup in inode_list:
                left = self._lookups.get(inode, 0) - nlookup
                if left > 0:
                    self._lookups[inode] = left
                    continue
                self._lookups.pop(inode, None)
                if inode != pyfuse3.ROOT_INODE and inode not in self._inode_fds:
                    self._paths.pop(inode, None)
        except Exception:
            log.exception("forget failed")

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fds = self._inode_fds.get(inode)
        if fds:  # also right for an open file whose last name was unlinked
            return self._attr(os.fstat(next(iter(fds))))
        return self._attr(os.lstat(self._path(inode)))

    @_fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # With a handle (ftruncate, fchmod, futimens...) work on the descriptor: the file may
        # have no name left.
        target: int | bytes = fh if fh is not None else self._path(inode)
        by_path = fh is None

        def current() -> os.stat_result:
            return os.lstat(target) if isinstance(target, bytes) else os.fstat(target)

        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if by_path:
                os.chown(target, uid, gid, follow_symlinks=False)
            else:
                os.chown(target, uid, gid)
        if fields.update_atime or fields.update_mtime:
            if not (fields.update_atime and fields.update_mtime):
                old = current()
                if not fields.update_atime:
                    attr.st_atime_ns = old.st_atime_ns
                else:
                    attr.st_mtime_ns = old.st_mtime_ns
            times = (attr.st_atime_ns, attr.st_mtime_ns)
            if by_path:
                os.utime(target, ns=times, follow_symlinks=False)
            else:
                os.utime(target, ns=times)
        return self._attr(current())

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self._path(inode))

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mknod(path, mode, rdev)
        self._own(path, ctx)
        attr = self._attr(os.lstat(path))
        self._remember(attr.st_ino, path)
        return attr

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)  # the kernel already applied the caller's umask; ours is 0
        self._own(path, ctx)
        attr = self._attr(os.lstat(path))
        self._remember(attr.st_ino, path)
        return attr

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        self._own(path, ctx)
        attr = self._attr(os.lstat(path))
        self._remember(attr.st_ino, path)
        return attr

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        attr = self._attr(os.lstat(path))
        self._remember(attr.st_ino, path)
        return attr

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        inode = self._ino(os.lstat(path).st_ino)
        os.unlink(path)
        self._drop_path(inode, path)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        inode = self._ino(os.lstat(path).st_ino)
        os.rmdir(path)
        self._drop_path(inode, path)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        st_old = os.lstat(old)
        inode_old, dir_old = self._ino(st_old.st_ino), stat.S_ISDIR(st_old.st_mode)
        try:
            st_new = os.lstat(new)
        except FileNotFoundError:
            inode_new: int | None = None
            dir_new = False
        else:
            inode_new, dir_new = self._ino(st_new.st_ino), stat.S_ISDIR(st_new.st_mode)
        if flags == 0:
            os.rename(old, new)
        elif _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if inode_new == inode_old:
            return  # two names of one inode: rename(2) does nothing
        if flags & pyfuse3.RENAME_EXCHANGE and inode_new is not None:
            swap = b"\0swap"  # cannot occur in a real path
            self._move(inode_old, old, swap, dir_old)
            self._move(inode_new, new, old, dir_new)
            self._move(inode_old, swap, new, dir_old)
            return
        if inode_new is not None:
            self._drop_path(inode_new, new)
        self._move(inode_old, old, new, dir_old)

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self._source)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = st.f_namemax
        return out

    # -- directories -----------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._path(inode)  # ENOENT now rather than at readdir
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = (inode, [])
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, names = self._dirs[fh]
        path = self._path(inode)
        if start_id == 0 or not names:
            # Offsets index this snapshot, so one listing never repeats or skips a name even if
            # the directory changes between readdir calls (rewinddir takes a new snapshot).
            names = [e.name for e in os.scandir(path)]
            self._dirs[fh] = (inode, names)
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed since the snapshot
            attr = self._attr(st)
            if not pyfuse3.readdir_reply(token, names[i], attr, i + 1):
                break
            # readdirplus: the kernel counts a lookup for every entry it accepted.
            self._remember(attr.st_ino, child)

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(self._dirs[fh][0]), os.O_RDONLY | os.O_DIRECTORY)
        try:
            await self._io(os.fsync, fd)
        finally:
            os.close(fd)

    # -- files -----------------------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = os.open(self._path(inode), self._open_flags(flags))
        self._track_fd(inode, fd)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = os.open(path, self._open_flags(flags) | os.O_CREAT | (flags & os.O_EXCL), mode)
        try:
            self._own(path, ctx, fd)
            attr = self._attr(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        self._remember(attr.st_ino, path)
        self._track_fd(attr.st_ino, fd)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), attr

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._io(os.pread, fh, size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._io(os.pwrite, fh, buf, off)

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        # close() of the caller's descriptor: close a duplicate so a backing file system that
        # reports errors at close (NFS) can report them here, as libfuse's passthrough does.
        os.close(os.dup(fh))

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._io(os.fdatasync if datasync else os.fsync, fh)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        inode = self._fd_inode.pop(fh, None)
        if inode is not None:
            fds = self._inode_fds.get(inode)
            if fds is not None:
                fds.discard(fh)
                if not fds:
                    del self._inode_fds[inode]
                    if inode not in self._lookups and inode != pyfuse3.ROOT_INODE:
                        self._paths.pop(inode, None)  # forgotten while open
        os.close(fh)

    # -- extended attributes ---------------------------------------------------------------

    @_fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return os.getxattr(self._path(inode), name, follow_symlinks=False)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = os.listxattr(self._path(inode), follow_symlinks=False)
        return [os.fsencode(n) for n in names]

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self._path(inode), name, follow_symlinks=False)


async def _serve(mountpoint: str, settings: Settings) -> None:
    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("got %s, unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def tune() -> None:
        if settings.read_ahead_kb > 0:
            ok = await trio.to_thread.run_sync(tune_read_ahead, mountpoint,
                                               settings.read_ahead_kb)
            log.info("read_ahead_kb=%d %s", settings.read_ahead_kb, "set" if ok else "NOT set")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        nursery.start_soon(tune)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("source", help="directory to mirror")
    p.add_argument("mountpoint")
    p.add_argument("--entry-timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--attr-timeout", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--negative-timeout", type=float, default=0.0,
                   help="seconds to cache 'no such entry' (default 0: not cached)")
    p.add_argument("--writeback-cache", action="store_true", help="enable the writeback cache")
    p.add_argument("--threads", action="store_true",
                   help="do pread/pwrite/fsync in worker threads instead of inline")
    p.add_argument("--read-ahead-kb", type=int, default=1024,
                   help="mount read-ahead to set once mounted (0: leave the kernel default)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="FUSE mount options, comma separated (e.g. allow_other)")
    p.add_argument("--debug", action="store_true", help="debug logging (and FUSE debug)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="passthrough: %(levelname)s %(message)s", stream=sys.stderr)
    if not os.path.isdir(args.source):
        log.error("source %s is not a directory", args.source)
        return 2
    settings = Settings(entry_timeout=args.entry_timeout, attr_timeout=args.attr_timeout,
                        negative_timeout=args.negative_timeout,
                        writeback_cache=args.writeback_cache, threads=args.threads,
                        read_ahead_kb=args.read_ahead_kb)
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"}
    for opt in args.options:
        options.update(o for o in opt.split(",") if o)
    if args.debug:
        options.add("debug")
    # Modes in requests already carry the caller's umask; ours must not mask them again.
    os.umask(0)
    ops = Passthrough(args.source, settings)
    print(f"passthrough: {args.source} on {args.mountpoint}: {settings.describe()} "
          f"options={','.join(sorted(options))}", file=sys.stderr, flush=True)
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(_serve, args.mountpoint, settings)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    # After `fusermount3 -u` the session is gone and close() finds nothing to unmount; after a
    # signal it unmounts.
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
