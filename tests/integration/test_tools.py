"""Real programs in a workspace: cp, diff, find, du, ls, git, tar, rsync, sqlite3, a Python
virtualenv with pip, flock and fcntl locks between processes, mmap across processes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.mounted

MiB = 1024 * 1024
# Debian's python3-setuptools-whl and python3-wheel-whl put their wheels here.
SYSTEM_WHEELS = Path("/usr/share/python-wheels")


def run(argv: list, **kw) -> subprocess.CompletedProcess[str]:
    """Run a program, failing the test with its output if it exits non-zero."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    result = subprocess.run([os.fspath(a) for a in argv], **kw)
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


# --- a reference tree and a comparison of trees ---------------------------------------------------

# (path, size, mode); top.txt is text and has a hard link.
FILES = [
    ("src/f0.bin", 0, 0o644),
    ("src/pkg/f1.bin", 1, 0o600),
    ("src/pkg/deep/f2.bin", 100, 0o755),
    ("docs/f3.txt", 4095, 0o640),
    ("docs/f4.bin", 4096, 0o444),
    ("with space/file 5.txt", 4097, 0o700),
    ("ünïcode/f6-ü.bin", 65_537, 0o664),
    ("private/f7.bin", 300_000, 0o750),
    ("src/pkg/deep/f8.bin", 1_500_003, 0o4755),
]
DIRS = ["src", "src/pkg", "src/pkg/deep", "docs", "empty", "with space", "ünïcode", "private"]


def make_tree(root: Path, seed: int = 0) -> None:
    """A tree with nested dirs, files of awkward sizes and modes, symlinks, a hard-link pair,
    a user xattr and nanosecond times on everything."""
    rng = random.Random(seed)
    root.mkdir()
    for d in DIRS:
        (root / d).mkdir()
    for rel, size, mode in FILES:
        (root / rel).write_bytes(rng.randbytes(size))
        os.chmod(root / rel, mode)
    (root / "top.txt").write_text("top level\n" * 100)
    os.link(root / "top.txt", root / "docs" / "hardlink-to-top")
    (root / "docs" / "tagged").write_bytes(b"with an xattr")
    os.setxattr(root / "docs" / "tagged", "user.test", b"tag value")
    os.symlink("pkg/deep", root / "src" / "link-to-dir")
    os.symlink("../top.txt", root / "docs" / "relative-link")
    os.symlink("/nonexistent/absolute/target", root / "dangling")
    os.chmod(root / "private", 0o700)
    os.chmod(root / "src" / "pkg", 0o750)
    # Times last, deepest first, so that creating entries does not move them again.
    entries = sorted(
        (Path(d) / n for d, dirs, names in os.walk(root) for n in dirs + names),
        key=lambda p: len(p.parts),
        reverse=True,
    )
    for path in [*entries, root]:
        t = rng.randrange(10**17, 17 * 10**17)
        os.utime(path, ns=(t, t + rng.randrange(10**9)), follow_symlinks=False)


def tree_entries(root: Path) -> list[str]:
    out = []
    for d, dirs, names in os.walk(root):
        for n in dirs + names:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


