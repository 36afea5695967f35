"""Fixtures for the mounted integration tier.

`mnt` is a freshly initialised store mounted for one test (administrative view, allow_other),
unmounted afterwards with a check that the daemon exited 0 without a traceback.

`ws` is a fresh, empty workspace namespace `MNT/t/shared/<name>` (mode 0777, so other uids can
work in it). Starting a daemon costs about a second, so by default the `ws` tests of one module
share a mount and each gets its own new namespace; after every test the daemon must still be
running and must not have logged a traceback during it, and the module's mount ends with the same
clean-exit check as `mnt`. A daemon that died is replaced by a new mount for the next test.
ARTIFACTFS_TEST_MOUNT_PER_TEST=1 gives every `ws` test its own store and mount (`MNT/t/shared/ws`).

ARTIFACTFS_TEST_TARGET=plain turns `ws` into a plain directory on the host filesystem, to check
that the tests themselves are right; tests that need the grid or a daemon (`mnt`, `mount_dirs`)
skip in that mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mountutil

TARGET = os.environ.get("ARTIFACTFS_TEST_TARGET", "mount")
PLAIN = TARGET == "plain"
if TARGET not in ("mount", "plain"):
    raise pytest.UsageError(f"ARTIFACTFS_TEST_TARGET must be 'mount' or 'plain', not {TARGET!r}")
MOUNT_PER_TEST = os.environ.get("ARTIFACTFS_TEST_MOUNT_PER_TEST", "") not in ("", "0")

# Mountpoints and plain workspaces live in world-traversable directories with this prefix:
# pytest's own tmp_path is under a 0700 directory that other uids cannot enter.
PUBLIC_PREFIX = "artifactfs-it-"


def _public_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix=PUBLIC_PREFIX))
    path.chmod(0o755)
    return path


def _remove_public_dir(path: Path) -> None:
    for child in path.iterdir() if path.exists() else ():
        if mountutil.is_mounted(child):  # never rmtree through a live mount
            return
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """An empty directory that every uid may traverse, removed after the test."""
    path = _public_dir()
    try:
        yield path
    finally:
        _remove_public_dir(path)


def _require_mount_tools() -> None:
    if not mountutil.ARTIFACTFS.exists():
        pytest.fail(
            f"{mountutil.ARTIFACTFS} is missing: install the package (scripts/setup.sh), "
            "or run with ARTIFACTFS_TEST_TARGET=plain to check the tests on a plain directory"
        )
    if shutil.which(mountutil.FUSERMOUNT) is None or not os.path.exists("/dev/fuse"):
        pytest.fail("FUSE is not available: install fuse3 and make /dev/fuse accessible")


@pytest.fixture
def mount_dirs(tmp_path: Path, public_dir: Path) -> tuple[Path, Path]:
    """(store, mountpoint) for tests that drive mounts themselves; skips in plain mode."""
    if PLAIN:
        pytest.skip("needs a real artifactfs mount (ARTIFACTFS_TEST_TARGET=plain)")
    _require_mount_tools()
    mountpoint = public_dir / "mnt"
    mountpoint.mkdir()
    return tmp_path / "store", mountpoint


@pytest.fixture
def mnt(mount_dirs: tuple[Path, Path]) -> Iterator[mountutil.Mount]:
    """A new store mounted (allow_other) for this test; unmounted and checked afterwards."""
    store, mountpoint = mount_dirs
    with mountutil.mounted(store, mountpoint) as mount:
        yield mount


class _SharedMount:
    """One mount shared by the `ws` tests of a module, replaced when its daemon has died."""

    def __init__(self, stores: Path) -> None:
        self._stores = stores
        self._public = _public_dir()
        self._context: contextlib.AbstractContextManager[mountutil.Mount] | None = None
        self.mount: mountutil.Mount | None = None
        self._count = 0

    def current(self) -> mountutil.Mount:
        if self.mount is not None and self.mount.proc.poll() is not None:
            self.close(report=False)  # the test it died in has already failed
        if self.mount is None:
            self._count += 1
            mountpoint = self._public / f"mnt{self._count}"
            mountpoint.mkdir()
            context = mountutil.mounted(self._stores / f"store{self._count}", mountpoint)
            self.mount = context.__enter__()
            self._context = context
        return self.mount

    def close(self, *, report: bool = True) -> None:
        context, self._context, self.mount = self._context, None, None
        try:
            if context is not None:
                context.__exit__(None, None, None)
        except Exception:
            if report:
                raise
        finally:
            if report:
                _remove_public_dir(self._public)


@pytest.fixture(scope="module")
def _shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SharedMount]:
    shared = _SharedMount(tmp_path_factory.mktemp("stores"))
    try:
        yield shared
    finally:
        shared.close()


def _namespace_name(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("._")
    return name[:200] or "ws"


@pytest.fixture
def ws(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh, empty workspace directory (mode 0777) to behave like a local POSIX directory."""
    if PLAIN:
        base = _public_dir()
        path = base / "ws"
        path.mkdir()
        path.chmod(0o777)
        try:
            yield path
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return

    shared: _SharedMount | None = None
    if MOUNT_PER_TEST:
        mount: mountutil.Mount = request.getfixturevalue("mnt")
        name = "ws"
    else:
        _require_mount_tools()
        shared = request.getfixturevalue("_shared_mount")
        mount = shared.current()
        name = _namespace_name(request)
    log_start = mount.log_path.stat().st_size
    path = mountutil.workspace(mount.mountpoint, "t", "shared", name)
    path.chmod(0o777)
    # The workspace really is on the FUSE mount, not on the directory below it.
    assert (mountutil.mount_fstype(mount.mountpoint) or "").startswith("fuse")
    assert os.stat(path).st_dev == os.stat(mount.mountpoint).st_dev
    yield path

    # Attribute daemon failures to the test that caused them.
    with open(mount.log_path, "rb") as log:
        log.seek(log_start)
        new_log = log.read().decode(errors="replace")
    problem = None
    if mount.proc.poll() is not None:
        problem = (
            f"the daemon exited with status {mount.proc.returncode} during this test; "
            f"log tail:\n{mount.log_tail()}"
        )
    elif "Traceback" in new_log:
        problem = f"the daemon logged a traceback during this test:\n{new_log[-6000:]}"
    if problem:
        if shared is not None:
            shared.close(report=False)  # reported here; the next test gets a new mount
        pytest.fail(problem)


@pytest.fixture(scope="session", autouse=True)
def _no_mount_left_behind() -> Iterator[None]:
    """The suite must leave no FUSE mount of ours behind."""
    yield
    prefix = os.path.join(os.path.realpath(tempfile.gettempdir()), PUBLIC_PREFIX)
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    assert not left, f"mounts left behind by the integration tests: {left}"
