"""Ownership and permissions as POSIX defines them, checked as non-root uids through the
allow_other mount (the daemon runs as root with default_permissions), as a conformance suite would.

Each operation runs in a child process as the given uid/gid (no supplementary groups) and reports
the errno it got, so the assertions name the exact errno.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from coreutil import minimal_acl
from mountutil import run_as

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root"),
]

ALICE = 1000
BOB = 1001
OTHER_GROUP = 3000


@functools.cache
def _python_for(uid: int, gid: int) -> str:
    """An interpreter that the uid can execute: ours if it is reachable, else the system one."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = run_as(uid, gid, [candidate, "-c", "pass"], capture_output=True)
        except OSError:  # not executable by uid (e.g. the interpreter lives under /root)
            continue
        if probe.returncode == 0:
            return candidate
    raise RuntimeError(f"no Python interpreter is executable by uid {uid}")


def as_user(code: str, *, uid: int = ALICE, gid: int = ALICE, umask: int = 0o022) -> int:
    """Run `code` (with os, stat imported) as uid/gid; return 0, or the errno of its OSError."""
    script = (
        "import os, stat, sys\n"
        "try:\n" + textwrap.indent(textwrap.dedent(code), "    ") + "\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
        "else:\n"
        "    print(0)\n"
    )
    result = run_as(
        uid,
        gid,
        [_python_for(uid, gid), "-c", script],
        capture_output=True,
        text=True,
        umask=umask,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def make_file(path: Path, uid: int, gid: int, mode: int, data: bytes = b"data") -> Path:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # after chown: chown clears set-id bits
    return path


def make_dir(path: Path, uid: int, gid: int, mode: int) -> Path:
    path.mkdir()
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


# --- new files -----------------------------------------------------------------------------------


def test_new_file_belongs_to_caller_and_honours_umask(ws: Path) -> None:
    f = ws / "f"
    assert (
        as_user(f"os.close(os.open({str(f)!r}, os.O_CREAT | os.O_WRONLY, 0o666))", umask=0o027) == 0
    )
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (ALICE, ALICE)
    assert stat.S_IMODE(st.st_mode) == 0o640


def test_new_directory_belongs_to_caller_and_honours_umask(ws: Path) -> None:
    d = ws / "d"
    assert as_user(f"os.mkdir({str(d)!r}, 0o777)", umask=0o077) == 0
    st = os.stat(d)
    assert (st.st_uid, st.st_gid) == (ALICE, ALICE)
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_new_symlink_belongs_to_caller(ws: Path) -> None:
    link = ws / "l"
    assert as_user(f"os.symlink('target', {str(link)!r})") == 0
    st = os.lstat(link)
    assert (st.st_uid, st.st_gid) == (ALICE, ALICE)


def test_setgid_directory_gives_its_group_to_new_files(ws: Path) -> None:
    d = make_dir(ws / "d", ALICE, OTHER_GROUP, 0o2777)
    f = d / "f"
    assert as_user(f"open({str(f)!r}, 'w').close()") == 0
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (ALICE, OTHER_GROUP)


def test_setgid_directory_gives_group_and_setgid_bit_to_new_directories(ws: Path) -> None:
    d = make_dir(ws / "d", ALICE, OTHER_GROUP, 0o2777)
    sub = d / "sub"
    assert as_user(f"os.mkdir({str(sub)!r}, 0o755)") == 0
    st = os.stat(sub)
    assert (st.st_uid, st.st_gid) == (ALICE, OTHER_GROUP)
    assert st.st_mode & stat.S_ISGID


# --- access checks -------------------------------------------------------------------------------


def test_write_to_read_only_file_is_eacces_even_for_its_owner(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o444)
    assert as_user(f"open({str(f)!r}, 'r+b')") == errno.EACCES
    assert as_user(f"os.truncate({str(f)!r}, 0)") == errno.EACCES
    assert f.read_bytes() == b"data"


def test_read_of_private_file_is_eacces(ws: Path) -> None:
    f = make_file(ws / "f", BOB, BOB, 0o600)
    assert as_user(f"open({str(f)!r}, 'rb')") == errno.EACCES


def test_group_permission_applies_to_group_members(ws: Path) -> None:
    f = make_file(ws / "f", BOB, ALICE, 0o640)
    assert as_user(f"open({str(f)!r}, 'rb').read()") == 0
    assert as_user(f"open({str(f)!r}, 'ab')") == errno.EACCES


def test_create_in_unwritable_directory_is_eacces(ws: Path) -> None:
    d = make_dir(ws / "d", BOB, BOB, 0o755)
    assert as_user(f"open({str(d / 'f')!r}, 'w')") == errno.EACCES
    assert as_user(f"os.mkdir({str(d / 'sub')!r})") == errno.EACCES
    assert os.listdir(d) == []


def test_lookup_in_untraversable_directory_is_eacces(ws: Path) -> None:
    d = make_dir(ws / "d", BOB, BOB, 0o700)
    make_file(d / "f", BOB, BOB, 0o644)
    assert as_user(f"os.stat({str(d / 'f')!r})") == errno.EACCES
    assert as_user(f"os.listdir({str(d)!r})") == errno.EACCES


def test_unlink_in_unwritable_directory_is_eacces(ws: Path) -> None:
    d = make_dir(ws / "d", BOB, BOB, 0o755)
    make_file(d / "f", ALICE, ALICE, 0o644)
    assert as_user(f"os.unlink({str(d / 'f')!r})") == errno.EACCES
    assert (d / "f").exists()


# --- chmod, chown, utimes by non-owners ----------------------------------------------------------


def test_chmod_by_non_owner_is_eperm(ws: Path) -> None:
    f = make_file(ws / "f", BOB, BOB, 0o666)
    assert as_user(f"os.chmod({str(f)!r}, 0o777)") == errno.EPERM
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o666


def test_chmod_by_owner_is_allowed(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o644)
    assert as_user(f"os.chmod({str(f)!r}, 0o600)") == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


def test_chown_to_another_user_is_eperm(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o644)
    assert as_user(f"os.chown({str(f)!r}, {BOB}, -1)") == errno.EPERM
    assert os.stat(f).st_uid == ALICE


def test_chgrp_by_non_owner_is_eperm(ws: Path) -> None:
    f = make_file(ws / "f", BOB, OTHER_GROUP, 0o666)
    assert as_user(f"os.chown({str(f)!r}, -1, {ALICE})") == errno.EPERM
    assert os.stat(f).st_gid == OTHER_GROUP


def test_chgrp_by_owner_to_a_group_not_held_is_eperm(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o644)
    assert as_user(f"os.chown({str(f)!r}, -1, {OTHER_GROUP})") == errno.EPERM
    assert os.stat(f).st_gid == ALICE


def test_setgid_bit_dropped_when_owner_is_not_in_the_group(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, OTHER_GROUP, 0o755)
    assert as_user(f"os.chmod({str(f)!r}, 0o2755)") == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755


def _set_acl(path: Path, mode: int) -> str:
    """Code for as_user: set the minimal access ACL of `mode` (what `setfacl -m u::..` sets)."""
    return f"os.setxattr({str(path)!r}, 'system.posix_acl_access', {minimal_acl(mode)!r})"


def test_acl_by_owner_changes_permissions_at_once(ws: Path) -> None:
    """The kernel has the old mode cached (5 s attribute timeout, and a setxattr only marks
    ctime stale): the mount must drop it, or the owner could still read here."""
    f = make_file(ws / "f", ALICE, ALICE, 0o644)
    code = f"os.stat({str(f)!r})\n{_set_acl(f, 0o200)}\nopen({str(f)!r}, 'rb').read()"
    assert as_user(code) == errno.EACCES
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o200


def test_acl_by_non_owner_is_eperm(ws: Path) -> None:
    f = make_file(ws / "f", BOB, BOB, 0o666)
    assert as_user(_set_acl(f, 0o777)) == errno.EPERM
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o666


def test_acl_drops_setgid_when_owner_is_not_in_the_group(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, OTHER_GROUP, 0o2755)
    assert as_user(_set_acl(f, 0o750)) == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o750
    g = make_file(ws / "g", ALICE, ALICE, 0o2755)
    assert as_user(_set_acl(g, 0o750)) == 0
    assert stat.S_IMODE(os.stat(g).st_mode) == 0o2750


def test_utime_to_explicit_times_by_non_owner_is_eperm(ws: Path) -> None:
    f = make_file(ws / "f", BOB, BOB, 0o666)  # even with write permission
    os.utime(f, ns=(10**18, 10**18))
    assert as_user(f"os.utime({str(f)!r}, ns=(1, 1))") == errno.EPERM
    assert os.stat(f).st_mtime_ns == 10**18


def test_utime_to_now_without_write_permission_is_eacces(ws: Path) -> None:
    f = make_file(ws / "f", BOB, BOB, 0o644)
    os.utime(f, ns=(10**18, 10**18))
    assert as_user(f"os.utime({str(f)!r})") == errno.EACCES
    assert os.stat(f).st_mtime_ns == 10**18


def test_utime_to_now_with_write_permission_is_allowed(ws: Path) -> None:
    f = make_file(ws / "f", BOB, BOB, 0o666)
    os.utime(f, ns=(10**18, 10**18))
    assert as_user(f"os.utime({str(f)!r})") == 0
    assert os.stat(f).st_mtime_ns > 10**18


def test_utime_to_explicit_times_by_owner_is_allowed(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o444)
    assert as_user(f"os.utime({str(f)!r}, ns=(123456789, 987654321))") == 0
    assert os.stat(f).st_mtime_ns == 987654321


# --- sticky directories --------------------------------------------------------------------------


def test_sticky_directory_protects_other_users_files(ws: Path) -> None:
    d = make_dir(ws / "sticky", 0, 0, 0o1777)
    f = d / "alice-file"
    assert as_user(f"open({str(f)!r}, 'w').close()", uid=ALICE, gid=ALICE) == 0
    assert as_user(f"os.unlink({str(f)!r})", uid=BOB, gid=BOB) == errno.EPERM
    assert as_user(f"os.rename({str(f)!r}, {str(d / 'stolen')!r})", uid=BOB, gid=BOB) == (
        errno.EPERM
    )
    assert f.exists()
    assert as_user(f"os.unlink({str(f)!r})", uid=ALICE, gid=ALICE) == 0
    assert not f.exists()


def test_sticky_directory_allows_directory_owner_to_delete(ws: Path) -> None:
    d = make_dir(ws / "sticky", BOB, BOB, 0o1777)
    f = d / "alice-file"
    assert as_user(f"open({str(f)!r}, 'w').close()", uid=ALICE, gid=ALICE) == 0
    assert as_user(f"os.unlink({str(f)!r})", uid=BOB, gid=BOB) == 0


# --- set-id bits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "bit"), [(0o4755, stat.S_ISUID), (0o2775, stat.S_ISGID)], ids=["setuid", "setgid"]
)
def test_set_id_bit_cleared_when_non_root_owner_writes(ws: Path, mode: int, bit: int) -> None:
    f = make_file(ws / "f", ALICE, ALICE, mode)
    assert os.stat(f).st_mode & bit
    assert as_user(f"open({str(f)!r}, 'ab').write(b'more')") == 0
    st = os.stat(f)
    assert not st.st_mode & bit
    assert stat.S_IMODE(st.st_mode) == mode & 0o777
    assert f.read_bytes() == b"datamore"