def assert_same_tree(
    expected: Path, actual: Path, *, hardlinks: bool = True, xattrs: tuple[str, ...] = ()
) -> None:
    """Same names, types, modes, owners, mtimes (ns), contents, link targets (and hard links)."""
    names = tree_entries(expected)
    assert tree_entries(actual) == names
    groups_expected: dict[int, set[str]] = {}
    groups_actual: dict[int, set[str]] = {}
    for rel in [".", *names]:
        e, a = os.lstat(expected / rel), os.lstat(actual / rel)
        assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(e.st_mode), rel
        if not stat.S_ISLNK(e.st_mode):
            assert oct(stat.S_IMODE(a.st_mode)) == oct(stat.S_IMODE(e.st_mode)), rel
        assert (a.st_uid, a.st_gid) == (e.st_uid, e.st_gid), rel
        assert a.st_mtime_ns == e.st_mtime_ns, rel
        if stat.S_ISLNK(e.st_mode):
            assert os.readlink(actual / rel) == os.readlink(expected / rel), rel
        elif stat.S_ISREG(e.st_mode):
            assert a.st_size == e.st_size, rel
            assert (actual / rel).read_bytes() == (expected / rel).read_bytes(), rel
            if hardlinks:
                assert a.st_nlink == e.st_nlink, rel
                groups_expected.setdefault(e.st_ino, set()).add(rel)
                groups_actual.setdefault(a.st_ino, set()).add(rel)
            for name in xattrs:
                if name in os.listxattr(expected / rel):
                    assert os.getxattr(actual / rel, name) == os.getxattr(expected / rel, name)
    if hardlinks:
        assert sorted(map(sorted, groups_actual.values())) == sorted(
            map(sorted, groups_expected.values())
        )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The reference tree, on the host filesystem."""
    root = tmp_path / "tree"
    make_tree(root)
    return root


# --- cp, diff, find, du, ls ----------------------------------------------------------------------


def test_cp_a_into_the_mount_preserves_the_tree(ws: Path, tree: Path) -> None:
    run(["cp", "-a", tree, ws / "copy"])
    run(["diff", "-r", "--no-dereference", tree, ws / "copy"])
    assert_same_tree(tree, ws / "copy", xattrs=("user.test",))


def test_cp_a_within_and_out_of_the_mount(ws: Path, tree: Path, tmp_path: Path) -> None:
    run(["cp", "-a", tree, ws / "first"])
    run(["cp", "-a", ws / "first", ws / "second"])
    run(["cp", "-a", ws / "second", tmp_path / "back"])
    run(["diff", "-r", "--no-dereference", tree, ws / "second"])
    assert_same_tree(tree, ws / "second", xattrs=("user.test",))
    assert_same_tree(tree, tmp_path / "back", xattrs=("user.test",))


def test_copies_out_of_the_mount_do_not_carry_computed_attributes(
    ws: Path, tree: Path, tmp_path: Path
) -> None:
    """The digest and namespace id are answered by name but not listed, so `cp -a`,
    `rsync -aHX` and `getfattr -d` see only the user's own attributes."""
    run(["cp", "-a", tree, ws / "first"])
    files = [p for p in (ws / "first").rglob("*") if p.is_file() and not p.is_symlink()]
    assert files
    for f in files:
        listed = os.listxattr(f)
        assert not [n for n in listed if n.startswith("user.artifactfs.")], f
        digest = os.getxattr(f, "user.artifactfs.sha256").decode()
        assert digest == hashlib.sha256(f.read_bytes()).hexdigest()
    dumped = run(["getfattr", "-d", "-m", "-", "--absolute-names", *files]).stdout
    assert "user.artifactfs." not in dumped
    assert "user.test" in dumped  # the tree's own attributes are listed and copied
    run(["cp", "-a", ws / "first", tmp_path / "cp"])
    run(["rsync", "-aHX", f"{ws / 'first'}/", f"{tmp_path / 'rsync'}/"])
    for out in (tmp_path / "cp", tmp_path / "rsync"):
        for p in out.rglob("*"):
            if not p.is_symlink():
                assert not [n for n in os.listxattr(p) if n.startswith("user.artifactfs.")], p
        assert_same_tree(tree, out, xattrs=("user.test",))


def test_acls_the_mode_expresses_work_with_setfacl_getfacl_and_rsync(
    ws: Path, tree: Path, tmp_path: Path
) -> None:
    """A minimal ACL is the mode (as on ext4); what the mode cannot say is EOPNOTSUPP."""
    f = ws / "f"
    f.write_bytes(b"x")
    run(["setfacl", "-m", "u::rwx,g::r-x,o::-", f])
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o750
    shown = run(["getfacl", "-cp", f]).stdout.split()
    assert shown == ["user::rwx", "group::r-x", "other::---"]
    run(["setfacl", "-b", f])  # remove extended entries: there are none
    for argv in (["setfacl", "-m", "u:1234:r", f], ["setfacl", "-d", "-m", "u::rwx", ws]):
        refused = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert refused.returncode != 0 and "Operation not supported" in refused.stderr
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o750
    # rsync -A copies ACLs, cp -a too: in, out again, same modes, and no error.
    run(["rsync", "-aAH", f"{tree}/", f"{ws / 'r'}/"])
    run(["cp", "-a", ws / "r", ws / "c"])
    run(["rsync", "-aAH", f"{ws / 'c'}/", f"{tmp_path / 'back'}/"])
    assert_same_tree(tree, ws / "r")
    assert_same_tree(tree, tmp_path / "back")


