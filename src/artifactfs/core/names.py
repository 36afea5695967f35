"""Name rules for every level of the grid (PRODUCT.md, "The tree")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from artifactfs.errors import InvalidName, NameTooLong

NAME_MAX = 255
SNAPSHOTS_NAME = b".snapshots"

# Sandbox, user and session ids: printable, no separators or shell-hostile bytes, so a grid
# path is always safe to paste into a shell and into a credential.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


def check_name(name: bytes) -> None:
    """Any entry name: not empty, no '/', no NUL, at most 255 bytes, not '.' or '..'."""
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name is {len(name)} bytes, at most {NAME_MAX} are allowed")
    if not name or name in (b".", b".."):
        raise InvalidName(f"invalid name {name!r}")
    if b"/" in name or b"\0" in name:
        raise InvalidName(f"name {name!r} contains '/' or NUL")


def check_grid_name(name: bytes, what: str) -> str:
    """A sandbox or namespace name: the generic rules plus valid UTF-8 (they appear in
    credentials, events and grid paths)."""
    check_name(name)
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"{what} name {name!r} is not valid UTF-8") from None
    if name == SNAPSHOTS_NAME:
        raise InvalidName(f"{what} name .snapshots is reserved")
    return text


def check_sandbox_name(name: bytes) -> str:
    text = check_grid_name(name, "sandbox")
    if not _ID_RE.match(text):
        raise InvalidName(
            f"sandbox name {text!r} must start with a letter or digit and use only "
            "letters, digits and . _ @ + -"
        )
    return text


@dataclass(frozen=True, slots=True)
class ScopeName:
    kind: str  # 'shared' | 'user' | 'session'
    owner: str  # '' for shared, the user id or session id otherwise
    name: str


def parse_scope_name(name: bytes) -> ScopeName:
    """`shared`, `user-<id>` or `sess-<id>`; anything else is InvalidName."""
    check_name(name)
    text = name.decode("utf-8", errors="replace")
    if text == "shared":
        return ScopeName("shared", "", text)
    for prefix, kind in (("user-", "user"), ("sess-", "session")):
        if text.startswith(prefix):
            ident = text[len(prefix) :]
            if ident and _ID_RE.match(ident):
                return ScopeName(kind, ident, text)
    raise InvalidName(
        f"scope name {text!r} is not one of shared, user-<id>, sess-<id> "
        "(ids use letters, digits and . _ @ + -)"
    )
