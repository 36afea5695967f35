"""Session credentials: signed tokens that name one sandbox, one user and one session.

A credential is a JWT (HS256, PyJWT) signed with the store's secret key
(`<store>/secret.key`, 32 random bytes, mode 0600, created by `init` or at the first issue;
it never leaves the store directory). Its claims:

    jti      credential id (revocation, events, `mounts.credential`)
    aud      the store id: a credential of another store is refused as such
    iat exp  issued / expires (seconds); expiry is checked at mount time and every second
    sb usr sess   sandbox, user, session
    g        grants: {"shared": "ro"|"rw", "user": "ro"|"rw"} (the session scope is always rw)

The file given to `mount --credential` is JSON (mode 0600) holding the token and, for people,
a copy of what it grants; only the verified token counts. The index keeps a row per credential
(what it grants, when it expires, whether it was revoked), never the token.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import jwt
from pydantic import BaseModel, Field

from artifactfs.core.policy import View
from artifactfs.errors import ArtifactFsError
from artifactfs.index.db import Index

KEY_NAME = "secret.key"
ALGORITHM = "HS256"
FILE_FORMAT = "artifactfs-credential"

Access = Literal["ro", "rw"]


class CredentialError(ArtifactFsError):
    """The credential is not valid for this store."""

    exit_code = 5


class Tampered(CredentialError):
    """The credential's signature does not match: it was altered or not issued by this store."""


class Expired(CredentialError):
    """The credential has expired."""


class Revoked(CredentialError):
    """The credential was revoked."""


class WrongStore(CredentialError):
    """The credential was issued by another store."""


class Grants(BaseModel):
    shared: Access = "rw"
    user: Access = "rw"


class Credential(BaseModel):
    """The verified claims of a credential."""

    id: str
    store_id: str
    sandbox: str
    user: str
    session: str
    grants: Grants
    issued_at: datetime
    expires_at: datetime

    def view(self, *, writable: bool = True) -> View:
        return View(
            sandbox=self.sandbox,
            user=self.user,
            session=self.session,
            shared_writable=self.grants.shared == "rw",
            user_writable=self.grants.user == "rw",
            writable=writable,
        )

    @property
    def expires_ns(self) -> int:
        return int(self.expires_at.timestamp() * 1e9)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at.timestamp()


class CredentialFile(BaseModel):
    """What `credential issue -o FILE` writes."""

    format: str = FILE_FORMAT
    version: int = 1
    token: str
    id: str
    sandbox: str
    user: str
    session: str
    grants: Grants
    expires_at: datetime = Field(description="for people; the token's own expiry counts")


def store_key(store: Path, *, create: bool = True) -> bytes:
    """The store's signing key, created (0600, exclusively) if missing and `create`."""
    path = store / KEY_NAME
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise CredentialError(f"{store} has no secret key: issue a credential first") from None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return path.read_bytes()
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        key = path.read_bytes()
    if len(key) < 32:
        raise CredentialError(f"{path} is damaged (too short)")
    return key


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def issue_token(
    key: bytes,
    store_id: str,
    *,
    sandbox: str,
    user: str,
    session: str,
    grants: Grants,
    ttl_s: float,
    now: float | None = None,
) -> tuple[Credential, str]:
    issued = time.time() if now is None else now
    expires = issued + ttl_s
    cred = Credential(
        id=uuid.uuid4().hex,
        store_id=store_id,
        sandbox=sandbox,
        user=user,
        session=session,
        grants=grants,
        issued_at=datetime.fromtimestamp(issued, UTC),
        expires_at=datetime.fromtimestamp(expires, UTC),
    )
    claims = {
        "jti": cred.id,
        "aud": store_id,
        "iat": int(issued),
        "exp": int(expires),
        "sb": sandbox,
        "usr": user,
        "sess": session,
        "g": grants.model_dump(),
    }
    # Whole seconds in the token: keep the record the same as what will be verified.
    cred.issued_at = datetime.fromtimestamp(int(issued), UTC)
    cred.expires_at = datetime.fromtimestamp(int(expires), UTC)
    return cred, jwt.encode(claims, key, algorithm=ALGORITHM)


def verify_token(token: str, key: bytes, store_id: str, *, now: float | None = None) -> Credential:
    """The credential's claims, or the precise reason it is refused (revocation is the
    index's to say: see `check_revoked`)."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise Tampered("the credential is not a valid token: it was altered or truncated") from None
    if unverified.get("aud") != store_id:
        raise WrongStore(
            f"the credential was issued by store {unverified.get('aud')!r}, not by this store "
            f"({store_id}): use a credential issued with this store's --store"
        )
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=store_id,
            options={"require": ["jti", "exp", "iat", "aud"], "verify_exp": False},
        )
    except jwt.InvalidSignatureError:
        raise Tampered(
            "the credential's signature does not match: it was altered, or not issued by "
            "this store"
        ) from None
    except jwt.PyJWTError as exc:
        raise Tampered(f"the credential is not valid: {exc}") from None
    try:
        cred = Credential(
            id=claims["jti"],
            store_id=claims["aud"],
            sandbox=claims["sb"],
            user=claims["usr"],
            session=claims["sess"],
            grants=Grants.model_validate(claims["g"]),
            issued_at=datetime.fromtimestamp(claims["iat"], UTC),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        )
    except (KeyError, ValueError) as exc:
        raise Tampered(f"the credential lacks a claim: {exc}") from None
    if cred.expired(now):
        raise Expired(
            f"the credential {cred.id} expired at {cred.expires_at:%Y-%m-%d %H:%M:%S} UTC: "
            "issue a new one"
        )
    return cred


def check_revoked(cred: Credential, revoked_ns: int | None) -> None:
    if revoked_ns is not None:
        when = datetime.fromtimestamp(revoked_ns / 1e9, UTC)
        raise Revoked(f"the credential {cred.id} was revoked at {when:%Y-%m-%d %H:%M:%S} UTC")


def write_credential_file(path: Path, cred: Credential, token: str) -> None:
    data = CredentialFile(
        token=token,
        id=cred.id,
        sandbox=cred.sandbox,
        user=cred.user,
        session=cred.session,
        grants=cred.grants,
        expires_at=cred.expires_at,
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


def read_credential_file(path: Path) -> str:
    """The token in a credential file (a bare token file works too)."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"cannot read the credential file {path}: {exc.strerror}") from None
    if text.startswith("{"):
        try:
            return CredentialFile.model_validate(json.loads(text)).token
        except ValueError:
            raise Tampered(f"{path} is not an artifactfs credential file") from None
    return text


def authenticate(store: Path, store_id: str, index: Index, token: str) -> Credential:
    """The credential `token` stands for, if this store issued it and it is still valid:
    signature, store, expiry and revocation, each refused with its own message."""
    cred = verify_token(token, store_key(store), store_id)
    row = index.credential(cred.id)
    if row is None:
        raise Revoked(f"the credential {cred.id} is not known to this store (was it restored?)")
    check_revoked(cred, row.revoked_ns)
    return cred


def still_valid(index: Index, cred: Credential) -> str | None:
    """Why a mounted credential no longer allows writes (expired, revoked), or None."""
    if cred.expired():
        return f"credential {cred.id} expired at {cred.expires_at:%Y-%m-%d %H:%M:%S} UTC"
    row = index.credential(cred.id)
    if row is None or row.revoked_ns is not None:
        return f"credential {cred.id} was revoked"
    return None
