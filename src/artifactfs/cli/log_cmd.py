"""`artifactfs log`: the event log (namespace, checkpoint, credential, mount, gc events), one
line per event or one JSON object per line, optionally following new events."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from artifactfs.cli.common import StoreOption
from artifactfs.cli.gc_cmd import parse_duration
from artifactfs.cli.session import Session
from artifactfs.errors import InvalidArgument
from artifactfs.index.db import EventRow

POLL_INTERVAL = 0.5
PAGE = 1000
SUMMARY_WIDTH = 100


class EventLine(BaseModel):
    """One line of `log --json`."""

    seq: int  # increasing, never reused: resume after the last one seen
    time: datetime  # local time with its offset
    time_ns: int
    type: str  # namespace.create, checkpoint.restore, credential.issue, gc.run, ...
    sandbox: str | None
    payload: dict[str, Any]  # the event's fields (bytes as hex)


def parse_since(text: str) -> int:
    """'1h', '30m', '2d' ago, or an ISO date/time (local time when it has no zone) -> ns."""
    try:
        return time.time_ns() - int(parse_duration(text) * 1e9)
    except InvalidArgument:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"--since {text!r} is neither a duration (30m, 1h, 2d) nor an ISO time "
            "(2026-01-31 or 2026-01-31T12:00)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp() * 1e9)


def plain(value: Any) -> Any:
    """A payload as JSON can hold it: bytes as hex."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def summarize(payload: dict[str, Any]) -> str:
    parts = []
    for key, value in payload.items():
        v = plain(value)
        text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
        if len(text) > 24:
            text = text[:21] + "..."
        parts.append(f"{key}={text}")
    line = " ".join(parts)
    return line if len(line) <= SUMMARY_WIDTH else line[: SUMMARY_WIDTH - 3] + "..."


def render(e: EventRow, as_json: bool) -> str:
    stamp = datetime.fromtimestamp(e.time_ns / 1e9).astimezone()
    if as_json:
        line = EventLine(
            seq=e.seq,
            time=stamp,
            time_ns=e.time_ns,
            type=e.type,
            sandbox=e.sandbox,
            payload=plain(e.payload),
        )
        # json.dumps, not model_dump_json: scripts already match its `"key": value` form.
        return json.dumps(line.model_dump(mode="json"))
    return (
        f"{stamp.strftime('%Y-%m-%d %H:%M:%S')}  {e.type:<20} {e.sandbox or '-':<12} "
        f"{summarize(e.payload)}"
    )


def log(
    sandbox: Annotated[
        str | None, typer.Option("--sandbox", help="Only events of this sandbox.")
    ] = None,
    type_: Annotated[
        str | None,
        typer.Option("--type", metavar="PREFIX", help="Only types starting so (checkpoint.)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="WHEN", help="Only events since 1h/2d ago or an ISO time."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until interrupted.")
    ] = False,
    store: StoreOption = None,
) -> None:
    """Print the event log, oldest first: time, type, sandbox and a short payload summary.

    With --json: one object per line (seq, time, time_ns, type, sandbox, payload).
    """
    since_ns = parse_since(since) if since else None
    session = Session(store)
    index = session.store.index
    after = 0
    try:
        while True:
            rows = index.ops_events(
                after=after, type_prefix=type_, sandbox=sandbox, since_ns=since_ns, limit=PAGE
            )
            for e in rows:
                typer.echo(render(e, as_json))
            if rows:
                after = rows[-1].seq
                if len(rows) == PAGE:
                    continue
            if not follow:
                return
            sys.stdout.flush()
            time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        return
    finally:
        session.close()
