"""The errno table covers every core error class, so none silently becomes EIO."""

from __future__ import annotations

import errno
import inspect

from artifactfs import errors
from artifactfs.fuse.errno_map import ERRNO_OF, errno_for


def _fs_error_classes() -> list[type[errors.FsError]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.FsError)
    ]


def test_every_fs_error_has_an_errno() -> None:
    missing = [c.__name__ for c in _fs_error_classes() if c not in ERRNO_OF]
    assert missing == []


def test_precise_errnos() -> None:
    assert errno_for(errors.NotFound()) == errno.ENOENT
    assert errno_for(errors.CrossDevice()) == errno.EXDEV
    assert errno_for(errors.NameTooLong()) == errno.ENAMETOOLONG
    assert errno_for(errors.NotEmpty()) == errno.ENOTEMPTY
    assert errno_for(errors.ReadOnly()) == errno.EROFS
    assert errno_for(errors.NoData()) == errno.ENODATA
    assert errno_for(errors.OutOfRange()) == errno.ERANGE
    assert errno_for(errors.StorageError()) == errno.EIO


def test_messages_default_to_docstring() -> None:
    assert errors.NotEmpty().message == "Directory not empty."
    assert errors.StoreMissing("x").message == "x"
