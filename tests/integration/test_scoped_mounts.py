"""Scoped mounts: credentials, what each mount sees, refusals, expiry and revocation while
mounted, and many mounts of one store seeing each other's changes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mountutil
import pytest

ARTIFACTFS = str(mountutil.ARTIFACTFS)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [ARTIFACTFS, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"artifactfs {' '.join(args)}: {result.stderr}")
    return result


def issue(store: Path, out: Path, user: str, session: str, *extra: str) -> Path:
    cli("credential", "issue", "--store", str(store), "--sandbox", "acme", "--user", user,
        "--session", session, "-o", str(out), *extra)
    return out


@contextlib.contextmanager
def scoped(store: Path, where: Path, cred: Path) -> Iterator[mountutil.Mount]:
    where.mkdir(exist_ok=True)
    with mountutil.mounted(store, where, init=False, extra_args=["--credential", str(cred)]) as m:
        yield m


@pytest.fixture
def grid(mnt: mountutil.Mount, tmp_path: Path) -> mountutil.Mount:
    """An administrative mount with a small grid: two sandboxes, shared data, two users."""
    root = mnt.mountpoint
    for d in ("acme/shared/data", "acme/user-alice/proj", "acme/user-bob/secret",
              "other/shared/x"):
        (root / d).mkdir(parents=True)
    (root / "acme/shared/data/f").write_text("shared data\n")
    (root / "acme/user-bob/secret/key").write_text("bob only\n")
    (root / "other/shared/x/y").write_text("other sandbox\n")
    return mnt


def test_two_credentials_side_by_side(grid: mountutil.Mount, tmp_path: Path) -> None:
    store = grid.store
    alice = issue(store, tmp_path / "alice.cred", "alice", "a1")
    bob = issue(store, tmp_path / "bob.cred", "bob", "b1", "--shared", "ro")
    base = grid.mountpoint.parent
    with scoped(store, base / "alice", alice) as ma, scoped(store, base / "bob", bob) as mb:
        a, b = ma.mountpoint, mb.mountpoint
        assert os.listdir(a) == ["acme"]
        assert sorted(os.listdir(a / "acme")) == ["sess-a1", "shared", "user-alice"]
        assert sorted(os.listdir(b / "acme")) == ["sess-b1", "shared", "user-bob"]
        found = subprocess.run(["find", str(a)], capture_output=True, text=True).stdout
        assert "user-bob" not in found and "other" not in found and "sess-b1" not in found
        assert "shared/data/f" in found
        # Exact paths to what is not granted are ENOENT, as if they did not exist.
        for hidden in ("other", "other/shared/x/y", "acme/user-bob/secret/key", "acme/sess-b1"):
            with pytest.raises(FileNotFoundError):
                os.stat(a / hidden)
        listed = subprocess.run(["ls", "-la", str(a / "acme/sess-a1/..")],
                                capture_output=True, text=True).stdout
        assert "user-bob" not in listed and "user-alice" in listed
        # Each writes its own session; bob's shared grant is read-only.
        (a / "acme/sess-a1/work").mkdir()
        (a / "acme/sess-a1/work/out").write_text("alice's")
        (a / "acme/shared/data/from-alice").write_text("hello bob\n")
        with pytest.raises(OSError) as exc:
            (b / "acme/shared/data/from-bob").write_text("no")
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        # Nor through symlinks the kernel resolves, renames or hard links into hidden places.
        os.symlink("../../user-bob/secret/key", a / "acme/sess-a1/work/peek")
        with pytest.raises(FileNotFoundError):
            (a / "acme/sess-a1/work/peek").read_text()
        with pytest.raises(FileNotFoundError):
            os.rename(a / "acme/sess-a1/work/out", a / "acme/user-bob/stolen")
        with pytest.raises(FileNotFoundError):
            os.link(a / "acme/sess-a1/work/out", a / "acme/sess-b1/planted")
        # A credential cannot make scopes or sandboxes.
        for d in (a / "acme/user-eve", a / "newsandbox"):
            with pytest.raises(PermissionError):
                d.mkdir()
        # Alice's write is visible to bob (shared) within a second, cache or not.
        assert (b / "acme/shared/data/f").read_text() == "shared data\n"
        (a / "acme/shared/data/f").write_text("changed by alice\n")
        deadline = time.monotonic() + 1.0
        while (b / "acme/shared/data/f").read_text() != "changed by alice\n":
            assert time.monotonic() < deadline, "a change took more than 1 s to reach bob"
            time.sleep(0.05)
        assert (b / "acme/shared/data/from-alice").read_text() == "hello bob\n"
        # Deleting in one mount makes it vanish in the other.
        assert (b / "acme/shared/data/from-alice").exists()
        os.unlink(a / "acme/shared/data/from-alice")
        deadline = time.monotonic() + 1.0
        while (b / "acme/shared/data/from-alice").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_refused_credentials(grid: mountutil.Mount, tmp_path: Path) -> None:
    store = grid.store
    mnt = grid.mountpoint.parent / "refused"
    mnt.mkdir()
    good = issue(store, tmp_path / "good.cred", "alice", "a1")
    text = good.read_text()
    token = text.split('"token": "')[1].split('"')[0]
    sig = token.split(".")[2]
    tampered = tmp_path / "tampered.cred"
    tampered.write_text(text.replace(sig, sig[:-4] + ("AAAA" if sig[-4:] != "AAAA" else "BBBB")))
    expired = issue(store, tmp_path / "expired.cred", "alice", "a2", "--ttl", "1s")
    revoked = issue(store, tmp_path / "revoked.cred", "alice", "a3")
    cli("credential", "revoke", _cred_id(store, "a3"), "--store", str(store))
    other_store = tmp_path / "other-store"
    cli("init", str(other_store))
    foreign = issue(other_store, tmp_path / "foreign.cred", "alice", "a1")
    time.sleep(1.2)
    for cred, message in (
        (tampered, "signature does not match"),
        (expired, "expired at"),
        (revoked, "was revoked"),
        (foreign, "not by this store"),
    ):
        result = cli("mount", str(store), str(mnt), "--credential", str(cred), check=False)
        assert result.returncode != 0, cred
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (cred, result.stderr)
        assert not mountutil.is_mounted(mnt)


def _cred_id(store: Path, session: str) -> str:
    out = cli("credential", "list", "--json", "--store", str(store)).stdout
    line = next(ln for ln in out.splitlines() if f'"session": "{session}"' in ln)
    return line.split('"id": "')[1].split('"')[0]


def test_expiry_while_mounted(grid: mountutil.Mount, tmp_path: Path) -> None:
    store = grid.store
    ttl = 6
    short = issue(store, tmp_path / "short.cred", "alice", "s1", "--ttl", f"{ttl}s")
    issued = time.monotonic()
    with scoped(store, grid.mountpoint.parent / "short", short) as ms:
        f = ms.mountpoint / "acme/sess-s1/f"
        held = open(f, "w")  # noqa: SIM115 - kept open across the expiry on purpose
        try:
            held.write("before")
            held.flush()
            while True:
                try:
                    (ms.mountpoint / "acme/sess-s1/probe").write_text("x")
                except PermissionError:
                    break
                assert time.monotonic() < issued + ttl + 5, "writes accepted 5 s after expiry"
                time.sleep(0.2)
            with pytest.raises(PermissionError):
                held.write("after")
                held.flush()
        finally:
            with contextlib.suppress(OSError):
                held.close()
        assert f.read_text() == "before"  # its own session stays readable until unmount
    # Anyone else (the administrative mount too) no longer sees the expired session.
    assert "sess-s1" not in os.listdir(grid.mountpoint / "acme")


def test_revocation_while_mounted(grid: mountutil.Mount, tmp_path: Path) -> None:
    store = grid.store
    cred = issue(store, tmp_path / "c.cred", "alice", "s2")
    with scoped(store, grid.mountpoint.parent / "rev", cred) as m:
        (m.mountpoint / "acme/sess-s2/ok").write_text("fine")
        cli("credential", "revoke", _cred_id(store, "s2"), "--store", str(store))
        deadline = time.monotonic() + 5
        while True:
            try:
                (m.mountpoint / "acme/sess-s2/again").write_text("x")
            except PermissionError:
                break
            assert time.monotonic() < deadline, "writes still accepted 5 s after revocation"
            time.sleep(0.2)
        assert (m.mountpoint / "acme/sess-s2/ok").read_text() == "fine"
    result = cli("mount", str(store), str(tmp_path), "--credential", str(cred), check=False)
    assert result.returncode != 0 and "was revoked" in result.stderr


def test_non_root_uid_through_allow_other(grid: mountutil.Mount, tmp_path: Path) -> None:
    store = grid.store
    cred = issue(store, tmp_path / "c.cred", "alice", "u1")
    base = grid.mountpoint.parent
    with scoped(store, base / "uid", cred) as m:
        work = m.mountpoint / "acme/sess-u1/work"
        work.mkdir()
        work.chmod(0o777)
        (work / "root-only").write_text("secret")
        (work / "root-only").chmod(0o600)
        ok = mountutil.run_as(1000, 1000, ["sh", "-c", f"echo mine > {work}/by-1000 && "
                                           f"cat {work}/by-1000"], capture_output=True, text=True)
        assert ok.returncode == 0 and ok.stdout == "mine\n"
        assert os.stat(work / "by-1000").st_uid == 1000
        denied = mountutil.run_as(1000, 1000, ["cat", str(work / "root-only")],
                                  capture_output=True, text=True)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # The store behind the mount is private to the daemon's account.
        peek = mountutil.run_as(1000, 1000, ["ls", str(store)], capture_output=True, text=True)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr


MANY = 20


def test_many_mounts_of_one_store(grid: mountutil.Mount, tmp_path: Path) -> None:
    """20 credential mounts at once, each writing and checkpointing its own session while
    reading shared data; every byte checked afterwards through the admin mount."""
    store = grid.store
    base = grid.mountpoint.parent
    shared = grid.mountpoint / "acme/shared/data/big"
    shared.write_bytes(os.urandom(300_000))
    want_shared = hashlib.sha256(shared.read_bytes()).hexdigest()
    with contextlib.ExitStack() as stack:
        mounts = []
        for i in range(MANY):
            cred = issue(store, tmp_path / f"c{i}.cred", f"u{i}", f"s{i}")
            mounts.append(stack.enter_context(scoped(store, base / f"m{i}", cred)))
        script = (
            "import hashlib, os, sys\n"
            "root, i = sys.argv[1], sys.argv[2]\n"
            "ws = os.path.join(root, 'acme', f'sess-s{i}', 'ws')\n"
            "os.mkdir(ws)\n"
            "for n in range(10):\n"
            "    with open(os.path.join(ws, f'f{n}'), 'wb') as f:\n"
            "        f.write(f'{i}-{n}'.encode() * 1000)\n"
            "os.mkdir(os.path.join(ws, '.snapshots', 'done'))\n"
            "data = open(os.path.join(root, 'acme/shared/data/big'), 'rb').read()\n"
            "print(hashlib.sha256(data).hexdigest())\n"
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(m.mountpoint), str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, m in enumerate(mounts)
        ]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            assert out.strip() == want_shared
    for i in range(MANY):
        ws = grid.mountpoint / f"acme/sess-s{i}/ws"
        for n in range(10):
            assert (ws / f"f{n}").read_bytes() == f"{i}-{n}".encode() * 1000
            assert (ws / ".snapshots/done" / f"f{n}").read_bytes() == f"{i}-{n}".encode() * 1000


def test_owner_option_for_containers(grid: mountutil.Mount, tmp_path: Path) -> None:
    """--owner UID:GID shows every node as owned by that uid, so a container running as an
    arbitrary uid works in a tree created by someone else, with ordinary permission checks."""
    store = grid.store
    (grid.mountpoint / "acme/shared/data/private").write_text("x")
    (grid.mountpoint / "acme/shared/data/private").chmod(0o600)
    where = grid.mountpoint.parent / "owned"
    where.mkdir()
    with mountutil.mounted(store, where, init=False, extra_args=["--owner", "4242:4243"]) as m:
        data = m.mountpoint / "acme/shared/data"
        st = os.stat(data / "f")
        assert (st.st_uid, st.st_gid) == (4242, 4243)
        ok = mountutil.run_as(4242, 4243, ["sh", "-c", f"echo c > {data}/by-container && "
                                           f"cat {data}/private && chmod 640 {data}/f"],
                              capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        other = mountutil.run_as(5000, 5000, ["cat", str(data / "private")],
                                 capture_output=True, text=True)
        assert other.returncode != 0 and "Permission denied" in other.stderr
    # The index keeps the real owners: the admin mount shows the creator's uid.
    assert os.stat(grid.mountpoint / "acme/shared/data/by-container").st_uid == 4242
    assert os.stat(grid.mountpoint / "acme/shared/data/f").st_uid == os.getuid()


def test_session_expiry_removes_the_scope(grid: mountutil.Mount, tmp_path: Path) -> None:
    store = grid.store
    # Long enough to issue and mount on a loaded machine (2 s was not, once).
    cred = issue(store, tmp_path / "s.cred", "alice", "gone", "--ttl", "8s")
    issued = time.monotonic()  # the credential expires 8 s after a moment before this one
    with scoped(store, grid.mountpoint.parent / "gone", cred) as m:
        (m.mountpoint / "acme/sess-gone/ws").mkdir()
        (m.mountpoint / "acme/sess-gone/ws/f").write_text("temporary")
    time.sleep(max(0.0, issued + 8.5 - time.monotonic()))
    assert "sess-gone" not in os.listdir(grid.mountpoint / "acme")  # invisible at once
    cli("gc", "--store", str(store), "--grace", "0s")
    left = subprocess.run(
        ["sqlite3", str(store / "index.sqlite3"),
         "SELECT count(*) FROM scopes WHERE name = 'sess-gone'"],
        capture_output=True, text=True,
    ).stdout.strip()
    assert left == "0"
    events = cli("log", "--store", str(store), "--type", "scope.destroy", "--json").stdout
    assert "sess-gone" in events


def test_running_daemons_sweep_expired_sessions(
    grid: mountutil.Mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's sweeper runs in every daemon too: an expired session is removed without
    `gc`, but only once no mount of that session is running."""
    store = grid.store
    cred = issue(store, tmp_path / "s.cred", "alice", "swept", "--ttl", "3s")

    def left() -> str:
        return subprocess.run(
            ["sqlite3", str(store / "index.sqlite3"),
             "SELECT count(*) FROM scopes WHERE name = 'sess-swept'"],
            capture_output=True, text=True,
        ).stdout.strip()

    monkeypatch.setenv("ARTIFACTFS_SESSION_SWEEP_S", "0.5")
    base = grid.mountpoint.parent
    (base / "sweeper").mkdir()
    with mountutil.mounted(store, base / "sweeper", init=False):
        with scoped(store, base / "own", cred) as own:
            (own.mountpoint / "acme/sess-swept/ws").mkdir()
            (own.mountpoint / "acme/sess-swept/ws/f").write_text("until unmount")
            time.sleep(4)
            assert left() == "1"  # its own mount still reads it
            assert (own.mountpoint / "acme/sess-swept/ws/f").read_text() == "until unmount"
        deadline = time.monotonic() + 10
        while left() != "0":
            assert time.monotonic() < deadline, "the daemon did not sweep the expired session"
            time.sleep(0.2)