FIND_FORMAT = r"%y %m %U %G %p -> %l\n"
FIND_FILE_FORMAT = r"%y %m %U %G %s %n %T@ %p -> %l\n"


def _find(root: Path) -> list[str]:
    out = run(
        ["find", ".", "-type", "d", "-printf", FIND_FORMAT, "-o", "-printf", FIND_FILE_FORMAT],
        cwd=root,
    ).stdout
    return sorted(out.splitlines())


def test_find_lists_the_same_tree(ws: Path, tree: Path) -> None:
    run(["cp", "-a", tree, ws / "copy"])
    assert _find(ws / "copy") == _find(tree)
    named = run(["find", ws / "copy", "-name", "*.bin", "-type", "f"]).stdout.split("\n")
    assert len([n for n in named if n]) == sum(1 for n in tree_entries(tree) if n.endswith(".bin"))


def test_du_counts_the_data(ws: Path, tree: Path) -> None:
    run(["cp", "-a", tree, ws / "copy"])
    inodes = {}
    for rel in tree_entries(tree):
        st = os.lstat(tree / rel)
        if stat.S_ISREG(st.st_mode):
            inodes[st.st_ino] = st.st_size
    data = sum(inodes.values())
    ndirs = sum(1 for rel in tree_entries(tree) if (tree / rel).is_dir()) + 1
    apparent = int(run(["du", "-s", "-b", ws / "copy"]).stdout.split()[0])
    assert data <= apparent <= data + ndirs * 65536 + 10_000
    allocated = int(run(["du", "-s", "-B1", ws / "copy"]).stdout.split()[0])
    assert allocated >= data * 0.9


def _ls_lR(root: Path) -> list[str]:
    out = run(
        ["ls", "-lRn", "--time-style=+%s.%N", "."], cwd=root, env={**os.environ, "LC_ALL": "C"}
    ).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith("total "):
            continue  # allocated blocks: differ between filesystems
        fields = line.split(None, 6)
        if len(fields) == 7:
            fields[0] = fields[0][:10]  # drop ACL/SELinux markers
            if fields[0].startswith("d"):
                fields[1] = fields[4] = "-"  # directory link counts and sizes are fs-specific
            line = " ".join(fields)
        lines.append(line)
    return lines


def test_ls_lR_shows_the_same_tree(ws: Path, tree: Path) -> None:
    run(["cp", "-a", tree, ws / "copy"])
    assert _ls_lR(ws / "copy") == _ls_lR(tree)


# --- tar and rsync -------------------------------------------------------------------------------


def test_tar_round_trip_preserves_modes_times_and_links(
    ws: Path, tree: Path, tmp_path: Path
) -> None:
    # POSIX (pax) format keeps nanosecond mtimes; the GNU default keeps only seconds.
    (ws / "x").mkdir()
    run(["sh", "-c", f"tar -C '{tree}' --format=posix -cf - . | tar -C '{ws}/x' -xpf -"])
    assert_same_tree(tree, ws / "x")
    (tmp_path / "back").mkdir()
    run(["sh", "-c", f"tar -C '{ws}/x' --format=posix -cf - . | tar -C '{tmp_path}/back' -xpf -"])
    assert_same_tree(tree, tmp_path / "back")


