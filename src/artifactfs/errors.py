"""The one exception hierarchy of the core.

Every error the core raises is an `FsError` subclass. The class says what went wrong; the
FUSE adapter's errno table (`artifactfs.fuse.errno_map`) and the CLI turn it into an errno or a
one-line message. The docstring of each class is its default message.
"""

from __future__ import annotations


class ArtifactFsError(Exception):
    """artifactfs failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class FsError(ArtifactFsError):
    """A filesystem operation failed."""


class NotFound(FsError):
    """No such file or directory."""


class Exists(FsError):
    """File exists."""


class NotEmpty(FsError):
    """Directory not empty."""


class NotADirectory(FsError):
    """Not a directory."""


class IsADirectory(FsError):
    """Is a directory."""


class ReadOnly(FsError):
    """Read-only file system."""


class AccessDenied(FsError):
    """Permission denied."""


class NotPermitted(FsError):
    """Operation not permitted."""


class InvalidName(FsError):
    """Invalid argument."""


class InvalidArgument(FsError):
    """Invalid argument."""


class NameTooLong(FsError):
    """File name too long."""


class CrossDevice(FsError):
    """Invalid cross-device link."""


class NoSpace(FsError):
    """No space left on device."""


class NoData(FsError):
    """No data available (no such attribute)."""


class OutOfRange(FsError):
    """Result too large for the buffer."""


class TooBig(FsError):
    """Argument list too long (value too large)."""


class FileTooBig(FsError):
    """File too large."""


class TooManyLinks(FsError):
    """Too many links."""


class NotSupported(FsError):
    """Operation not supported."""


class BadHandle(FsError):
    """Bad file descriptor."""


class Corrupt(FsError):
    """Input/output error: stored data does not match its digest."""


class StorageError(FsError):
    """Input/output error in the blob store."""


class StoreError(ArtifactFsError):
    """The store cannot be used."""

    exit_code = 2


class StoreMissing(StoreError):
    """No artifactfs store here; run `artifactfs init` first."""


class StoreTooNew(StoreError):
    """The store was written by a newer artifactfs; upgrade artifactfs to use it."""


class MountError(ArtifactFsError):
    """The filesystem could not be mounted."""

    exit_code = 3
