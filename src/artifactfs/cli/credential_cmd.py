"""`artifactfs credential`: issue, list and revoke session credentials of a store.

`issue` creates the credential's session scope (`sess-<id>`, expiring with it), its user scope
and the sandbox's shared scope if they are missing, records the credential (never the token)
and writes a 0600 credential file for `artifactfs mount --credential FILE`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import BaseModel

from artifactfs.cli.common import MARKUP, StoreOption, examples
from artifactfs.cli.session import Session, actor, run
from artifactfs.core.grid import ensure_dir
from artifactfs.core.names import check_sandbox_name, parse_scope_name
from artifactfs.core.nodes import ROOT_INODE
from artifactfs.credentials import (
    Access,
    Credential,
    Grants,
    issue_token,
    new_session_id,
    store_key,
    write_credential_file,
)
from artifactfs.errors import InvalidArgument, NotFound
from artifactfs.index.db import CredentialRow

app = typer.Typer(
    name="credential",
    help="Issue, list and revoke session credentials (what a scoped mount may see and do).",
    no_args_is_help=True,
    rich_markup_mode=MARKUP,
    epilog=examples(
        "artifactfs credential issue --sandbox acme --user alice --ttl 2h -o alice.cred",
        "artifactfs credential list --json",
        "artifactfs credential revoke 3f2a9c0e4b1d4e6f8a7b5c3d2e1f0a9b",
    ),
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise InvalidArgument(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h or 7d")
    return float(m.group(1)) * _UNIT[m.group(2)]


class CredentialItem(BaseModel):
    """One line of `credential list --json` (never the token: the store does not keep it)."""

    id: str
    sandbox: str
    user: str
    session: str
    grants: dict[str, str]  # shared / user -> ro or rw
    issued_ns: int
    expires_ns: int
    revoked_ns: int | None
    issuer: str
    state: Literal["active", "expired", "revoked"]


def _state(row: CredentialRow, now_ns: int) -> Literal["active", "expired", "revoked"]:
    if row.revoked_ns is not None:
        return "revoked"
    return "expired" if row.expires_ns <= now_ns else "active"


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@app.command(
    epilog=examples(
        "artifactfs credential issue --sandbox acme --user alice --ttl 2h -o alice.cred",
        "artifactfs credential issue --sandbox acme --user ci --session build-42 --ttl 30m "
        "--shared ro -o ci.cred",
    )
)
def issue(
    sandbox: Annotated[str, typer.Option(help="The sandbox the credential is for.")],
    user: Annotated[str, typer.Option(help="The user it acts as (scope user-<id>).")],
    session: Annotated[
        str | None, typer.Option(help="Session id (scope sess-<id>); a fresh one if omitted.")
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime: 90s, 30m, 2h, 7d.")] = "2h",
    shared: Annotated[str, typer.Option(help="Access to shared/: ro or rw.")] = "rw",
    user_scope: Annotated[
        str, typer.Option("--user-scope", help="Access to user-<id>/: ro or rw.")
    ] = "rw",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the credential file here (0600).")
    ] = None,
    store: StoreOption = None,
) -> None:
    """Issue a credential for one sandbox, user and session.

    Without -o, prints the credential with its token as JSON on stdout.
    """
    check_sandbox_name(sandbox.encode())
    parse_scope_name(f"user-{user}".encode())
    sess = session or new_session_id()
    parse_scope_name(f"sess-{sess}".encode())
    for what, value in (("--shared", shared), ("--user-scope", user_scope)):
        if value not in ("ro", "rw"):
            raise InvalidArgument(f"{what} must be ro or rw, not {value!r}")
    grants = Grants(shared=_access(shared), user=_access(user_scope))
    ttl_s = parse_duration(ttl)

    async def go(s: Session) -> tuple[Credential, str]:
        key = store_key(s.store.path)
        cred, token = issue_token(
            key,
            s.store.config.store_id,
            sandbox=sandbox,
            user=user,
            session=sess,
            grants=grants,
            ttl_s=ttl_s,
        )
        sb_ino = await ensure_dir(s.fs, ROOT_INODE, sandbox, s.caller)
        for scope in ("shared", f"user-{user}", f"sess-{sess}"):
            await ensure_dir(s.fs, sb_ino, scope, s.caller)
        index = s.store.index
        with index.txn():
            sb = index.sandbox_by_name(sandbox)
            assert sb is not None
            scope_row = index.scope_by_name(sb.id, f"sess-{sess}")
            assert scope_row is not None
            index.extend_scope_expiry(scope_row.id, cred.expires_ns)
            index.insert_credential(
                cred.id,
                sandbox,
                user,
                sess,
                grants.model_dump(),
                int(cred.issued_at.timestamp() * 1e9),
                cred.expires_ns,
                actor(),
            )
            index.append_event(
                "credential.issue",
                {
                    "id": cred.id,
                    "actor": actor(),
                    "sandbox": sandbox,
                    "user": user,
                    "session": sess,
                    "grants": grants.model_dump(),
                    "expires_ns": cred.expires_ns,
                },
                sandbox=sandbox,
            )
        return cred, token

    cred, token = run(store, go)
    if output is None:
        data = {"token": token, **json.loads(cred.model_dump_json())}
        typer.echo(json.dumps(data, indent=2))
        return
    write_credential_file(output, cred, token)
    typer.echo(
        f"issued credential {cred.id} for {sandbox} user {user} session {sess} "
        f"(expires {cred.expires_at:%Y-%m-%d %H:%M:%S} UTC) to {output}",
        err=True,
    )


def _access(value: str) -> Access:
    return "ro" if value == "ro" else "rw"


@app.command(
    "list",
    epilog=examples(
        "artifactfs credential list",
        "artifactfs credential list --json | jq -r 'select(.state == \"active\") | .id'",
    ),
)
def list_(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    store: StoreOption = None,
) -> None:
    """List the store's credentials: active, expired and revoked.

    With --json: one object per line (id, sandbox, user, session, grants, issued_ns,
    expires_ns, revoked_ns, issuer, state).
    """

    async def go(s: Session) -> list[CredentialRow]:
        return s.store.index.credentials()

    rows = run(store, go)
    now = time.time_ns()
    if json_out:
        for r in rows:
            item = CredentialItem(
                id=r.id,
                sandbox=r.sandbox,
                user=r.user,
                session=r.session,
                grants=r.grants,
                issued_ns=r.issued_ns,
                expires_ns=r.expires_ns,
                revoked_ns=r.revoked_ns,
                issuer=r.issuer,
                state=_state(r, now),
            )
            # json.dumps, not model_dump_json: scripts already match its `"key": value` form.
            sys.stdout.write(json.dumps(item.model_dump(mode="json")) + "\n")
        return
    typer.echo(f"{'ID':<32}  {'SANDBOX':<12} {'USER':<12} {'SESSION':<16} GRANTS       "
               f"{'EXPIRES':<23} STATE")
    for r in rows:
        g = f"sh:{r.grants.get('shared')} us:{r.grants.get('user')}"
        typer.echo(
            f"{r.id:<32}  {r.sandbox:<12} {r.user:<12} {r.session:<16} {g:<12} "
            f"{_when(r.expires_ns):<23} {_state(r, now)}"
        )


@app.command(
    epilog=examples(
        "artifactfs credential revoke 3f2a9c0e4b1d4e6f8a7b5c3d2e1f0a9b",
        "artifactfs credential list --json | jq -r 'select(.user == \"alice\") | .id' "
        "| xargs -n1 artifactfs credential revoke",
    )
)
def revoke(
    cred_id: Annotated[str, typer.Argument(metavar="ID", help="The credential id (see list).")],
    store: StoreOption = None,
) -> None:
    """Revoke a credential: mounts using it stop accepting writes within seconds."""

    async def go(s: Session) -> CredentialRow:
        index = s.store.index
        with index.txn():
            row = index.credential(cred_id)
            if row is None:
                raise NotFound(
                    f"no credential {cred_id!r} in this store: see `artifactfs credential list`"
                )
            if not index.revoke_credential(cred_id, time.time_ns()):
                raise InvalidArgument(f"credential {cred_id} is already revoked")
            index.append_event(
                "credential.revoke",
                {"id": cred_id, "actor": actor(), "user": row.user, "session": row.session},
                sandbox=row.sandbox,
            )
        return row

    row = run(store, go)
    typer.echo(f"revoked credential {row.id} ({row.sandbox} user {row.user})")
