"""LocalBackend: the shared blob contract, plus what only a local disk has (layout, temp files,
disk-full handling, descriptor cache, several processes on one tree)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from blob_contract import BackendFactory, BlobBackendContract, blob, run_threads

from artifactfs.blobs.backend import BlobBackend
from artifactfs.blobs.local import LocalBackend
from artifactfs.errors import Corrupt, InvalidArgument, NoSpace, NotFound, StorageError


class TestLocalContract(BlobBackendContract):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> BackendFactory:
        return lambda: LocalBackend(tmp_path / "blobs")


class TestLocalContractNotDurable(BlobBackendContract):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> BackendFactory:
        return lambda: LocalBackend(tmp_path / "blobs", durable=False, max_open_files=2)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store" / "blobs"


@pytest.fixture
def local(root: Path) -> Iterator[LocalBackend]:
    b = LocalBackend(root)
    yield b
    b.close()


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_on_disk_layout(local: LocalBackend, root: Path) -> None:
    d, data = blob("layout")
    local.put(d, data)
    h = d.hex()
    path = root / "sha256" / h[0:2] / h[2:4] / h
    assert local.path_of(d) == path
    assert path.read_bytes() == data
    assert all_files(root) == [path]
    assert path.stat().st_mode & 0o222 == 0  # blobs are immutable, stored read-only


def test_no_temp_files_left_after_puts(local: LocalBackend, root: Path) -> None:
    def work(t: int) -> None:
        for i in range(30):
            local.put(*blob(f"{t}-{i % 10}", 3000))

    run_threads(8, work)
    assert temp_files(root) == []
    assert len(all_files(root)) == 80


def test_concurrent_same_digest_exactly_one_writer(local: LocalBackend) -> None:
    d, data = blob("once", 100_000)
    results = run_threads(8, lambda _: local.put(d, data))
    assert results.count(True) == 1
    assert local.usage()[0] == len(data)


def test_invalid_digest(local: LocalBackend) -> None:
    with pytest.raises(InvalidArgument):
        local.put(b"short", b"x")
    with pytest.raises(InvalidArgument):
        local.get(b"\0" * 31)
    d, data = blob("range")
    local.put(d, data)
    with pytest.raises(InvalidArgument):
        local.read(d, -1, 10)


@pytest.mark.parametrize("victim", ["write", "fsync"])
def test_disk_full_raises_nospace_and_leaves_no_temp(
    local: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    local.put(*blob("before"))  # directories exist; the failure hits the blob write itself
    calls: list[int] = []

    def full(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, victim, full)
    d, data = blob("full")
    with pytest.raises(NoSpace):
        local.put(d, data)
    monkeypatch.undo()
    assert calls, "the failure was never injected"
    assert temp_files(root) == []
    assert not local.has(d)
    assert local.put(d, data) is True  # nothing stuck: the same put works once space is back
    assert local.get(d) == data


def test_disk_full_on_first_put_into_new_directory(
    local: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "mkdir", full)
    with pytest.raises(NoSpace):
        local.put(*blob("nodir"))
    monkeypatch.undo()
    assert local.put(*blob("nodir")) is True


def test_other_error_raises_storage_error_with_one_line(
    local: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local.put(*blob("before"))

    def eio(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    d, data = blob("eio")
    with pytest.raises(StorageError) as info:
        local.put(d, data)
    assert not isinstance(info.value, NoSpace)
    assert "\n" not in info.value.message
    assert d.hex() in info.value.message
    monkeypatch.undo()
    assert temp_files(root) == []
    assert not local.has(d)


def test_short_writes_are_completed(
    local: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def dribble(fd: int, buf: bytes) -> int:
        return real_write(fd, memoryview(buf)[:1000])

    monkeypatch.setattr(os, "write", dribble)
    d, data = blob("short", 10_000)
    assert local.put(d, data)
    monkeypatch.undo()
    assert local.get(d) == data


def test_write_making_no_progress_fails(
    local: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "write", lambda fd, buf: 0)
    d, data = blob("stuck")
    with pytest.raises(StorageError):
        local.put(d, data)
    monkeypatch.undo()
    assert temp_files(root) == []
    assert not local.has(d)


def test_interrupted_put_removes_temp(
    local: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupt)
    with pytest.raises(KeyboardInterrupt):
        local.put(*blob("interrupted"))
    monkeypatch.undo()
    assert temp_files(root) == []


def test_sweep_temp(local: LocalBackend, root: Path) -> None:
    d, data = blob("kept")
    local.put(d, data)
    leaf = local.path_of(d).parent
    old = leaf / ".tmp-crashed-1"
    young = leaf / ".tmp-live-2"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert [x[0] for x in local.iterate()] == [d]  # temp files are never listed
    assert local.sweep_temp(600) == 1
    assert not old.exists()
    assert young.exists()
    assert local.sweep_temp(0) == 1
    assert temp_files(root) == []
    assert local.get(d) == data
    assert local.sweep_temp(0) == 0


def test_sweep_temp_on_empty_store(local: LocalBackend) -> None:
    assert local.sweep_temp(0) == 0  # root does not even exist yet
    assert list(local.iterate()) == []


def test_iterate_skips_strays(local: LocalBackend, root: Path) -> None:
    d, data = blob("real")
    local.put(d, data)
    leaf = local.path_of(d).parent
    (leaf / "README").write_text("not a blob")
    misplaced = "f" * 64
    (leaf / misplaced).write_bytes(b"wrong directory")
    assert [x[0] for x in local.iterate()] == [d]


def test_verify_reads_detects_flipped_byte(root: Path) -> None:
    d, data = blob("flip", 4096)
    LocalBackend(root).put(d, data)
    path = LocalBackend(root).path_of(d)
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(1234)
        f.write(bytes([data[1234] ^ 0x01]))

    checking = LocalBackend(root, verify_reads=True)
    with pytest.raises(Corrupt):
        checking.get(d)
    checking.close()
    trusting = LocalBackend(root)
    assert trusting.get(d) != data  # without verify_reads the damage goes unnoticed
    trusting.close()


def test_verify_reads_passes_good_blobs(root: Path) -> None:
    b = LocalBackend(root, verify_reads=True)
    for i in range(5):
        d, data = blob(f"good-{i}", 100 * i)
        b.put(d, data)
        assert b.get(d) == data
    b.close()


def test_fd_cache_is_bounded(root: Path) -> None:
    b = LocalBackend(root, max_open_files=4)
    blobs = [blob(f"fd-{i}", 5000 + i) for i in range(20)]
    for d, data in blobs:
        b.put(d, data)
    before = open_fd_count()
    for rnd in range(3):
        for d, data in blobs[rnd:] + blobs[:rnd]:
            assert b.read(d, 17, 100) == data[17:117]
            assert b.get(d) == data
            assert open_fd_count() <= before + 4
    b.close()
    assert open_fd_count() == before


def test_fd_cache_bounded_under_threads(root: Path) -> None:
    b = LocalBackend(root, max_open_files=4)
    blobs = [blob(f"fdt-{i}", 2000) for i in range(20)]
    for d, data in blobs:
        b.put(d, data)
    before = open_fd_count()

    def work(t: int) -> None:
        for i in range(200):
            d, data = blobs[(t * 7 + i) % 20]
            assert b.read(d, i % 2000, 64) == data[i % 2000 : i % 2000 + 64]

    run_threads(8, work)
    assert open_fd_count() <= before + 4
    b.close()
    assert open_fd_count() == before


def test_delete_drops_cached_fd(root: Path) -> None:
    b = LocalBackend(root)
    d, data = blob("cached")
    b.put(d, data)
    before = open_fd_count()
    b.get(d)
    assert open_fd_count() == before + 1
    b.delete(d)
    assert open_fd_count() == before
    with pytest.raises(NotFound):
        b.read(d, 0, 1)


def test_usage_tracks_puts_and_deletes(local: LocalBackend, root: Path) -> None:
    assert local.usage()[0] == 0
    d1, data1 = blob("u1", 1000)
    d2, data2 = blob("u2", 3000)
    local.put(d1, data1)
    local.put(d2, data2)
    local.put(d2, data2)  # already present: not counted twice
    used, free = local.usage()
    assert used == 4000
    st = os.statvfs(root)
    assert abs(free - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024
    local.delete(d1)
    assert local.usage()[0] == 3000

    # A fresh object knows nothing until it recounts.
    fresh = LocalBackend(root)
    assert fresh.usage()[0] == 0
    assert fresh.recount_usage() == 3000
    assert fresh.usage()[0] == 3000


def test_recreates_directory_removed_behind_its_back(local: LocalBackend, root: Path) -> None:
    d, data = blob("gone")
    local.put(d, data)
    local.delete(d)
    leaf = local.path_of(d).parent
    leaf.rmdir()  # e.g. an external clean-up of empty directories
    assert local.put(d, data) is True
    assert local.get(d) == data


def test_is_a_blob_backend(local: LocalBackend) -> None:
    assert isinstance(local, BlobBackend)


_CHILD = """
import hashlib, sys
from pathlib import Path
from artifactfs.blobs.local import LocalBackend
b = LocalBackend(Path(sys.argv[1]))
me = sys.argv[2]
for i in range(40):
    data = hashlib.shake_256(f"shared-{i % 10}".encode()).digest(200_000)
    b.put(hashlib.sha256(data).digest(), data)
    data = hashlib.shake_256(f"own-{me}-{i}".encode()).digest(5_000)
    b.put(hashlib.sha256(data).digest(), data)