def test_tar_extracts_an_archive_file_into_the_mount(ws: Path, tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tree.tar.gz"
    run(["tar", "-C", tree.parent, "--format=posix", "-czf", archive, tree.name])
    run(["tar", "-C", ws, "-xzpf", archive])
    assert_same_tree(tree, ws / tree.name)
    assert " link to " in run(["tar", "-tzvf", archive]).stdout  # a hard link was archived


def test_rsync_a_then_a_second_rsync_changes_nothing(ws: Path, tree: Path) -> None:
    run(["rsync", "-a", f"{tree}/", f"{ws}/dst/"])
    assert_same_tree(tree, ws / "dst", hardlinks=False)
    second = run(["rsync", "-a", "--itemize-changes", f"{tree}/", f"{ws}/dst/"])
    assert second.stdout == ""


def test_rsync_checksum_pass_finds_no_difference(ws: Path, tree: Path) -> None:
    run(["rsync", "-a", f"{tree}/", f"{ws}/dst/"])
    second = run(["rsync", "-a", "--checksum", "--itemize-changes", f"{tree}/", f"{ws}/dst/"])
    assert second.stdout == ""


def test_rsync_updates_changed_files_by_rename_and_in_place(ws: Path, tree: Path) -> None:
    run(["rsync", "-a", f"{tree}/", f"{ws}/renamed/"])
    run(["rsync", "-a", f"{tree}/", f"{ws}/inplace/"])
    victim = tree / "private" / "f7.bin"
    data = bytearray(victim.read_bytes())
    data[150_000:150_010] = b"0123456789"
    victim.write_bytes(data)
    os.utime(victim, ns=(10**18, 10**18 + 1))
    (tree / "docs" / "f3.txt").unlink()
    os.utime(tree / "docs", ns=(10**18, 10**18 + 2))  # rsync compares times at 1 s granularity
    run(["rsync", "-a", "--delete", f"{tree}/", f"{ws}/renamed/"])  # temp file + rename
    run(["rsync", "-a", "--delete", "--inplace", f"{tree}/", f"{ws}/inplace/"])
    assert_same_tree(tree, ws / "renamed", hardlinks=False)
    assert_same_tree(tree, ws / "inplace", hardlinks=False)


# --- git -----------------------------------------------------------------------------------------


def _git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "LC_ALL": "C",
    }


