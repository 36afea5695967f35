"""Blob backends: where content-addressed blocks live (local disk, later S3)."""

from artifactfs.blobs.backend import BlobBackend, digest_hex
from artifactfs.blobs.local import LocalBackend

__all__ = ["BlobBackend", "LocalBackend", "digest_hex"]