"""


def test_concurrent_puts_from_several_processes(root: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(n)]) for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    assert temp_files(root) == []
    b = LocalBackend(root, verify_reads=True)
    got = list(b.iterate())
    assert len(got) == 10 + 4 * 40
    for d, _, _ in got:
        data = b.get(d)  # verify_reads checks each blob hashes to its name
        assert hashlib.sha256(data).digest() == d
    b.close()


def test_dedup_put_refreshes_mtime_and_guarded_delete(tmp_path: Path) -> None:
    """gc's guarded delete keeps a blob a writer put again (a dedup hit) after gc chose it."""
    import hashlib
    import os
    import time as _time

    from artifactfs.blobs.local import LocalBackend

    b = LocalBackend(tmp_path / "blobs")
    data = b"reused block"
    d = hashlib.sha256(data).digest()
    assert b.put(d, data)
    path = tmp_path / "blobs" / "sha256" / d.hex()[:2] / d.hex()[2:4] / d.hex()
    os.utime(path, (1, 1))  # an old, garbage blob
    cutoff = _time.time_ns() - 10**9
    assert not b.put(d, data)  # a writer reuses it: mtime refreshed
    assert not b.delete_if_older(d, cutoff)
    assert b.has(d) and b.get(d) == data
    os.utime(path, (1, 1))
    assert b.delete_if_older(d, cutoff)
    assert not b.has(d)
    assert not b.delete_if_older(d, cutoff)
    b.close()


