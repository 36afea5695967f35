"""Forward migrations: version N -> N+1, one function each, applied in order at open.

A database newer than this code refuses to open (StoreTooNew); never downgrade.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from artifactfs.blobs.journal import journal_dir, write_segment
from artifactfs.errors import StoreTooNew
from artifactfs.index.schema import (
    SCHEMA_V1,
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_V4,
    SCHEMA_V5,
    SCHEMA_VERSION,
)


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the migration's transaction first; run statement by
    # statement instead so a step is all-or-nothing.
    stmt = ""
    for line in script.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):
            conn.execute(stmt)
            stmt = ""
    if stmt.strip():
        raise ValueError(f"incomplete SQL statement in migration: {stmt!r}")


def _to_v1(conn: sqlite3.Connection) -> None:
    _run_script(conn, SCHEMA_V1)


def _to_v2(conn: sqlite3.Connection) -> None:
    _run_script(conn, SCHEMA_V2)


def _to_v3(conn: sqlite3.Connection) -> None:
    _run_script(conn, SCHEMA_V3)


def _to_v4(conn: sqlite3.Connection) -> None:
    _run_script(conn, SCHEMA_V4)


def _to_v5(conn: sqlite3.Connection) -> None:
    # The journalled blocks go to a segment nobody owns, made durable before the table is
    # dropped; a crash in between leaves both, and the blocks are stored twice (a no-op).
    rows = [(bytes(d), bytes(v)) for d, v in conn.execute("SELECT digest, data FROM pending_blobs")]
    if rows:
        main = next(r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main")
        write_segment(journal_dir(Path(main).parent), rows)
    _run_script(conn, SCHEMA_V5)


# MIGRATIONS[n] moves a database from version n to n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _to_v1,
    1: _to_v2,
    2: _to_v3,
    3: _to_v4,
    4: _to_v5,
}


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring `conn` to `target`, one step per transaction. Returns the starting version."""
    start = schema_version(conn)
    if start > SCHEMA_VERSION:
        raise StoreTooNew(
            f"the store's index has schema version {start}, this artifactfs knows up to "
            f"{SCHEMA_VERSION}: upgrade artifactfs"
        )
    version = start
    while version < target:
        step = MIGRATIONS[version]
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1
    return start
