"""POSIX ACLs as far as the mode bits express them (core/acl.py)."""

from __future__ import annotations

import struct

import pytest
from coreutil import minimal_acl

from artifactfs.core.acl import (
    GROUP,
    GROUP_OBJ,
    MASK,
    OTHER,
    USER,
    USER_OBJ,
    mode_of_access_acl,
)
from artifactfs.errors import InvalidArgument, NotSupported


def acl(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize("mode", [0o000, 0o640, 0o755, 0o777, 0o421, 0o007])
def test_a_minimal_acl_is_its_mode(mode: int) -> None:
    assert mode_of_access_acl(minimal_acl(mode)) == mode


def test_entry_order_does_not_matter() -> None:
    value = acl((OTHER, 4, 0), (USER_OBJ, 6, 0), (GROUP_OBJ, 0, 0))
    assert mode_of_access_acl(value) == 0o604


@pytest.mark.parametrize("tag", [USER, GROUP, MASK])
def test_named_entries_and_masks_are_not_supported(tag: int) -> None:
    with pytest.raises(NotSupported):
        mode_of_access_acl(minimal_acl(0o644) + struct.pack("<HHI", tag, 4, 1234))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x02\x00\x00",
        minimal_acl(0o644)[:-1],
        acl((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0), version=1),
        acl((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0)),  # no other entry
        acl((USER_OBJ, 6, 0), (USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)),
        acl((USER_OBJ, 8, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)),  # unknown permission bit
        acl((USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0), (0x40, 4, 0)),  # unknown tag
    ],
)
def test_malformed_acls_are_invalid(value: bytes) -> None:
    with pytest.raises(InvalidArgument):
        mode_of_access_acl(value)