# ---- read-ahead -------------------------------------------------------------------------------


def _cached(path: Path, size: int) -> bool:
    """Whether all of `path` is in the page cache (mincore(2); a read to find out would
    itself start a read-ahead)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), "mmap failed"
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, "mincore failed"
            return all(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_prefetch_reads_blob_files_ahead(local: LocalBackend) -> None:
    """A sequential reader's next blocks are brought into the page cache in the background,
    and their descriptors are cached for the reads that follow."""
    blobs = [blob(f"ahead-{i}", 256 * 1024) for i in range(3)]
    for d, data in blobs:
        local.put(d, data)
    paths = [local.path_of(d) for d, _ in blobs]
    for path in paths:
        _evict(path)  # written with fsync: clean pages, dropped
    if any(_cached(path, 256 * 1024) for path in paths):
        pytest.skip("this filesystem keeps file contents cached (tmpfs?)")
    missing = hashlib.sha256(b"no such blob").digest()
    assert local.prefetch([d for d, _ in blobs] + [missing]) == 4
    deadline = time.monotonic() + 10
    while not all(_cached(path, 256 * 1024) for path in paths):
        assert time.monotonic() < deadline, "the blobs were not read ahead"
        time.sleep(0.01)
    assert all(d in local._fds for d, _ in blobs)
    assert local.prefetch([d for d, _ in blobs]) == 0  # each reader request names them again
    assert local.read(blobs[1][0], 10, 5) == blobs[1][1][10:15]
    local.close()  # waits for the read-ahead threads; the backend stays usable
    assert local.get(blobs[0][0]) == blobs[0][1]


_KPF_DIRTY = 1 << 4


def _dirty_pages(path: Path) -> tuple[int, int]:
    """(dirty pages, pages) of `path` in the page cache, from the kernel's page flags: each
    page is mapped (a private mapping maps the cached page itself until written), its frame
    looked up in /proc/self/pagemap and its flags in /proc/kpageflags (root only)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        dirty = 0
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kf:
            for i in range(pages):
                m[i * mmap.PAGESIZE]  # map it
                pagemap.seek((base // mmap.PAGESIZE + i) * 8)
                entry = int.from_bytes(pagemap.read(8), "little")
                assert entry >> 63, "page not present"
                frame = entry & ((1 << 55) - 1)
                assert frame, "no frame numbers in pagemap (not root?)"
                kf.seek(frame * 8)
                if int.from_bytes(kf.read(8), "little") & _KPF_DIRTY:
                    dirty += 1
        return dirty, pages
    finally:
        m.close()


def test_large_blob_writeback_starts_at_put(root: Path) -> None:
    """Without per-put fsync, a large blob's data is sent to the disk as it is put, so a
    later `sync` waits for little; small blobs are left dirty for the kernel to batch."""
    if os.geteuid() != 0 or not os.access("/proc/kpageflags", os.R_OK):
        pytest.skip("page flags need root")
    b = LocalBackend(root, durable=False)
    try:
        small_d, small = blob("late", 64 * 1024)
        large_d, large = blob("early", 4 << 20)
        b.put(small_d, small)
        b.put(large_d, large)
        dirty, pages = _dirty_pages(b.path_of(small_d))
        if dirty == 0:
            pytest.skip("this filesystem does not keep written pages dirty (tmpfs?)")
        assert dirty == pages  # the measure works: nothing started the small one's writeback
        # sync_file_range(WRITE) marks every page for writeback before it returns.
        assert _dirty_pages(b.path_of(large_d))[0] == 0
        b.sync()
    finally:
        b.close()
