"""The grid in the administrative view: sandboxes, scopes, namespaces, their name rules, and the
artifact xattrs. Needs a real mount (skips with ARTIFACTFS_TEST_TARGET=plain)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
from mountutil import Mount, workspace

pytestmark = pytest.mark.mounted

SHA_XATTR = "user.artifactfs.sha256"
NS_XATTR = "user.artifactfs.namespace"


def scope(mnt: Mount, sandbox: str = "acme", name: str = "shared") -> Path:
    """MNT/sandbox/name, creating both levels as needed."""
    path = mnt.mountpoint / sandbox
    if not path.exists():
        path.mkdir()
    path = path / name
    if not path.exists():
        path.mkdir()
    return path


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


# --- sandboxes and scopes ------------------------------------------------------------------------


def test_new_grid_is_empty(mnt: Mount) -> None:
    assert os.listdir(mnt.mountpoint) == []


def test_mkdir_creates_listed_sandbox(mnt: Mount) -> None:
    (mnt.mountpoint / "acme").mkdir()
    (mnt.mountpoint / "beta").mkdir()
    assert sorted(os.listdir(mnt.mountpoint)) == ["acme", "beta"]
    assert (mnt.mountpoint / "acme").is_dir()
    assert os.listdir(mnt.mountpoint / "acme") == []


def test_mkdir_creates_the_three_kinds_of_scope(mnt: Mount) -> None:
    sandbox = mnt.mountpoint / "acme"
    sandbox.mkdir()
    for name in ("shared", "user-alice", "sess-123"):
        (sandbox / name).mkdir()
    assert sorted(os.listdir(sandbox)) == ["sess-123", "shared", "user-alice"]
    assert all((sandbox / name).is_dir() for name in os.listdir(sandbox))


@pytest.mark.parametrize("name", ["scratch", "users", "Shared", "session-1", "tmp"])
def test_invalid_scope_name_is_einval(mnt: Mount, name: str) -> None:
    sandbox = mnt.mountpoint / "acme"
    sandbox.mkdir()
    assert errno_of(os.mkdir, sandbox / name) == errno.EINVAL
    assert os.listdir(sandbox) == []


def test_sandbox_name_of_255_bytes_is_accepted(mnt: Mount) -> None:
    name = "s" * 255
    (mnt.mountpoint / name).mkdir()
    assert os.listdir(mnt.mountpoint) == [name]


def test_sandbox_name_of_256_bytes_is_enametoolong(mnt: Mount) -> None:
    assert errno_of(os.mkdir, mnt.mountpoint / ("s" * 256)) == errno.ENAMETOOLONG


# --- workspace namespaces ------------------------------------------------------------------------


def test_mkdir_in_scope_creates_empty_workspace(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "proj").mkdir()
    (shared / "other").mkdir()
    assert sorted(os.listdir(shared)) == ["other", "proj"]
    assert os.listdir(shared / "proj") == []


def test_workspace_holds_a_tree(mnt: Mount) -> None:
    proj = scope(mnt) / "proj"
    proj.mkdir()
    (proj / "src" / "pkg").mkdir(parents=True)
    (proj / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    assert (proj / "src" / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert os.listdir(proj) == ["src"]


def test_namespace_name_of_255_bytes_is_accepted(mnt: Mount) -> None:
    shared = scope(mnt)
    name = "é" * 127 + "n"  # 255 bytes in UTF-8
    assert len(name.encode()) == 255
    (shared / name).mkdir()
    assert os.listdir(shared) == [name]


def test_namespace_name_of_256_bytes_is_enametoolong(mnt: Mount) -> None:
    shared = scope(mnt)
    assert errno_of(os.mkdir, shared / ("n" * 256)) == errno.ENAMETOOLONG
    assert os.listdir(shared) == []


def test_blob_name_of_256_bytes_is_enametoolong(mnt: Mount) -> None:
    shared = scope(mnt)
    assert errno_of(os.open, shared / ("b" * 256), os.O_CREAT | os.O_WRONLY, 0o644) == (
        errno.ENAMETOOLONG
    )
    assert os.listdir(shared) == []


def test_namespace_names_are_unique_within_a_scope(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "proj").mkdir()
    assert errno_of(os.mkdir, shared / "proj") == errno.EEXIST
    assert errno_of(os.open, shared / "proj", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == (
        errno.EEXIST
    )
    assert os.listdir(shared) == ["proj"]


def test_same_namespace_name_in_two_scopes_is_allowed(mnt: Mount) -> None:
    (scope(mnt, name="shared") / "proj").mkdir()
    (scope(mnt, name="user-alice") / "proj").mkdir()
    (scope(mnt, sandbox="beta") / "proj").mkdir()
    assert (mnt.mountpoint / "acme" / "user-alice" / "proj").is_dir()
    assert (mnt.mountpoint / "beta" / "shared" / "proj").is_dir()


def test_rmdir_of_non_empty_workspace_is_enotempty(mnt: Mount) -> None:
    proj = scope(mnt) / "proj"
    proj.mkdir()
    (proj / "f").write_bytes(b"data")
    assert errno_of(os.rmdir, proj) == errno.ENOTEMPTY
    assert (proj / "f").read_bytes() == b"data"


def test_rmdir_of_empty_workspace_destroys_it(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "proj").mkdir()
    os.rmdir(shared / "proj")
    assert os.listdir(shared) == []
    assert errno_of(os.stat, shared / "proj") == errno.ENOENT


def test_rm_r_destroys_a_populated_workspace(mnt: Mount) -> None:
    shared = scope(mnt)
    proj = shared / "proj"
    proj.mkdir()
    (proj / "a" / "b").mkdir(parents=True)
    (proj / "a" / "b" / "f").write_bytes(b"x" * 5000)
    (proj / "link").symlink_to("a/b/f")
    subprocess.run(["rm", "-r", str(proj)], check=True, capture_output=True, timeout=60)
    assert os.listdir(shared) == []
    assert errno_of(os.stat, proj) == errno.ENOENT


def test_destroyed_namespace_name_can_be_reused_empty(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "proj").mkdir()
    (shared / "proj" / "old").write_bytes(b"old")
    subprocess.run(["rm", "-r", str(shared / "proj")], check=True, timeout=60)
    (shared / "proj").mkdir()
    assert os.listdir(shared / "proj") == []


def test_rename_of_workspace_within_scope_renames_it(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "old").mkdir()
    (shared / "old" / "f").write_bytes(b"content")
    os.rename(shared / "old", shared / "new")
    assert os.listdir(shared) == ["new"]
    assert (shared / "new" / "f").read_bytes() == b"content"
    assert errno_of(os.stat, shared / "old") == errno.ENOENT


def test_rename_keeps_the_namespace_id(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "old").mkdir()
    before = os.getxattr(shared / "old", NS_XATTR)
    os.rename(shared / "old", shared / "new")
    assert os.getxattr(shared / "new", NS_XATTR) == before


def test_mv_command_renames_within_scope(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "old").mkdir()
    (shared / "old" / "f").write_bytes(b"content")
    subprocess.run(["mv", str(shared / "old"), str(shared / "new")], check=True, timeout=60)
    assert os.listdir(shared) == ["new"]
    assert (shared / "new" / "f").read_bytes() == b"content"


def test_rename_of_workspace_across_scopes_is_exdev(mnt: Mount) -> None:
    shared = scope(mnt)
    user = scope(mnt, name="user-alice")
    (shared / "proj").mkdir()
    assert errno_of(os.rename, shared / "proj", user / "proj") == errno.EXDEV
    assert os.listdir(shared) == ["proj"]
    assert os.listdir(user) == []


def test_rename_of_workspace_across_sandboxes_is_exdev(mnt: Mount) -> None:
    acme = scope(mnt, sandbox="acme")
    beta = scope(mnt, sandbox="beta")
    (acme / "proj").mkdir()
    assert errno_of(os.rename, acme / "proj", beta / "proj") == errno.EXDEV
    assert os.listdir(beta) == []


def test_rename_of_blob_across_scopes_is_exdev(mnt: Mount) -> None:
    shared = scope(mnt)
    sess = scope(mnt, name="sess-123")
    (shared / "blob").write_bytes(b"b")
    assert errno_of(os.rename, shared / "blob", sess / "blob") == errno.EXDEV
    assert (shared / "blob").read_bytes() == b"b"


def test_rename_of_a_file_between_workspaces_of_two_scopes_is_exdev(mnt: Mount) -> None:
    a = workspace(mnt.mountpoint, "acme", "shared", "a")
    b = workspace(mnt.mountpoint, "acme", "user-alice", "b")
    (a / "f").write_bytes(b"f")
    assert errno_of(os.rename, a / "f", b / "f") == errno.EXDEV


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {"top.txt": b"top\n", "d/inner.bin": os.urandom(70_000), "d/e/empty": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.mark.parametrize("dest", [("acme", "user-alice"), ("beta", "shared")])
def test_mv_command_across_scopes_or_sandboxes_copies(mnt: Mount, dest: tuple[str, str]) -> None:
    shared = scope(mnt)
    target = scope(mnt, sandbox=dest[0], name=dest[1])
    (shared / "proj").mkdir()
    files = _make_tree(shared / "proj")
    result = subprocess.run(
        ["mv", str(shared / "proj"), str(target / "proj")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert os.listdir(shared) == []
    for rel, data in files.items():
        assert (target / "proj" / rel).read_bytes() == data


# --- blob namespaces -----------------------------------------------------------------------------


def test_file_in_scope_creates_blob_namespace(mnt: Mount) -> None:
    shared = scope(mnt)
    data = os.urandom(300_000)
    (shared / "model.bin").write_bytes(data)
    assert os.listdir(shared) == ["model.bin"]
    assert (shared / "model.bin").is_file()
    assert os.stat(shared / "model.bin").st_size == len(data)
    assert (shared / "model.bin").read_bytes() == data


def test_blob_and_workspace_coexist_in_a_scope(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "blob").write_bytes(b"b")
    (shared / "proj").mkdir()
    assert sorted(os.listdir(shared)) == ["blob", "proj"]


def test_rm_destroys_blob_namespace(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "blob").write_bytes(b"b")
    subprocess.run(["rm", str(shared / "blob")], check=True, timeout=60)
    assert os.listdir(shared) == []
    assert errno_of(os.stat, shared / "blob") == errno.ENOENT


def test_rename_of_blob_within_scope(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "a").write_bytes(b"payload")
    os.rename(shared / "a", shared / "b")
    assert os.listdir(shared) == ["b"]
    assert (shared / "b").read_bytes() == b"payload"


def test_blob_namespace_is_a_regular_file(mnt: Mount) -> None:
    blob = scope(mnt) / "blob"
    with open(blob, "wb") as f:
        f.write(b"0123456789")
    with open(blob, "r+b") as f:
        f.seek(4)
        f.write(b"xy")
    with open(blob, "ab") as f:
        f.write(b"END")
    os.truncate(blob, 12)
    assert blob.read_bytes() == b"0123xy6789EN"


# --- artifact xattrs -----------------------------------------------------------------------------


def test_namespace_xattr_on_workspace_root(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "a").mkdir()
    (shared / "b").mkdir()
    ida = os.getxattr(shared / "a", NS_XATTR)
    idb = os.getxattr(shared / "b", NS_XATTR)
    assert ida.strip() and idb.strip()
    assert ida != idb


def test_namespace_xattr_on_blob(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "blob").write_bytes(b"b")
    (shared / "proj").mkdir()
    blob_id = os.getxattr(shared / "blob", NS_XATTR)
    assert blob_id.strip()
    assert blob_id != os.getxattr(shared / "proj", NS_XATTR)


def test_sha256_xattr_matches_content_after_close(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 12_345)
    with open(ws / "f", "wb") as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
    assert os.getxattr(ws / "f", SHA_XATTR).decode() == hashlib.sha256(data).hexdigest()


def test_sha256_xattr_of_empty_file(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    (ws / "empty").write_bytes(b"")
    assert os.getxattr(ws / "empty", SHA_XATTR).decode() == hashlib.sha256(b"").hexdigest()


def test_sha256_xattr_is_updated_after_rewrite(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    data = bytearray(random.Random(2).randbytes(2 * 1024 * 1024 + 7))
    (ws / "f").write_bytes(data)
    first = os.getxattr(ws / "f", SHA_XATTR).decode()
    with open(ws / "f", "r+b") as f:
        f.seek(1024 * 1024 - 3)
        f.write(b"REWRITTEN")
    data[1024 * 1024 - 3 : 1024 * 1024 + 6] = b"REWRITTEN"
    second = os.getxattr(ws / "f", SHA_XATTR).decode()
    assert second != first
    assert second == hashlib.sha256(data).hexdigest()


def test_sha256_xattr_is_updated_after_truncate(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    data = random.Random(3).randbytes(200_000)
    (ws / "f").write_bytes(data)
    os.truncate(ws / "f", 1000)
    assert os.getxattr(ws / "f", SHA_XATTR).decode() == hashlib.sha256(data[:1000]).hexdigest()


def test_sha256_xattr_on_blob_namespace(mnt: Mount) -> None:
    blob = scope(mnt) / "blob"
    data = os.urandom(1_500_000)
    blob.write_bytes(data)
    assert os.getxattr(blob, SHA_XATTR).decode() == hashlib.sha256(data).hexdigest()


def test_getfattr_shows_sha256(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    (ws / "f").write_bytes(b"hello\n")
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", SHA_XATTR, str(ws / "f")],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert out.decode().strip() == hashlib.sha256(b"hello\n").hexdigest()


def test_writing_sha256_xattr_is_refused(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    (ws / "f").write_bytes(b"data")
    assert errno_of(os.setxattr, ws / "f", SHA_XATTR, b"0" * 64) in (errno.EPERM, errno.EACCES)
    assert os.getxattr(ws / "f", SHA_XATTR).decode() == hashlib.sha256(b"data").hexdigest()


def test_removing_sha256_xattr_is_refused(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    (ws / "f").write_bytes(b"data")
    assert errno_of(os.removexattr, ws / "f", SHA_XATTR) in (errno.EPERM, errno.EACCES)
    assert os.getxattr(ws / "f", SHA_XATTR).decode() == hashlib.sha256(b"data").hexdigest()


def test_writing_namespace_xattr_is_refused(mnt: Mount) -> None:
    shared = scope(mnt)
    (shared / "proj").mkdir()
    before = os.getxattr(shared / "proj", NS_XATTR)
    assert errno_of(os.setxattr, shared / "proj", NS_XATTR, b"forged") in (
        errno.EPERM,
        errno.EACCES,
    )
    assert os.getxattr(shared / "proj", NS_XATTR) == before


def test_setfattr_mime_type_on_file(mnt: Mount) -> None:
    ws = workspace(mnt.mountpoint)
    (ws / "doc.json").write_text("{}")
    subprocess.run(
        ["setfattr", "-n", "user.mime_type", "-v", "application/json", str(ws / "doc.json")],
        check=True,
        timeout=60,
    )
    out = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.mime_type", str(ws / "doc.json")],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    assert out == b"application/json"


def test_setfattr_summary_on_blob_namespace(mnt: Mount) -> None:
    blob = scope(mnt) / "report.txt"
    blob.write_text("quarterly numbers\n")
    subprocess.run(
        ["setfattr", "-n", "user.summary", "-v", "Q3 report, draft", str(blob)],
        check=True,
        timeout=60,
    )
    subprocess.run(
        ["setfattr", "-n", "user.mime_type", "-v", "text/plain", str(blob)], check=True, timeout=60
    )
    out = subprocess.run(
        ["getfattr", "-d", "-m", "^user\\.(summary|mime_type)$", str(blob)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert 'user.summary="Q3 report, draft"' in out
    assert 'user.mime_type="text/plain"' in out
