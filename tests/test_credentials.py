"""Credentials and the policy: tokens and each refusal, the decision table, and scoped views
of the core (what a credential's mount sees and may change)."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from coreutil import Core, open_core

from artifactfs.core.policy import ADMIN, Decision, Op, Place, View, decide
from artifactfs.credentials import (
    Expired,
    Grants,
    Revoked,
    Tampered,
    WrongStore,
    authenticate,
    issue_token,
    read_credential_file,
    still_valid,
    store_key,
    verify_token,
    write_credential_file,
)
from artifactfs.errors import AccessDenied, NotFound, ReadOnly

STORE_ID = "store-a"

# ---- the decision table ------------------------------------------------------------------------

ALICE = View(sandbox="acme", user="alice", session="s1")
BOB_RO = View(sandbox="acme", user="bob", session="s2", shared_writable=False)
DEAD = View(sandbox="acme", user="alice", session="s1", writable=False)
ROOT = Place()
ACME = Place(sandbox="acme")
OTHER = Place(sandbox="other")
SHARED = Place("acme", "shared")
U_ALICE = Place("acme", "user", "alice")
U_BOB = Place("acme", "user", "bob")
S1 = Place("acme", "session", "s1")
S1_EXPIRED = Place("acme", "session", "s1", expired=True)
S2 = Place("acme", "session", "s2")
OTHER_SHARED = Place("other", "shared")

A, H, RO, D = Decision.ALLOW, Decision.HIDDEN, Decision.READ_ONLY, Decision.DENIED
TABLE = [
    # view, op, place, decision
    (ADMIN, Op.WRITE, OTHER_SHARED, A),
    (ADMIN, Op.CREATE_SANDBOX, ROOT, A),
    (ADMIN, Op.SEE, S1_EXPIRED, H),
    (ALICE, Op.SEE, ROOT, A),
    (ALICE, Op.CREATE_SANDBOX, ROOT, D),
    (ALICE, Op.SEE, ACME, A),
    (ALICE, Op.SEE, OTHER, H),
    (ALICE, Op.SEE, OTHER_SHARED, H),
    (ALICE, Op.WRITE, OTHER_SHARED, H),
    (ALICE, Op.CREATE_SCOPE, ACME, D),
    (ALICE, Op.SEE, SHARED, A),
    (ALICE, Op.WRITE, SHARED, A),
    (ALICE, Op.SEE, U_ALICE, A),
    (ALICE, Op.WRITE, U_ALICE, A),
    (ALICE, Op.SEE, U_BOB, H),
    (ALICE, Op.WRITE, U_BOB, H),
    (ALICE, Op.SEE, S1, A),
    (ALICE, Op.WRITE, S1, A),
    (ALICE, Op.SEE, S2, H),
    (ALICE, Op.SEE, S1_EXPIRED, A),  # its own session: reads go on until unmount
    (View("acme", "alice", "s9"), Op.SEE, S1_EXPIRED, H),
    (BOB_RO, Op.SEE, SHARED, A),
    (BOB_RO, Op.WRITE, SHARED, RO),
    (BOB_RO, Op.WRITE, U_BOB, A),
    (BOB_RO, Op.WRITE, S2, A),
    (BOB_RO, Op.SEE, U_ALICE, H),
    (DEAD, Op.SEE, S1, A),
    (DEAD, Op.WRITE, S1, D),
    (DEAD, Op.WRITE, SHARED, D),
    (View("acme", "alice", "s1", user_writable=False), Op.WRITE, U_ALICE, RO),
]


@pytest.mark.parametrize(("view", "op", "place", "want"), TABLE)
def test_policy_table(view: View, op: Op, place: Place, want: Decision) -> None:
    assert decide(view, op, place) is want


# ---- tokens ------------------------------------------------------------------------------------


def test_issue_and_verify(tmp_path: Path) -> None:
    key = store_key(tmp_path)
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    assert store_key(tmp_path) == key  # created once
    cred, token = issue_token(
        key, STORE_ID, sandbox="acme", user="alice", session="s1",
        grants=Grants(shared="ro"), ttl_s=3600,
    )
    got = verify_token(token, key, STORE_ID)
    assert got == cred
    view = got.view()
    assert (view.sandbox, view.user, view.session) == ("acme", "alice", "s1")
    assert not view.shared_writable and view.user_writable and view.writable


def _token(tmp_path: Path, **kw: object) -> tuple[bytes, str]:
    key = store_key(tmp_path)
    args: dict[str, object] = dict(
        sandbox="acme", user="alice", session="s1", grants=Grants(), ttl_s=3600
    )
    args.update(kw)
    _, token = issue_token(key, STORE_ID, **args)  # type: ignore[arg-type]
    return key, token


def test_tampered_token_is_refused(tmp_path: Path) -> None:
    key, token = _token(tmp_path)
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["usr"] = "mallory"  # a different user, same signature
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(Tampered, match="signature does not match"):
        verify_token(f"{head}.{forged}.{sig}", key, STORE_ID)
    with pytest.raises(Tampered):
        verify_token(token[:-5], key, STORE_ID)
    with pytest.raises(Tampered, match="not a valid token"):
        verify_token("garbage", key, STORE_ID)


def test_expired_and_wrong_store_tokens_are_refused(tmp_path: Path) -> None:
    key, token = _token(tmp_path, ttl_s=60, now=time.time() - 3600)
    with pytest.raises(Expired, match="expired at"):
        verify_token(token, key, STORE_ID)
    key, token = _token(tmp_path)
    with pytest.raises(WrongStore, match="issued by store 'store-a', not by this store"):
        verify_token(token, key, "store-b")
    # Same store id but another key (a forged store): the signature does not match.
    with pytest.raises(Tampered):
        verify_token(token, os.urandom(32), STORE_ID)


def test_credential_file_round_trip(tmp_path: Path) -> None:
    key = store_key(tmp_path)
    cred, token = issue_token(
        key, STORE_ID, sandbox="acme", user="alice", session="s1", grants=Grants(), ttl_s=60
    )
    path = tmp_path / "alice.cred"
    write_credential_file(path, cred, token)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_credential_file(path) == token
    bare = tmp_path / "bare"
    bare.write_text(token + "\n")
    assert read_credential_file(bare) == token


# ---- scoped views of the core ------------------------------------------------------------------


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    async with open_core(tmp_path / "store") as c:
        for d in (
            "acme/shared/data",
            "acme/user-alice/proj",
            "acme/user-bob/secret",
            "acme/sess-s1/work",
            "acme/sess-s2/work",
            "other/shared/x",
        ):
            await c.makedirs(d)
        await c.write_file("acme/shared/data/f", b"shared")
        await c.write_file("acme/user-bob/secret/key", b"bob's")
        yield c


def as_view(core: Core, view: View) -> None:
    core.fs.view = view


async def test_scoped_view_sees_only_its_scopes(core: Core) -> None:
    as_view(core, ALICE)
    assert await core.listdir("") == [b"acme"]
    assert sorted(await core.listdir("acme")) == [b"sess-s1", b"shared", b"user-alice"]
    for hidden in ("other", "other/shared/x", "acme/user-bob", "acme/user-bob/secret/key",
                   "acme/sess-s2/work"):
        with pytest.raises(NotFound):
            await core.resolve(hidden)
    assert await core.read_file("acme/shared/data/f") == b"shared"
    await core.write_file("acme/sess-s1/work/new", b"mine")
    await core.write_file("acme/user-alice/proj/new", b"mine")
    with pytest.raises(AccessDenied):
        await core.mkdir("acme/user-eve")
    with pytest.raises(AccessDenied):
        await core.mkdir("newsandbox")


async def test_read_only_shared_grant(core: Core) -> None:
    as_view(core, View(sandbox="acme", user="alice", session="s1", shared_writable=False))
    assert await core.read_file("acme/shared/data/f") == b"shared"
    with pytest.raises(ReadOnly):
        await core.write_file("acme/shared/data/g", b"no")
    with pytest.raises(ReadOnly):
        await core.open("acme/shared/data/f", os.O_WRONLY)
    await core.write_file("acme/sess-s1/work/ok", b"yes")


async def test_writes_stop_when_the_view_is_no_longer_writable(core: Core) -> None:
    as_view(core, ALICE)
    fh = await core.create("acme/sess-s1/work/held")
    try:
        await core.fs.write(fh, 0, b"before")
        as_view(core, DEAD)
        with pytest.raises(AccessDenied):
            await core.fs.write(fh, 6, b"after")
        with pytest.raises(AccessDenied):
            await core.write_file("acme/sess-s1/work/other", b"x")
    finally:
        await core.fs.release(fh)
    assert await core.read_file("acme/sess-s1/work/held") == b"before"


async def test_expired_session_scope_is_invisible(core: Core) -> None:
    index = core.store.index
    sb = index.sandbox_by_name("acme")
    assert sb is not None
    scope = index.scope_by_name(sb.id, "sess-s1")
    assert scope is not None
    with index.txn():
        index.extend_scope_expiry(scope.id, time.time_ns() - 1)
    as_view(core, ADMIN)
    with pytest.raises(NotFound):
        await core.resolve("acme/sess-s1/work")
    assert b"sess-s1" not in await core.listdir("acme")
    as_view(core, DEAD)  # the session's own mount, its credential expired with it
    assert await core.listdir("acme/sess-s1/work") == []
    with pytest.raises(AccessDenied):
        await core.mkdir("acme/sess-s1/work/more")


async def test_authenticate_checks_revocation(core: Core, tmp_path: Path) -> None:
    index = core.store.index
    store_path = core.store.path
    store_id = core.store.config.store_id
    cred, token = issue_token(
        store_key(store_path), store_id, sandbox="acme", user="alice", session="s1",
        grants=Grants(), ttl_s=3600,
    )
    with pytest.raises(Revoked, match="not known"):
        authenticate(store_path, store_id, index, token)
    with index.txn():
        index.insert_credential(
            cred.id, "acme", "alice", "s1", {}, 0, cred.expires_ns, "test"
        )
    assert authenticate(store_path, store_id, index, token) == cred
    assert still_valid(index, cred) is None
    with index.txn():
        assert index.revoke_credential(cred.id, time.time_ns())
    with pytest.raises(Revoked, match="was revoked at"):
        authenticate(store_path, store_id, index, token)
    assert "revoked" in (still_valid(index, cred) or "")
