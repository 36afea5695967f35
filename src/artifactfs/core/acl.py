"""POSIX ACLs, as far as the mode bits express them.

artifactfs stores no ACLs: a file's permissions are its mode. An access ACL with only the
owner, owning-group and other entries (a "minimal" ACL) says exactly what the mode says, so
setting one is a chmod of the permission bits, as ext4 does (it stores no xattr for such an
ACL either). `cp -a` sets one on every copy and, refused, falls back to a chmod (a second
request per file); `rsync -A` and `tar --acls` report the refusal as an error. An extended
ACL (named users or groups, a mask) or a default ACL cannot be kept: EOPNOTSUPP.

The value is the kernel's xattr form (linux/posix_acl_xattr.h): a little-endian u32 version
(2), then 8-byte entries of u16 tag, u16 permissions (rwx = 4|2|1), u32 id. The kernel has
checked it (posix_acl_valid) before a mount sees it; it is checked again here for the API.
"""

from __future__ import annotations

import struct

from artifactfs.errors import InvalidArgument, NotSupported

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACL_NAMES = (ACL_ACCESS, ACL_DEFAULT)

XATTR_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_SHIFT = {USER_OBJ: 6, GROUP_OBJ: 3, OTHER: 0}
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def mode_of_access_acl(value: bytes) -> int:
    """The permission bits (0o777) an access ACL in xattr form stands for. InvalidArgument if
    it is malformed, NotSupported if it says more than a mode can (named entries, a mask)."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise InvalidArgument("malformed POSIX ACL")
    (version,) = _HEADER.unpack_from(value)
    if version != XATTR_VERSION:
        raise InvalidArgument(f"POSIX ACL version {version}, expected {XATTR_VERSION}")
    mode = 0
    seen: set[int] = set()
    for tag, perm, _id in _ENTRY.iter_unpack(value[_HEADER.size :]):
        if perm & ~0o7:
            raise InvalidArgument("POSIX ACL entry with unknown permission bits")
        if tag in (USER, GROUP, MASK):
            raise NotSupported(
                "ACLs with named users or groups are not stored; only the mode bits are"
            )
        if tag not in _SHIFT or tag in seen:
            raise InvalidArgument("malformed POSIX ACL")
        seen.add(tag)
        mode |= perm << _SHIFT[tag]
    if len(seen) != len(_SHIFT):
        raise InvalidArgument("POSIX ACL without an owner, group or other entry")
    return mode

