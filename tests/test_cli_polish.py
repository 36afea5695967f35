"""The command line as a whole: every command's --help shows examples, every listing has a
--json form with a fixed shape, and the long-running core operations report progress (which
the CLI draws as transient bars on a terminal)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import typer
from coreutil import Core, open_core
from typer.testing import CliRunner

from artifactfs.cli import progress as cli_progress
from artifactfs.cli.main import app
from artifactfs.core.grid import find_namespace, parse_grid_path
from artifactfs.core.portable import export_checkpoint, import_checkpoint
from artifactfs.core.restore import restore
from artifactfs.core.verify import verify_tree

AFS = str(Path(sys.executable).parent / "artifactfs")
WS = "acme/user-alice/proj"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AFS, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def ok(*args: str) -> str:
    res = run(*args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    return res.stdout


# ---- --help ------------------------------------------------------------------------------------


def command_paths() -> list[tuple[str, ...]]:
    """Every command and group the app registers, walked from the root (so a command added
    later without examples fails the test below)."""
    paths: list[tuple[str, ...]] = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        paths.append(path)
        # A group has subcommands (typer vendors click, so no isinstance on click.Group).
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


def test_the_walk_sees_every_command() -> None:
    paths = {" ".join(p) for p in command_paths()}
    expected = {
        "", "init", "mount", "umount", "sync", "gc", "fsck", "stats", "log",
        "checkpoint", "credential", "credential issue", "credential list", "credential revoke",
    } | {f"checkpoint {c}" for c in
         ("create", "list", "diff", "restore", "delete", "verify", "export", "import")}  # fmt: skip
    assert expected <= paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "artifactfs")
def test_help_shows_examples_of_the_command(path: tuple[str, ...]) -> None:
    # Wide enough that rich does not wrap an example line in the middle.
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    assert "Examples:" in res.output
    # The examples run the command being described, as a user would type it.
    assert " ".join(("  artifactfs", *path)) in res.output, res.output


def test_help_keeps_example_lines_apart() -> None:
    res = CliRunner().invoke(app, ["checkpoint", "list", "--help"], env={"COLUMNS": "240"})
    lines = [ln.strip() for ln in res.output.splitlines()]
    assert "artifactfs checkpoint list acme/user-alice/proj" in lines


# ---- --json ------------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    async with open_core(path) as core:
        await core.makedirs(f"{WS}/src")
        await core.write_file(f"{WS}/src/main.py", b"print('v1')\n")
        await core.write_file(f"{WS}/big", os.urandom(3 * core.bs + 5))
        ns = find_namespace(core.store.index, WS)
        await core.fs.checkpoints.create(ns, "base", "test")
        await core.write_file(f"{WS}/src/main.py", b"print('v2')\n")
        await core.write_file(f"{WS}/new", b"new file")
    return path


async def test_checkpoint_listings_as_json(store: Path) -> None:
    s = ("--store", str(store))
    rows = json.loads(ok("checkpoint", "list", WS, "--json", *s))
    assert [r["name"] for r in rows] == ["base"]
    assert set(rows[0]) == {
        "name", "created", "created_ns", "creator", "files", "bytes", "manifest_bytes", "root",
    }  # fmt: skip
    assert rows[0]["files"] == 2 and rows[0]["creator"] == "test" and len(rows[0]["root"]) == 64

    changes = json.loads(ok("checkpoint", "diff", WS, "base", "--json", *s))
    assert sorted((c["path"], c["kind"]) for c in changes) == [
        ("new", "added"), ("src/main.py", "modified"),
    ]  # fmt: skip

    result = json.loads(ok("checkpoint", "verify", WS, "base", "--json", *s))
    assert set(result) == {
        "namespace", "checkpoint", "clean", "manifests", "blocks", "block_bytes", "files",
        "findings",
    }  # fmt: skip
    assert result["clean"] is True and result["findings"] == [] and result["files"] == 2
    assert result["namespace"] == WS and result["checkpoint"] == "base"


async def test_verify_json_lists_findings_and_still_fails(store: Path) -> None:
    s = ("--store", str(store))
    root = json.loads(ok("checkpoint", "list", WS, "--json", *s))[0]["root"]
    blob = store / "blobs" / "sha256" / root[:2] / root[2:4] / root
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes() + b"x")
    res = run("checkpoint", "verify", WS, "base", "--json", *s)
    assert res.returncode == 4, res.stderr
    result = json.loads(res.stdout)
    assert result["clean"] is False
    [finding] = result["findings"]
    assert finding == {
        "kind": "corrupt-manifest", "digest": root, "paths": ["."], "more": 0,
        "detail": "does not match its digest",
    }  # fmt: skip
    assert "listed in the JSON" in res.stderr


async def test_fsck_json_lists_findings_with_the_exit_status(store: Path) -> None:
    s = ("--store", str(store))
    clean = json.loads(ok("fsck", "--json", *s))
    assert clean["clean"] is True and clean["findings"] == [] and clean["left"] == 0
    assert clean["verified"] is None and clean["bucket_objects"] is None
    assert clean["inodes"] > 0 and clean["blobs"] > 0 and clean["checkpoints"] == 1
    root = json.loads(ok("checkpoint", "list", WS, "--json", *s))[0]["root"]
    (store / "blobs" / "sha256" / root[:2] / root[2:4] / root).unlink()
    res = run("fsck", "--json", "--verify", *s)
    assert res.returncode == 4, res.stderr
    result = json.loads(res.stdout)
    assert result["clean"] is False and result["left"] == 1 and result["repaired"] == 0
    assert result["verified"] == result["blobs"]
    [finding] = result["findings"]
    assert finding["kind"] == "broken-manifest" and root in finding["message"]
    assert finding["repairable"] is False and finding["repaired"] is False
    assert "1 problem(s) left" in res.stderr


async def test_credential_list_and_log_as_json_lines(store: Path, tmp_path: Path) -> None:
    s = ("--store", str(store))
    run("credential", "issue", "--sandbox", "acme", "--user", "alice", "--session", "s1",
        "-o", str(tmp_path / "alice.cred"), *s)  # fmt: skip
    lines = ok("credential", "list", "--json", *s).splitlines()
    assert len(lines) == 1
    cred = json.loads(lines[0])
    assert set(cred) == {
        "id", "sandbox", "user", "session", "grants", "issued_ns", "expires_ns", "revoked_ns",
        "issuer", "state",
    }  # fmt: skip
    assert (cred["sandbox"], cred["user"], cred["session"], cred["state"]) == (
        "acme", "alice", "s1", "active",
    )  # fmt: skip
    assert cred["grants"] == {"shared": "rw", "user": "rw"} and cred["revoked_ns"] is None
    ok("credential", "revoke", cred["id"], *s)
    assert json.loads(ok("credential", "list", "--json", *s))["state"] == "revoked"

    events = [json.loads(ln) for ln in ok("log", "--json", *s).splitlines()]
    assert events and all(
        set(e) == {"seq", "time", "time_ns", "type", "sandbox", "payload"} for e in events
    )
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    types = [e["type"] for e in events]
    assert "checkpoint.create" in types and types[-2:] == ["credential.issue", "credential.revoke"]
    create = events[types.index("checkpoint.create")]
    assert create["sandbox"] == "acme" and create["payload"]["name"] == "base"


async def test_stats_json(store: Path) -> None:
    stats = json.loads(ok("stats", "--json", "--store", str(store)))
    assert stats["namespaces"] >= 1 and stats["checkpoints"] == 1


# ---- progress ----------------------------------------------------------------------------------


class Recorder:
    """A progress callback that keeps every call, summed per phase."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []

    def __call__(self, phase: str, n: int, total: int | None) -> None:
        self.calls.append((phase, n, total))

    def done(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for phase, n, _ in self.calls:
            out[phase] += n
        return dict(out)

    def totals(self, phase: str) -> set[int | None]:
        return {t for p, _, t in self.calls if p == phase}


async def fill(core: Core) -> None:
    for d in ("a", "b/c", "b/d"):
        await core.makedirs(f"{WS}/{d}")
    await core.write_file(f"{WS}/a/one", os.urandom(2 * core.bs + 7))
    await core.write_file(f"{WS}/b/c/two", os.urandom(core.bs))
    await core.write_file(f"{WS}/b/d/three", b"3" * 100)
    await core.write_file(f"{WS}/b/d/same", b"3" * 100)  # the same content: checked once


async def test_create_and_verify_report_progress(tmp_path: Path) -> None:
    async with open_core(tmp_path / "store") as core:
        await fill(core)
        ns = find_namespace(core.store.index, WS)
        made = Recorder()
        row = await core.fs.checkpoints.create(ns, "one", "test", progress=made)
        # The root, a, b, b/c, b/d: all dirty in a first checkpoint.
        assert made.done() == {"scan": 5, "encode": 5}
        assert made.totals("encode") == {5}

        checked = Recorder()
        report = await verify_tree(core.io, row.root, progress=checked)
        assert report.clean
        size = 2 * core.bs + 7 + core.bs + 100  # distinct contents
        assert checked.done() == {"manifests": 5, "files": size}
        assert checked.totals("files") == {size} and checked.totals("manifests") == {None}


async def test_export_import_restore_report_progress(tmp_path: Path) -> None:
    file = tmp_path / "proj.afsckpt"
    async with open_core(tmp_path / "src") as core:
        await fill(core)
        ns = find_namespace(core.store.index, WS)
        row = await core.fs.checkpoints.create(ns, "one", "test")
        exported = Recorder()
        result = await export_checkpoint(
            core.fs.checkpoints, ns, "one", file, actor="test", progress=exported
        )
        assert exported.done() == {"manifests": result.manifests, "blocks": result.block_bytes}
        assert exported.totals("blocks") == {row.bytes}

        # Restore over a changed tree: only the directories that differ are walked.
        await core.write_file(f"{WS}/b/c/two", b"changed")
        await core.makedirs(f"{WS}/b/e")
        restored = Recorder()
        await restore(core.fs.checkpoints, ns, row.root, actor="test", progress=restored)
        # The root, b and b/c (a and b/d are clean and equal; b/e just goes).
        assert restored.done()["apply"] == 3 and restored.totals("apply") == {3}

    async with open_core(tmp_path / "dst") as core:
        imported = Recorder()
        await import_checkpoint(
            core.fs, file, parse_grid_path("beta/shared/copy"), actor="test",
            caller=core.caller, progress=imported,
        )  # fmt: skip
        done = imported.done()
        items = done["check"]
        assert items == done["store"] > 2 * core.bs  # both passes read every item
        assert imported.totals("check") == imported.totals("store") == {file.stat().st_size}
        assert items <= file.stat().st_size
        # Into a new namespace every directory is created: 5 directories, 5 manifests.
        assert done["load"] == 5 and done["apply"] == 5 and imported.totals("apply") == {5}


def test_phases_draw_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with cli_progress.phases({"x": "x"}) as progress:
        assert progress is None  # stderr is a pipe under pytest

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    labels = {"check": "checking the file", "load": "reading manifests"}
    with cli_progress.phases(labels, byte_phases={"check"}) as progress:
        assert progress is not None
        progress("check", 5_000_000, 10_000_000)
        progress("load", 3, None)
    out = term.getvalue()
    assert "checking the file" in out and "5.0/10.0 MB" in out
    assert "reading manifests" in out and "3/?" in out


def with_terminal_stderr(argv: list[str]) -> tuple[int, str, bytes]:
    """Run `artifactfs argv` with stderr on a pseudo-terminal (read as it is written, so a
    full pty buffer never blocks the command). Returns (status, stdout, terminal bytes)."""
    master, slave = pty.openpty()
    drawn = b""
    try:
        proc = subprocess.Popen(
            [AFS, *argv], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        os.close(slave)
        while True:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
    return proc.returncode, stdout, drawn


async def test_bars_on_a_terminal_never_touch_stdout(store: Path, tmp_path: Path) -> None:
    s = ("--store", str(store))
    file = tmp_path / "proj.afsckpt"
    commands = [
        ("checkpoint", "verify", WS, "base", *s),
        ("checkpoint", "export", WS, "base", str(file), *s),
        ("checkpoint", "restore", WS, "base", "--yes", *s),
        ("checkpoint", "import", str(file), "beta/shared/copy", *s),
    ]
    labels = [b"verifying files", b"exporting blocks", b"restoring directories",
              b"checking the file"]  # fmt: skip
    for argv, label in zip(commands, labels, strict=True):
        status, stdout, drawn = with_terminal_stderr(list(argv))
        assert status == 0, drawn
        assert label in drawn  # the bar's last frame, before it is erased
        assert "\x1b" not in stdout and stdout.count("\n") == 1, stdout