def _make_repo(repo: Path, env: dict[str, str]) -> int:
    """A repository with several commits of text, binary, renames, deletes, modes and a symlink;
    returns the number of commits."""
    rng = random.Random(5)

    def git(*args: str) -> str:
        return run(["git", *args], cwd=repo, env=env).stdout

    repo.mkdir()
    git("-c", "init.defaultBranch=main", "init", "-q")
    (repo / "README").write_text("readme\n")
    (repo / "lib").mkdir()
    for i in range(20):
        (repo / "lib" / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 30)
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    (repo / "blob.bin").write_bytes(rng.randbytes(MiB + 17))
    git("add", "-A")
    git("commit", "-q", "-m", "binary")
    for i in range(0, 20, 3):
        with open(repo / "lib" / f"m{i}.py", "a") as f:
            f.write(f"# change {i}\n")
    git("commit", "-q", "-am", "modify")
    git("mv", "lib", "pkg")
    git("commit", "-q", "-m", "rename")
    git("rm", "-q", "pkg/m1.py")
    (repo / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("pkg/m0.py", repo / "link")
    git("add", "-A")
    git("commit", "-q", "-m", "delete, script, symlink")
    (repo / "blob.bin").write_bytes(rng.randbytes(MiB // 2))
    git("commit", "-q", "-am", "rewrite binary")
    return 6


def test_git_commits_gc_aggressive_and_fsck(ws: Path, tmp_path: Path) -> None:
    env = _git_env(tmp_path)
    repo = ws / "repo"
    commits = _make_repo(repo, env)
    run(["git", "gc", "--aggressive", "--prune=now", "-q"], cwd=repo, env=env)
    fsck = run(["git", "fsck", "--full", "--strict"], cwd=repo, env=env)
    assert "error" not in fsck.stderr.lower() and "missing" not in fsck.stdout
    assert run(["git", "rev-list", "--count", "HEAD"], cwd=repo, env=env).stdout.strip() == str(
        commits
    )
    assert run(["git", "status", "--porcelain"], cwd=repo, env=env).stdout == ""
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack"))


@pytest.mark.parametrize("mode", ["local", "no-local"])
def test_git_clone_inside_the_mount(ws: Path, tmp_path: Path, mode: str) -> None:
    env = _git_env(tmp_path)
    repo, clone = ws / "repo", ws / "clone"
    commits = _make_repo(repo, env)
    source = str(repo) if mode == "local" else f"file://{repo}"
    run(["git", "clone", "-q", source, clone], env=env)
    run(["git", "fsck", "--full"], cwd=clone, env=env)
    assert run(["git", "rev-list", "--count", "HEAD"], cwd=clone, env=env).stdout.strip() == str(
        commits
    )
    assert run(["git", "status", "--porcelain"], cwd=clone, env=env).stdout == ""
    run(["diff", "-r", "--no-dereference", "--exclude=.git", repo, clone])
    assert os.readlink(clone / "link") == "pkg/m0.py"
    assert os.stat(clone / "run.sh").st_mode & 0o111


# --- sqlite3 -------------------------------------------------------------------------------------


def test_sqlite3_wal_database_with_many_transactions(ws: Path) -> None:
    db = ws / "db.sqlite"
    script = [
        ".timeout 10000",
        "PRAGMA journal_mode=WAL;",
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL, b BLOB);",
        "CREATE INDEX t_v ON t(v);",
    ]
    rows = 0
    for i in range(500):
        statements = [
            f"INSERT INTO t(id, v, b) VALUES({i}, 'row{i}', randomblob({100 + (i * 37) % 3000}));",
            f"UPDATE t SET v = v || '+' WHERE id = {i // 2};",
        ]
        rows += 1
        if i % 50 == 49:
            statements.append(f"DELETE FROM t WHERE id = {i - 10};")
            rows -= 1
        script.append("BEGIN; " + " ".join(statements) + " COMMIT;")
    out = run(["sqlite3", db], input="\n".join(script) + "\n").stdout
    assert out.split() == ["wal"]
    check = run(
        ["sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t; PRAGMA journal_mode;"]
    ).stdout.split()
    assert check == ["ok", str(rows), "wal"]


def test_sqlite3_reader_while_writer_commits(ws: Path) -> None:
    db = ws / "db.sqlite"
    run(["sqlite3", db, "PRAGMA journal_mode=WAL; CREATE TABLE t(n INTEGER);"])
    script = ".timeout 10000\n" + "".join(
        f"BEGIN; INSERT INTO t VALUES({i}); COMMIT;\n" for i in range(300)
    )
    writer = subprocess.Popen(
        ["sqlite3", str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = [0]
    try:
        writer.stdin.write(script)
        writer.stdin.close()
        conn = sqlite3.connect(db, timeout=10)
        try:
            while writer.poll() is None:
                (count,) = conn.execute("SELECT count(*) FROM t").fetchone()
                assert count >= seen[-1]
                seen.append(count)
        finally:
            conn.close()
        assert writer.wait(120) == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    check = run(["sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;"]).stdout
    assert check.split() == ["ok", "300"]


# --- a Python virtualenv -------------------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tinypkg"
version = "0.1.0"

[project.scripts]
tinypkg-hello = "tinypkg:hello"

[tool.setuptools.packages.find]
where = ["src"]
"""


def _offline_pip_env(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # no index, find-links or constraints from the host
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PIP_NO_CACHE_DIR="1",
        TMPDIR=str(tmp),
    )
    return env


def _py_has(python: Path, module: str, env: dict[str, str]) -> bool:
    code = f"import importlib.util as u, sys; sys.exit(not u.find_spec({module!r}))"
    probe = subprocess.run(
        [str(python), "-c", code],
        env=env,
        capture_output=True,
        timeout=120,
    )
    return probe.returncode == 0


def test_virtualenv_in_the_mount_pip_installs_a_local_package(ws: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "tinypkg"
    (pkg / "src" / "tinypkg").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "src" / "tinypkg" / "__init__.py").write_text(
        "VALUE = 42\n\ndef hello():\n    print('hello from tinypkg')\n"
    )
    (ws / "tmp").mkdir()  # pip builds here: in the mount too
    env = _offline_pip_env(ws / "tmp")
    venv = ws / "venv"
    run([sys.executable, "-m", "venv", venv], env=env)  # with pip, from the bundled wheel
    python = venv / "bin" / "python"

    # Building from a pyproject.toml with --no-build-isolation needs setuptools and a
    # bdist_wheel (built into setuptools >= 70.1, else the `wheel` package) in the venv.
    needed = []
    if not _py_has(python, "setuptools", env):
        needed += ["setuptools", "wheel"]
    elif not (
        _py_has(python, "setuptools.command.bdist_wheel", env) or _py_has(python, "wheel", env)
    ):
        needed.append("wheel")
    if needed:
        if not any(SYSTEM_WHEELS.glob("wheel-*.whl")) or not any(
            SYSTEM_WHEELS.glob("setuptools-*.whl")
        ):
            pytest.fail(
                f"building offline needs {needed} from {SYSTEM_WHEELS}: "
                "install the Debian packages python3-setuptools-whl python3-wheel-whl"
            )
        run(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                SYSTEM_WHEELS,
                *needed,
            ],
            env=env,
        )

    run([python, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", pkg], env=env)
    assert run([python, "-c", "import tinypkg; print(tinypkg.VALUE)"], env=env).stdout == "42\n"
    assert run([venv / "bin" / "tinypkg-hello"], env=env).stdout == "hello from tinypkg\n"
    shown = run([python, "-m", "pip", "show", "tinypkg"], env=env).stdout
    assert "Version: 0.1.0" in shown
    run([python, "-m", "pip", "uninstall", "-q", "-y", "tinypkg"], env=env)
    assert not _py_has(python, "tinypkg", env)


# --- locks and mmap between processes ------------------------------------------------------------


def _hold(argv: list) -> subprocess.Popen[str]:
    """Start a lock holder that prints 'locked' once it holds the lock and exits when its stdin
    closes."""
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    assert line == "locked\n", line
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    proc.stdin.close()
    assert proc.wait(30) == 0


def test_flock_excludes_a_second_process(ws: Path) -> None:
    lock = ws / "lockfile"
    holder = _hold(["flock", lock, "-c", "echo locked; cat >/dev/null"])
    try:
        assert subprocess.run(["flock", "-n", lock, "true"], timeout=30).returncode == 1
    finally:
        _release(holder)
    assert subprocess.run(["flock", "-n", lock, "true"], timeout=30).returncode == 0


def test_flock_shared_locks_coexist_and_exclude_writers(ws: Path) -> None:
    lock = ws / "lockfile"
    holder = _hold(["flock", "-s", lock, "-c", "echo locked; cat >/dev/null"])
    try:
        assert subprocess.run(["flock", "-s", "-n", lock, "true"], timeout=30).returncode == 0
        assert subprocess.run(["flock", "-x", "-n", lock, "true"], timeout=30).returncode == 1
    finally:
        _release(holder)


LOCKF_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)  # bytes 0..99
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_fcntl_lockf_between_two_processes(ws: Path) -> None:
    (ws / "f").write_bytes(bytes(1000))
    holder = _hold([sys.executable, "-c", LOCKF_HOLDER, ws / "f"])
    fd = os.open(ws / "f", os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
        assert info.value.errno in (errno.EAGAIN, errno.EACCES)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)  # a disjoint range is free
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 100)
        _release(holder)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the holder's exit released its lock
    finally:
        os.close(fd)
        if holder.poll() is None:
            holder.kill()
            holder.wait()


MMAP_WRITER = textwrap.dedent(
    """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    with mmap.mmap(fd, 0) as m:
        for off in range(0, len(m), 4096):
            m[off:off + 8] = off.to_bytes(8, "little")
        m.flush()
    os.close(fd)
    """
)


def test_mmap_writes_of_another_process_are_seen_by_read(ws: Path) -> None:
    size = 64 * 4096 + 123
    (ws / "f").write_bytes(bytes(size))
    run([sys.executable, "-c", MMAP_WRITER, ws / "f"])
    data = (ws / "f").read_bytes()
    assert len(data) == size
    expected = bytearray(size)
    for off in range(0, size, 4096):
        expected[off : off + 8] = off.to_bytes(8, "little")
    assert data == bytes(expected)
