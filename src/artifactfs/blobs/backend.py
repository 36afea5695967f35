"""The blob backend protocol: a flat map from SHA-256 digest to immutable bytes.

Backends are synchronous and thread-safe: the layers above call them from worker threads
(`trio.to_thread.run_sync` with the store's blob `CapacityLimiter`), never on the trio thread.
A backend knows nothing of files, inodes or SQL; it stores and returns whole blobs (blocks and,
later, checkpoint manifests) under their digest. Digests are raw 32-byte SHA-256 values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


def digest_hex(digest: bytes) -> str:
    return digest.hex()


@runtime_checkable
class BlobBackend(Protocol):
    """What every blob store implements (local disk now, S3 later)."""

    def put(self, digest: bytes, data: bytes | memoryview) -> bool:
        """Store `data` under `digest` atomically and durably.

        The caller has computed `digest = sha256(data)`. Returns False if the blob was already
        present (nothing written), True if it was written. Raises `NoSpace` when the medium is
        full (permanent, never retried) and `StorageError` for other failures.
        """
        ...

    def get(self, digest: bytes) -> bytes:
        """The whole blob. Raises `NotFound` if absent, `Corrupt` if `verify` is on and it
        does not hash to `digest`."""
        ...

    def read(self, digest: bytes, offset: int, size: int) -> bytes:
        """`size` bytes from `offset` of the blob (fewer at its end). Raises `NotFound`."""
        ...

    def sync(self) -> None:
        """Make every blob stored so far durable (a no-op where puts are durable already)."""
        ...

    def has(self, digest: bytes) -> bool:
        """Whether the blob is stored."""
        ...

    def delete(self, digest: bytes) -> bool:
        """Remove the blob; returns False if it was absent."""
        ...

    def iterate(self) -> Iterator[tuple[bytes, int, float]]:
        """Every stored blob as (digest, size, mtime as a Unix time), in no particular order."""
        ...

    def usage(self) -> tuple[int, int]:
        """(bytes used by blobs, bytes still free on the medium) for statfs; free may be an
        estimate."""
        ...

    def close(self) -> None:
        """Release cached file descriptors and connections."""
        ...
