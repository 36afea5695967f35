"""The one table from core errors to errnos."""

from __future__ import annotations

import errno

from artifactfs import errors as e

# Every FsError subclass has a row; tests assert the table is complete, so a new error class
# cannot silently become EIO.
ERRNO_OF: dict[type[e.FsError], int] = {
    e.FsError: errno.EIO,
    e.NotFound: errno.ENOENT,
    e.Exists: errno.EEXIST,
    e.NotEmpty: errno.ENOTEMPTY,
    e.NotADirectory: errno.ENOTDIR,
    e.IsADirectory: errno.EISDIR,
    e.ReadOnly: errno.EROFS,
    e.AccessDenied: errno.EACCES,
    e.NotPermitted: errno.EPERM,
    e.InvalidName: errno.EINVAL,
    e.InvalidArgument: errno.EINVAL,
    e.NameTooLong: errno.ENAMETOOLONG,
    e.CrossDevice: errno.EXDEV,
    e.NoSpace: errno.ENOSPC,
    e.NoData: errno.ENODATA,
    e.OutOfRange: errno.ERANGE,
    e.TooBig: errno.E2BIG,
    e.FileTooBig: errno.EFBIG,
    e.TooManyLinks: errno.EMLINK,
    e.NotSupported: errno.EOPNOTSUPP,
    e.BadHandle: errno.EBADF,
    e.Corrupt: errno.EIO,
    e.StorageError: errno.EIO,
}


def errno_for(exc: e.FsError) -> int:
    return ERRNO_OF.get(type(exc), errno.EIO)
