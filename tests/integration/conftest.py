"""Fixtures for the mounted integration tier.

`mnt` is a freshly initialised store mounted for one test (administrative view, allow_other);
`ws` is a fresh workspace namespace `MNT/t/shared/ws`, mode 0777 so other uids can work in it.

ARTIFACTFS_TEST_TARGET=plain turns `ws` into a plain directory on the host filesystem, to check
that the tests themselves are right; tests that need the grid or a daemon (`mnt`, `mount_dirs`)
skip in that mode.
"""

from __future__ import annotations

import os
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

# Mountpoints and plain workspaces live in world-traversable directories with this prefix:
# pytest's own tmp_path is under a 0700 directory that other uids cannot enter.
PUBLIC_PREFIX = "artifactfs-it-"


def _public_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix=PUBLIC_PREFIX))
    path.chmod(0o755)
    return path


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """An empty directory that every uid may traverse, removed after the test."""
    path = _public_dir()
    try:
        yield path
    finally:
        if not mountutil.is_mounted(path / "mnt"):  # never rmtree through a live mount
            shutil.rmtree(path, ignore_errors=True)


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
    else:
        mount: mountutil.Mount = request.getfixturevalue("mnt")
        path = mountutil.workspace(mount.mountpoint, "t", "shared", "ws")
        path.chmod(0o777)
        yield path


@pytest.fixture(scope="session", autouse=True)
def _no_mount_left_behind() -> Iterator[None]:
    """The suite must leave no FUSE mount of ours behind."""
    yield
    tmp = os.path.realpath(tempfile.gettempdir())
    left = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith(os.path.join(tmp, PUBLIC_PREFIX)):
                left.append(point)
    assert not left, f"mounts left behind by the integration tests: {left}"
