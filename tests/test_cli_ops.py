"""`artifactfs gc | fsck | stats | log` driven as a user drives them: the real command in a
subprocess, on a store the core tier fills in."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from coreutil import open_core, workspace

from artifactfs.core.grid import find_namespace
from artifactfs.store import Store

AFS = str(Path(sys.executable).parent / "artifactfs")
WS = "acme/shared/ws"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AFS, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    async with open_core(path) as core:
        await workspace(core, WS)
        await core.write_file(f"{WS}/a", b"alpha" * 100)
        await core.write_file(f"{WS}/b", os.urandom(3 * core.bs))
        ns = find_namespace(core.store.index, WS)
        await core.fs.checkpoints.create(ns, "one", "test")
        await workspace(core, "beta/shared/other")
        await core.io.drained()
        await core.fs.retire_journal()
    return path


def put_orphan(path: Path, size: int = 1000) -> bytes:
    data = os.urandom(size)
    digest = hashlib.sha256(data).digest()
    store = Store(path)
    store.backend.put(digest, data)
    store.close()
    return digest


def has(path: Path, digest: bytes) -> bool:
    store = Store(path)
    try:
        return store.backend.has(digest)
    finally:
        store.close()


async def test_gc_dry_run_then_gc(store: Path) -> None:
    orphan = put_orphan(store)
    res = run("gc", "--store", str(store), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.strip() == "gc would free 0 blobs (0 B), 0 expired sessions; kept 1 "
        "younger than the grace period"
    )
    res = run("gc", "--store", str(store), "--dry-run", "--grace", "0s")
    assert res.stdout.startswith("gc would free 1 blob (1000 B), 0 expired sessions")
    assert has(store, orphan)
    res = run("gc", "--store", str(store), "--grace", "0")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.startswith("gc freed 1 blob (1000 B)")
    assert not has(store, orphan)
    res = run("gc", "--store", str(store), "--grace", "soon")
    assert res.returncode != 0 and "is not a duration" in res.stderr
    # the run is in the log
    res = run("log", "--store", str(store), "--type", "gc.", "--json")
    (event,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert event["type"] == "gc.run" and event["payload"]["blobs"] == 1


async def test_fsck_findings_and_exit_codes(store: Path) -> None:
    res = run("fsck", "--store", str(store), "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("clean: ")
    put_orphan(store)
    res = run("fsck", "--store", str(store))
    assert res.returncode == 4
    assert res.stdout.startswith("orphan-blob: ")
    assert res.stderr.strip() == "artifactfs: error: 1 problem(s) left"
    # A wrong link count: repairable, so --repair exits 1 and the next run is clean again
    # (the orphan is young: left alone, still reported).
    s = Store(store)
    with s.index.txn():
        s.index.conn.execute(
            "UPDATE inodes SET nlink = 9 WHERE id = (SELECT inode FROM "
            "dentries WHERE name = CAST('a' AS BLOB))"
        )
    s.close()
    res = run("fsck", "--store", str(store))
    assert res.returncode == 4 and "wrong-nlink: " in res.stdout
    assert "run with --repair to fix 1" in res.stderr
    res = run("fsck", "--store", str(store), "--repair", "--grace", "0s")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[repaired]" in res.stdout
    assert run("fsck", "--store", str(store)).returncode == 0
    # A missing block: named, not repairable.
    s = Store(store)
    digest = hashlib.sha256(b"alpha" * 100).digest()
    s.backend.delete(digest)
    s.close()
    res = run("fsck", "--store", str(store), "--repair")
    assert res.returncode == 4
    assert f"missing-blob: blob {digest.hex()}" in res.stdout and f"{WS}/a" in res.stdout
    assert f"{WS}@one" in res.stdout


async def test_stats_json(store: Path) -> None:
    res = run("stats", "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["namespaces"] == 2 and out["sandboxes"] == 2 and out["files"] == 2
    assert out["logical_bytes"] == 500 + 3 * 4096 and out["checkpoints"] == 1
    assert {(s["sandbox"], s["scope"]) for s in out["scopes"]} == {
        ("acme", "shared"),
        ("beta", "shared"),
    }
    res = run("stats", "--store", str(store))
    assert res.returncode == 0 and "dedup ratio" in res.stdout


async def test_log_filters(store: Path) -> None:
    res = run("log", "--store", str(store))
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and "store.init" in lines[0]
    assert any("namespace.create" in ln and "beta" in ln for ln in lines)
    res = run("log", "--store", str(store), "--sandbox", "beta", "--json")
    events = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert events and all(e["sandbox"] == "beta" for e in events)
    res = run("log", "--store", str(store), "--type", "checkpoint.", "--json")
    (cp,) = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert cp["type"] == "checkpoint.create" and len(cp["payload"]["root"]) == 64
    everything = run("log", "--store", str(store)).stdout
    assert run("log", "--store", str(store), "--since", "1h").stdout == everything
    assert run("log", "--store", str(store), "--since", "2999-01-01").stdout == ""
    bad = run("log", "--store", str(store), "--since", "yesterday-ish")
    assert bad.returncode != 0 and "neither a duration" in bad.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_log_follow(store: Path) -> None:
    proc = subprocess.Popen(
        [AFS, "log", "--store", str(store), "--follow", "--type", "gc."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as at a terminal: a suite started in the background by a non-interactive
        # shell (`./.ci/run &`) inherits SIGINT ignored, and so would the command.
        preexec_fn=_default_sigint,
    )
    try:
        time.sleep(1.5)
        assert run("gc", "--store", str(store)).returncode == 0
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"gc.run" not in out:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                out += os.read(fd, 65536)
        assert b"gc.run" in out
        assert out.count(b"\n") == 1  # only the new event (none before it matched)
        assert proc.poll() is None  # still following
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # never left running, whatever failed
            proc.wait()
            raise
    assert code == 0
