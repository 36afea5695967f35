"""`artifactfs checkpoint ...` driven as a user drives it: the real command in a subprocess, on
a store whose namespaces the core tier fills in between the commands."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from coreutil import open_core

from artifactfs.core.grid import find_namespace

AFS = str(Path(sys.executable).parent / "artifactfs")
WS = "acme/user-alice/proj"


def run(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AFS, *args], capture_output=True, text=True, timeout=120, stdin=stdin
    )


def ok(*args: str) -> str:
    res = run(*args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    return res.stdout


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("artifactfs: error:"), res.stderr
    return lines[0]


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    async with open_core(path) as core:
        await core.makedirs(f"{WS}/src")
        await core.write_file(f"{WS}/src/main.py", b"print('v1')\n")
        await core.write_file(f"{WS}/big", os.urandom(3 * core.bs + 5))
        await core.write_file(f"{WS}/old", b"to be removed")
    return path


async def edit(store: Path) -> None:
    """Change the live namespace: one file modified, one added, one removed, one type-changed."""
    async with open_core(store) as core:
        await core.write_file(f"{WS}/src/main.py", b"print('v2')\n")
        await core.write_file(f"{WS}/new", b"new file")
        parent = await core.resolve(WS)
        await core.fs.unlink(parent, b"old", core.caller)
        await core.fs.unlink(parent, b"big", core.caller)
        await core.makedirs(f"{WS}/big")


async def read(store: Path, path: str) -> bytes:
    async with open_core(store) as core:
        return await core.read_file(path)


@pytest.mark.parametrize(
    "cmd", ["create", "list", "diff", "restore", "delete", "verify", "export", "import"]
)
def test_help(cmd: str) -> None:
    res = run("checkpoint", cmd, "--help")
    assert res.returncode == 0 and "Examples:" in res.stdout
    assert f"artifactfs checkpoint {cmd} " in res.stdout


async def test_create_list_diff_restore_delete(store: Path) -> None:
    s = ("--store", str(store))
    out = ok("checkpoint", "create", WS, "base", *s)
    assert "created checkpoint base of acme/user-alice/proj" in out and "3 files" in out
    listed = ok("checkpoint", "list", WS, *s)
    assert listed.splitlines()[0].split() == ["NAME", "CREATED", "SIZE", "FILES"]
    assert listed.splitlines()[1].split()[0] == "base"
    rows = json.loads(ok("checkpoint", "list", WS, "--json", *s))
    assert [(r["name"], r["files"], r["bytes"]) for r in rows] == [
        ("base", 3, len(b"print('v1')\n") + 3 * 4096 + 5 + len(b"to be removed"))
    ]
    assert set(rows[0]) >= {"created", "created_ns", "creator", "manifest_bytes", "root"}

    assert ok("checkpoint", "diff", WS, "base", *s) == ""
    await edit(store)
    lines = ok("checkpoint", "diff", WS, "base", *s).splitlines()
    assert {"T big", "M src/main.py", "A new", "D old"} <= set(lines)
    changes = json.loads(ok("checkpoint", "diff", WS, "base", "--json", *s))
    assert {"path": "new", "kind": "added"} in changes
    assert {"path": "big", "kind": "type-changed"} in changes

    # A second checkpoint, and a diff between the two.
    ok("checkpoint", "create", WS, "edited", *s)
    between = ok("checkpoint", "diff", WS, "base", "edited", *s).splitlines()
    assert between == lines

    # Restore: refused without --yes when there is no terminal to ask on.
    msg = one_line_error(run("checkpoint", "restore", WS, "base", *s))
    assert "--yes" in msg
    assert await read(store, f"{WS}/src/main.py") == b"print('v2')\n"
    out = ok("checkpoint", "restore", WS, "base", "--yes", *s)
    assert "restored acme/user-alice/proj to checkpoint base" in out
    assert await read(store, f"{WS}/src/main.py") == b"print('v1')\n"
    assert await read(store, f"{WS}/old") == b"to be removed"
    assert ok("checkpoint", "diff", WS, "base", *s) == ""

    ok("checkpoint", "delete", WS, "edited", *s)
    assert [r["name"] for r in json.loads(ok("checkpoint", "list", WS, "--json", *s))] == [
        "base"
    ]


async def test_namespace_by_public_id(store: Path) -> None:
    async with open_core(store) as core:
        ns = find_namespace(core.store.index, WS)
        xattr = await core.fs.getxattr(await core.resolve(WS), b"user.artifactfs.namespace")
    assert xattr.decode() == ns.public_id
    out = ok("checkpoint", "create", ns.public_id, "by-id", "--store", str(store))
    assert "of acme/user-alice/proj" in out
    assert "by-id" in ok("checkpoint", "list", WS, "--store", str(store))


async def test_restore_of_unchanged_namespace_asks_nothing(store: Path) -> None:
    s = ("--store", str(store))
    ok("checkpoint", "create", WS, "base", *s)
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\n")
        res = run("checkpoint", "restore", WS, "base", *s, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    # Nothing differs: nothing to ask about, nothing changed.
    assert res.returncode == 0, res.stderr
    assert "Restore" not in res.stdout and "0 changes" in res.stdout


async def test_restore_declined_on_a_terminal(store: Path) -> None:
    s = ("--store", str(store))
    ok("checkpoint", "create", WS, "base", *s)
    await edit(store)
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\n")
        res = run("checkpoint", "restore", WS, "base", *s, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert "Restore acme/user-alice/proj to checkpoint base" in res.stdout
    assert "nothing was restored" in one_line_error(res)
    assert await read(store, f"{WS}/src/main.py") == b"print('v2')\n"


async def test_one_line_errors(store: Path, tmp_path: Path) -> None:
    s = ("--store", str(store))
    ok("checkpoint", "create", WS, "base", *s)
    msg = one_line_error(run("checkpoint", "list", "acme/user-alice/nope", *s))
    assert "no namespace acme/user-alice/nope" in msg and "SANDBOX/SCOPE/NAME" in msg
    msg = one_line_error(run("checkpoint", "list", "0123abcd", *s))
    assert "no namespace with id" in msg
    msg = one_line_error(run("checkpoint", "create", WS, "base", *s))
    assert "already exists" in msg and "checkpoint delete" in msg
    msg = one_line_error(run("checkpoint", "create", WS, "a/b", *s))
    assert "checkpoint name" in msg
    for cmd in (["restore", WS, "nope", "--yes"], ["delete", WS, "nope"],
                ["verify", WS, "nope"], ["diff", WS, "nope"], ["diff", WS, "base", "nope"],
                ["export", WS, "nope", str(tmp_path / "x")]):
        msg = one_line_error(run("checkpoint", *cmd, *s))
        assert "no checkpoint 'nope' in acme/user-alice/proj" in msg, cmd
        assert "checkpoint list" in msg
    msg = one_line_error(run("checkpoint", "list", WS, "--store", str(tmp_path / "nostore")))
    assert "no artifactfs store" in msg
    msg = one_line_error(run("checkpoint", "import", str(tmp_path / "x"), "acme/bad", *s))
    assert "SANDBOX/SCOPE/NAME" in msg
    msg = one_line_error(run("checkpoint", "import", str(tmp_path / "x"), "acme/shared/y", *s))
    assert "does not exist" in msg


async def test_verify_finds_corrupt_block_and_manifest(store: Path) -> None:
    s = ("--store", str(store))
    ok("checkpoint", "create", WS, "base", *s)
    out = ok("checkpoint", "verify", WS, "base", *s)
    assert "is intact" in out
    root = bytes.fromhex(json.loads(ok("checkpoint", "list", WS, "--json", *s))[0]["root"])

    def blob(digest: bytes) -> Path:
        h = digest.hex()
        return store / "blobs" / "sha256" / h[:2] / h[2:4] / h

    def corrupt(digest: bytes) -> None:
        path = blob(digest)
        os.chmod(path, 0o644)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))

    top = cbor2.loads(blob(root).read_bytes())
    big_block = top["entries"][b"big"]["blocks"][1][1]
    src_manifest = top["entries"][b"src"]["m"]
    corrupt(big_block)
    res = run("checkpoint", "verify", WS, "base", *s)
    assert res.returncode != 0
    assert "damaged" in one_line_error(res)
    assert res.stdout.splitlines() == [f"corrupt-block {big_block.hex()} at big: "
                                       "does not match its digest"]
    corrupt(src_manifest)
    res = run("checkpoint", "verify", WS, "base", *s)
    assert "2 problem(s)" in one_line_error(res)
    assert f"corrupt-manifest {src_manifest.hex()} at src: does not match its digest" in (
        res.stdout.splitlines()
    )


async def test_export_import(store: Path, tmp_path: Path) -> None:
    s = ("--store", str(store))
    ok("checkpoint", "create", WS, "base", *s)
    file = tmp_path / "proj.afsckpt"
    out = ok("checkpoint", "export", WS, "base", str(file), *s)
    assert "exported checkpoint base" in out and file.is_file()
    other = tmp_path / "other"
    ok("init", str(other), "--block-size", "4096")
    o = ("--store", str(other))
    out = ok("checkpoint", "import", str(file), "beta/shared/proj", *o)
    assert "imported checkpoint base as beta/shared/proj" in out
    assert await read(other, "beta/shared/proj/src/main.py") == b"print('v1')\n"
    assert [r["name"] for r in json.loads(ok("checkpoint", "list", "beta/shared/proj", "--json",
                                             *o))] == ["base"]
    assert "is intact" in ok("checkpoint", "verify", "beta/shared/proj", "base", *o)
    assert ok("checkpoint", "diff", "beta/shared/proj", "base", *o) == ""
    # Into an existing namespace: refused.
    msg = one_line_error(run("checkpoint", "import", str(file), "beta/shared/proj", *o))
    assert "beta/shared/proj already exists" in msg
    # An existing file is not overwritten by export.
    msg = one_line_error(run("checkpoint", "export", WS, "base", str(file), *s))
    assert "already exists" in msg
    # A tampered file: refused, nothing imported.
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    msg = one_line_error(run("checkpoint", "import", str(file), "beta/shared/copy", *o))
    assert "damaged" in msg and "nothing was imported" in msg
    msg = one_line_error(run("checkpoint", "list", "beta/shared/copy", *o))
    assert "no namespace" in msg
