"""pyfuse3 `Operations` over the core `FileSystem`: translation only.

Each handler turns pyfuse3 arguments into core calls and core results into pyfuse3 types.
`_translate` wraps every handler: core errors become their errno (errno_map), anything
unexpected is logged and becomes EIO, because pyfuse3 ends its main loop (a dead mount) on any
exception other than FUSEError.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from artifactfs.core.acl import ACL_ACCESS
from artifactfs.core.fs import FileSystem
from artifactfs.core.nodes import Attr, AttrChanges, Caller
from artifactfs.errors import FsError, NotFound
from artifactfs.fuse.errno_map import errno_for

log = logging.getLogger(__name__)

# readdir offsets 1 and 2 belong to "." and "..".
DOT_ENTRIES = 2

P = ParamSpec("P")
T = TypeVar("T")


def _translate(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except FsError as exc:
            code = errno_for(exc)
            if code == errno.EIO:
                log.error("%s failed: %s", name, exc)
            else:
                log.debug("%s: %s (%s)", name, exc, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("unexpected error in %s; answering EIO", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


class FuseOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        fs: FileSystem,
        *,
        entry_timeout: float = 5.0,
        attr_timeout: float = 5.0,
        owner: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.fs = fs
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        # `mount --owner UID:GID`: every node is shown as owned by UID:GID, so a container
        # running as that (arbitrary) uid gets owner permissions under default_permissions.
        # Only what stat shows changes; the index keeps the real owners.
        self.owner = owner

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        if self.fs.volatile(a.ino):
            # A checkpoint (or a listing of them) that another process may take or delete:
            # the kernel asks again each time instead of caching the name or the attributes.
            e.entry_timeout = e.attr_timeout = 0
        else:
            e.entry_timeout = self.entry_timeout
            e.attr_timeout = self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid, e.st_gid = self.owner if self.owner is not None else (a.uid, a.gid)
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 4096
        e.st_blocks = a.blocks_512
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        e.st_birthtime_ns = a.btime_ns
        return e

    # ---- tree ---------------------------------------------------------------------------------

    @_translate
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._entry(await self.fs.lookup(parent_inode, name, _caller(ctx)))
        except NotFound:
            if self.fs.volatile(parent_inode):
                # No negative entry in a listing of checkpoints: one taken by another process
                # (the CLI) must appear at once. (A checkpoint's own tree never changes.)
                raise
            # A negative entry (inode 0) lets the kernel cache "does not exist" for the entry
            # timeout; it drops it itself when a create or mkdir goes through this mount.
            # Python imports and shells probe many missing names.
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = self.entry_timeout
            return e

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # forget has no reply: pyfuse3 ends its main loop on ANY exception here, FUSEError
        # included, so everything is logged and swallowed.
        try:
            self.fs.forget(inode_list)
        except Exception:
            log.exception("forget of %d inodes failed", len(inode_list))

    @_translate
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(inode))

    @_translate
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ch = AttrChanges(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(await self.fs.setattr(inode, ch, _caller(ctx)))

    @_translate
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(inode)

    @_translate
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.mkdir(parent_inode, name, mode, _caller(ctx)))

    @_translate
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.mknod(parent_inode, name, mode, rdev, _caller(ctx)))

    @_translate
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.symlink(parent_inode, name, target, _caller(ctx)))

    @_translate
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.link(inode, new_parent_inode, new_name, _caller(ctx)))

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name, _caller(ctx))

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name, _caller(ctx))

    @_translate
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(
            parent_inode_old, name_old, parent_inode_new, name_new, flags, _caller(ctx)
        )

    # ---- files --------------------------------------------------------------------------------

    @_translate
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = await self.fs.open(inode, flags, _caller(ctx))
        # Contents change only through this mount, which keeps the page cache coherent
        # itself, so cached pages of an unchanged file stay valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_translate
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.fs.create(parent_inode, name, mode, flags, _caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(attr)

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_translate
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @_translate
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    # ---- directories --------------------------------------------------------------------------

    @_translate
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.fs.opendir(inode, _caller(ctx))

    @_translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets: 1 after ".", 2 after "..", then DOT_ENTRIES + the core's dentry offsets.
        if start_id < DOT_ENTRIES:
            this, parent = await self.fs.dot_attrs(fh)
            for offset, name, attr in ((1, b".", this), (2, b"..", parent)):
                # "." and ".." take no lookup reference (the kernel never forgets them).
                if offset > start_id and not pyfuse3.readdir_reply(
                    token, name, self._entry(attr), offset
                ):
                    return
        after = max(start_id - DOT_ENTRIES, 0)
        while True:
            entries = await self.fs.readdir(fh, after)
            if not entries:
                return
            for ent in entries:
                if not pyfuse3.readdir_reply(
                    token, ent.name, self._entry(ent.attr), ent.next_offset + DOT_ENTRIES
                ):
                    return
                # readdirplus hands the kernel a reference, as a lookup would.
                self.fs.remember(ent.attr.ino)
                after = ent.next_offset

    @_translate
    async def releasedir(self, fh: int) -> None:
        return None

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.make_durable()

    @_translate
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = await self.fs.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = s.block_size
        d.f_frsize = s.block_size
        d.f_blocks = s.total_blocks
        d.f_bfree = s.free_blocks
        d.f_bavail = s.avail_blocks
        d.f_files = s.total_inodes
        d.f_ffree = s.free_inodes
        d.f_favail = s.free_inodes
        d.f_namemax = s.name_max
        return d

    # ---- extended attributes ------------------------------------------------------------------

    @_translate
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.getxattr(inode, name)

    @_translate
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.setxattr(inode, name, value, _caller(ctx))
        if name == ACL_ACCESS:
            # The ACL changed the mode, and the kernel (without FUSE_POSIX_ACL) only marks
            # ctime stale after a setxattr: permission checks would use the old mode until
            # the attribute timeout. Attributes only, so no page lock: safe on this thread.
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError as exc:  # the change is made; only the kernel's copy lags
                log.warning("invalidating the attributes of inode %d: %s", inode, exc)

    @_translate
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return await self.fs.listxattr(inode)

    @_translate
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name, _caller(ctx))
