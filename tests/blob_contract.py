"""The one contract every `BlobBackend` must meet (local disk now, S3 later).

Use it by subclassing `BlobBackendContract` in a `test_*.py` module and providing a
`backend_factory` fixture: a callable that returns a new backend object over the *same* store
each time it is called (so the suite can check that blobs survive close and reopen). The suite
closes every backend it opens. This module is not collected on its own (its name does not start
with `test_`, nor does the class name start with `Test`).

    class TestLocalContract(BlobBackendContract):
        @pytest.fixture
        def backend_factory(self, tmp_path): return lambda: LocalBackend(tmp_path / "blobs")
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from artifactfs.blobs.backend import BlobBackend
from artifactfs.errors import NotFound

BackendFactory = Callable[[], BlobBackend]
THREADS = 8


def blob(seed: int | str, size: int = 1000) -> tuple[bytes, bytes]:
    """Deterministic pseudo-random content of `size` bytes and its digest."""
    data = hashlib.shake_256(str(seed).encode()).digest(size) if size else b""
    return hashlib.sha256(data).digest(), data


def run_threads(n: int, target: Callable[[int], object]) -> list[object]:
    """Run `target(i)` for i in range(n) on n threads released together; re-raises errors."""
    barrier = threading.Barrier(n)

    def start(i: int) -> object:
        barrier.wait()
        return target(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(start, range(n)))


class BlobBackendContract:
    """Behaviour every backend must show. Subclasses supply `backend_factory`."""

    @pytest.fixture
    def backend_factory(self) -> BackendFactory:
        raise NotImplementedError("a subclass must provide the backend_factory fixture")

    @pytest.fixture
    def open_backend(self, backend_factory: BackendFactory) -> Iterator[BackendFactory]:
        """Like backend_factory, but every backend it makes is closed at teardown."""
        made: list[BlobBackend] = []

        def make() -> BlobBackend:
            b = backend_factory()
            made.append(b)
            return b

        yield make
        for b in made:
            b.close()

    @pytest.fixture
    def backend(self, open_backend: BackendFactory) -> BlobBackend:
        return open_backend()

    # -- basics ---------------------------------------------------------------------------------

    def test_implements_protocol(self, backend: BlobBackend) -> None:
        assert isinstance(backend, BlobBackend)

    def test_put_then_get(self, backend: BlobBackend) -> None:
        d, data = blob(1)
        assert backend.put(d, data) is True
        assert backend.get(d) == data
        assert backend.has(d)

    def test_put_memoryview(self, backend: BlobBackend) -> None:
        d, data = blob(2, 5000)
        buf = bytearray(b"x" * 100 + data)
        assert backend.put(d, memoryview(buf)[100:]) is True
        assert backend.get(d) == data

    def test_put_twice_returns_false_and_keeps_content(self, backend: BlobBackend) -> None:
        d, data = blob(3)
        assert backend.put(d, data) is True
        assert backend.put(d, data) is False
        assert backend.get(d) == data
        assert [x[0] for x in backend.iterate()] == [d]

    def test_large_blob(self, backend: BlobBackend) -> None:
        d, data = blob(4, 4 * 1024 * 1024 + 1)
        assert backend.put(d, data)
        assert backend.get(d) == data
        assert backend.read(d, 4 * 1024 * 1024 - 10, 100) == data[-11:]

    def test_empty_blob(self, backend: BlobBackend) -> None:
        d, data = blob(5, 0)
        assert data == b""
        assert backend.put(d, data) is True
        assert backend.has(d)
        assert backend.get(d) == b""
        assert backend.read(d, 0, 10) == b""
        assert backend.read(d, 5, 10) == b""
        assert [(x[0], x[1]) for x in backend.iterate()] == [(d, 0)]

    # -- read -----------------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("offset", "size"),
        [(0, 1000), (0, 1), (0, 10), (123, 456), (999, 1), (990, 100), (0, 5000), (500, 0)],
    )
    def test_read_range(self, backend: BlobBackend, offset: int, size: int) -> None:
        d, data = blob(6)
        backend.put(d, data)
        assert backend.read(d, offset, size) == data[offset : offset + size]

    @pytest.mark.parametrize("offset", [1000, 1001, 10**9])
    def test_read_at_or_past_end_is_empty(self, backend: BlobBackend, offset: int) -> None:
        d, data = blob(7)
        backend.put(d, data)
        assert backend.read(d, offset, 10) == b""

    def test_many_reads_of_many_blobs(self, backend: BlobBackend) -> None:
        blobs = [blob(f"many-{i}", 300 + i) for i in range(40)]
        for d, data in blobs:
            backend.put(d, data)
        for _ in range(3):
            for d, data in blobs:
                assert backend.read(d, 100, 50) == data[100:150]
                assert backend.get(d) == data

    # -- absent ---------------------------------------------------------------------------------

    def test_absent(self, backend: BlobBackend) -> None:
        d, _ = blob("absent")
        assert not backend.has(d)
        with pytest.raises(NotFound):
            backend.get(d)
        with pytest.raises(NotFound):
            backend.read(d, 0, 10)
        with pytest.raises(NotFound):
            backend.read(d, 0, 0)

    # -- delete ---------------------------------------------------------------------------------

    def test_delete(self, backend: BlobBackend) -> None:
        d, data = blob(8)
        keep, keep_data = blob(9)
        backend.put(d, data)
        backend.put(keep, keep_data)
        assert backend.read(d, 0, 10) == data[:10]  # let a backend cache whatever it caches
        assert backend.delete(d) is True
        assert not backend.has(d)
        with pytest.raises(NotFound):
            backend.get(d)
        with pytest.raises(NotFound):
            backend.read(d, 0, 10)
        assert [x[0] for x in backend.iterate()] == [keep]
        assert backend.get(keep) == keep_data

    def test_delete_absent(self, backend: BlobBackend) -> None:
        d, data = blob(10)
        assert backend.delete(d) is False
        backend.put(d, data)
        assert backend.delete(d) is True
        assert backend.delete(d) is False

    def test_put_after_delete(self, backend: BlobBackend) -> None:
        d, data = blob(11)
        backend.put(d, data)
        backend.get(d)
        backend.delete(d)
        assert backend.put(d, data) is True
        assert backend.get(d) == data

    # -- iterate --------------------------------------------------------------------------------

    def test_iterate_empty(self, backend: BlobBackend) -> None:
        assert list(backend.iterate()) == []

    def test_iterate_lists_exactly_what_was_put(self, backend: BlobBackend) -> None:
        before = time.time()
        want = dict(blob(f"it-{i}", 10 * i) for i in range(30))
        for d, data in want.items():
            backend.put(d, data)
        got = list(backend.iterate())
        assert len(got) == len(want)
        assert {d: size for d, size, _ in got} == {d: len(data) for d, data in want.items()}
        for d, _, mtime in got:
            assert isinstance(d, bytes)
            assert len(d) == 32
            # A generous window: coarse filesystem and object-store clocks.
            assert before - 5 <= mtime <= time.time() + 5

    # -- usage, persistence ---------------------------------------------------------------------

    def test_usage(self, backend: BlobBackend) -> None:
        d, data = blob(12)
        backend.put(d, data)
        used, free = backend.usage()
        assert isinstance(used, int)
        assert isinstance(free, int)
        assert used >= 0
        assert free >= 0

    def test_survives_reopen(self, open_backend: BackendFactory) -> None:
        first = open_backend()
        d, data = blob(13)
        first.put(d, data)
        first.close()
        second = open_backend()
        assert second.has(d)
        assert second.get(d) == data
        assert second.put(d, data) is False

    # -- concurrency ----------------------------------------------------------------------------

    def test_concurrent_puts_same_digest(self, backend: BlobBackend) -> None:
        d, data = blob(14, 256 * 1024)
        results = run_threads(THREADS, lambda _: backend.put(d, data))
        # At least one writer; a backend may let more than one report True (identical bytes).
        assert results.count(True) >= 1
        assert backend.get(d) == data
        assert [(x[0], x[1]) for x in backend.iterate()] == [(d, len(data))]

    def test_concurrent_puts_different_digests(self, backend: BlobBackend) -> None:
        per_thread = 16
        blobs = [[blob(f"t{t}-{i}", 1000 + i) for i in range(per_thread)] for t in range(THREADS)]

        def put_mine(t: int) -> list[bool]:
            return [backend.put(d, data) for d, data in blobs[t]]

        results = run_threads(THREADS, put_mine)
        assert all(r == [True] * per_thread for r in results)
        want = {d: data for mine in blobs for d, data in mine}
        assert {d: size for d, size, _ in backend.iterate()} == {
            d: len(data) for d, data in want.items()
        }
        for d, data in want.items():
            assert backend.get(d) == data

    def test_concurrent_reads_and_puts(self, backend: BlobBackend) -> None:
        old = [blob(f"old-{i}", 2000) for i in range(20)]
        for d, data in old:
            backend.put(d, data)

        def work(t: int) -> None:
            for i in range(50):
                d, data = old[(t + i) % len(old)]
                off = (i * 37) % len(data)
                assert backend.read(d, off, 100) == data[off : off + 100]
                nd, ndata = blob(f"new-{t}-{i % 5}", 500)
                backend.put(nd, ndata)
                assert backend.get(nd) == ndata

        run_threads(THREADS, work)
        assert len(list(backend.iterate())) == len(old) + THREADS * 5
