"""Who may see and do what in the grid: the one decision function the core asks.

A `View` is what a mount (or an API handle) acts as: the store owner's administrative view
(no credential) or a credential's view of one sandbox, one user and one session. `decide()`
answers for one (view, operation, place) triple; the core turns the answer into an error.
Nothing else in artifactfs decides visibility or write access to scopes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Op(Enum):
    SEE = "see"  # lookup or list the place
    CREATE_SANDBOX = "create-sandbox"
    CREATE_SCOPE = "create-scope"
    WRITE = "write"  # any change to a namespace or to what a scope holds


class Decision(Enum):
    ALLOW = "allow"
    HIDDEN = "hidden"  # as if it did not exist: ENOENT
    READ_ONLY = "read-only"  # EROFS
    DENIED = "denied"  # EACCES / EPERM


@dataclass(frozen=True, slots=True)
class Place:
    """Where in the grid: the root (sandbox None), a sandbox (scope_kind None) or a scope."""

    sandbox: str | None = None
    scope_kind: str | None = None  # 'shared' | 'user' | 'session'
    scope_owner: str = ""
    expired: bool = False  # a session scope past its expiry (gc reclaims it)


@dataclass(frozen=True, slots=True)
class View:
    """Administrative when `sandbox` is None; otherwise a credential's view."""

    sandbox: str | None = None
    user: str = ""
    session: str = ""
    shared_writable: bool = True
    user_writable: bool = True
    writable: bool = True  # False once the credential expired or was revoked

    @property
    def is_admin(self) -> bool:
        return self.sandbox is None


ADMIN = View()


def decide(view: View, op: Op, place: Place) -> Decision:
    if place.expired and not (place.scope_kind == "session" and place.scope_owner == view.session):
        # An expired session's scope is gone for everyone at once (gc reclaims it), except
        # for the mounts of that very session, which may go on reading until unmount (their
        # credential expired with it, so they no longer write).
        return Decision.HIDDEN
    if view.is_admin:
        return Decision.ALLOW
    if place.sandbox is None:
        # The grid root itself: visible, but a credential cannot make sandboxes.
        return Decision.ALLOW if op is Op.SEE else Decision.DENIED
    if place.sandbox != view.sandbox:
        return Decision.HIDDEN
    if place.scope_kind is None:
        if op is Op.SEE:
            return Decision.ALLOW
        return Decision.DENIED
    mine = (
        place.scope_kind == "shared"
        or (place.scope_kind == "user" and place.scope_owner == view.user)
        or (place.scope_kind == "session" and place.scope_owner == view.session)
    )
    if not mine:
        return Decision.HIDDEN
    if op is Op.SEE:
        return Decision.ALLOW
    if op is Op.CREATE_SCOPE:
        return Decision.DENIED
    writable = {
        "shared": view.shared_writable,
        "user": view.user_writable,
        "session": True,
    }[place.scope_kind]
    if not view.writable:
        return Decision.DENIED
    return Decision.ALLOW if writable else Decision.READ_ONLY