def test_setuid_bit_cleared_when_non_root_owner_truncates(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o4755)
    assert as_user(f"os.truncate({str(f)!r}, 1)") == 0
    assert not os.stat(f).st_mode & stat.S_ISUID


def test_setuid_bit_cleared_by_chown(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o4755)
    os.chown(f, BOB, BOB)  # even root's chown clears it on Linux
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (BOB, BOB)
    assert stat.S_IMODE(st.st_mode) == 0o755


def test_setuid_bit_cleared_when_owner_chgrps(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, OTHER_GROUP, 0o4755)
    assert as_user(f"os.chown({str(f)!r}, -1, {ALICE})") == 0
    st = os.stat(f)
    assert st.st_gid == ALICE
    assert stat.S_IMODE(st.st_mode) == 0o755


def test_setuid_bit_kept_when_root_writes(ws: Path) -> None:
    f = make_file(ws / "f", ALICE, ALICE, 0o4755)
    with open(f, "ab") as out:
        out.write(b"root")
    assert os.stat(f).st_mode & stat.S_ISUID


# --- a real program as a non-root user -----------------------------------------------------------


def test_shell_tools_as_non_root_user(ws: Path) -> None:
    script = (
        "set -e; mkdir -p a/b; echo hello > a/b/f; cp a/b/f a/g; mv a/g a/h; ln -s h a/l; "
        "cat a/l; rm -r a/b; ls a"
    )
    result = run_as(ALICE, ALICE, ["sh", "-c", script], cwd=ws, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["hello", "h", "l"]
    assert os.stat(ws / "a").st_uid == ALICE
