"""Blobs as objects in an S3-compatible bucket: `<prefix>/sha256/<hex[0:2]>/<hex[2:4]>/<hex>`.

This module owns the key layout in the bucket, the boto3 client (its timeouts and retry
policy), the translation of S3 and connection errors into the core's errors, and the reading of
credentials (the standard boto3 chain, or a 0600 file in the store). It also puts and gets
opaque named objects under `<prefix>/index/` for the index backups (`core/uploads.py`).

It must not know about files, inodes or SQL, must not cache (that is `blobs/cached.py`), must
not log keys or secrets, and must not run on the trio thread: every call is blocking network
I/O, meant for worker threads. boto3 clients are thread-safe; one client is shared.

Failure contract: a missing object raises `NotFound`; anything else (refused connection,
timeouts, 5xx after botocore's retries, 403) raises `StorageError` with one line that names the
endpoint and bucket, never the credentials.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifactfs.blobs.backend import digest_hex
from artifactfs.errors import InvalidArgument, NotFound, StorageError

# DeleteObjects takes at most 1000 keys per request.
_DELETE_BATCH = 1000
# What statfs reports as free: a bucket has no meaningful limit (mountpoint-s3 does the same).
BUCKET_FREE = 1 << 50


@dataclass(frozen=True)
class S3Location:
    """Where a store's objects live. Never holds credentials."""

    endpoint: str | None
    bucket: str
    prefix: str = ""
    region: str | None = None

    def describe(self) -> str:
        where = self.endpoint or "AWS S3"
        return f"s3://{self.bucket}/{self.prefix} at {where}"


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never print a secret by accident
        return "S3Credentials(<hidden>)"


def read_credentials_file(path: Path) -> S3Credentials:
    """Credentials from a JSON file ({"aws_access_key_id": ..., "aws_secret_access_key": ...})
    or an AWS-style INI file (its [default] section, or its only section)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise StorageError(f"cannot read credentials file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    try:
        loaded = json.loads(text)
        if isinstance(loaded, dict):
            values = {str(k).lower(): str(v) for k, v in loaded.items()}
    except ValueError:
        parser = configparser.ConfigParser()
        try:
            parser.read_string(text)
        except configparser.Error:
            raise StorageError(f"credentials file {path} is neither JSON nor INI") from None
        sections = parser.sections()
        name = "default" if "default" in sections else (sections[0] if sections else None)
        if name is not None:
            values = {k.lower(): v for k, v in parser[name].items()}
    key = values.get("aws_access_key_id") or values.get("access_key_id")
    secret = values.get("aws_secret_access_key") or values.get("secret_access_key")
    if not key or not secret:
        raise StorageError(
            f"credentials file {path} needs aws_access_key_id and aws_secret_access_key"
        )
    token = values.get("aws_session_token") or values.get("session_token")
    return S3Credentials(key, secret, token)


def write_credentials_file(path: Path, creds: S3Credentials) -> None:
    """Write `creds` as JSON into a new file of mode 0600 (created with that mode, so the
    secret is never readable by others, not even for a moment)."""
    data = {"aws_access_key_id": creds.access_key_id,
            "aws_secret_access_key": creds.secret_access_key}  # fmt: skip
    if creds.session_token:
        data["aws_session_token"] = creds.session_token
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(data) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_credentials_file_private(path: Path) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise StorageError(f"{path} is readable by other users (mode {mode:o}): chmod 600 it")


class S3Backend:
    """A `BlobBackend` on an S3-compatible bucket.

    `credentials` None uses boto3's standard chain (environment, ~/.aws, instance roles).
    `connect_timeout`/`read_timeout`/`attempts` bound how long one call can take when the
    endpoint is away: about attempts × (connect or read timeout) plus botocore's backoff.
    """

    def __init__(
        self,
        location: S3Location,
        credentials: S3Credentials | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        attempts: int = 3,
        max_connections: int = 32,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.location = location
        prefix = location.prefix.strip("/")
        self._prefix = f"{prefix}/" if prefix else ""
        self._blob_prefix = f"{self._prefix}sha256/"
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=max_connections,
            # Servers other than AWS often reject the CRC trailers boto3 >= 1.36 sends by
            # default; checksum only where the API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        )
        kwargs: dict[str, Any] = {"config": config, "region_name": location.region}
        if location.endpoint:
            kwargs["endpoint_url"] = location.endpoint
        if credentials is not None:
            kwargs["aws_access_key_id"] = credentials.access_key_id
            kwargs["aws_secret_access_key"] = credentials.secret_access_key
            kwargs["aws_session_token"] = credentials.session_token
        session = boto3.session.Session()
        self.client = session.client("s3", **kwargs)
        self.bucket = location.bucket
        self.list_page_size = 1000

    # -- keys -----------------------------------------------------------------------------------

    def key_of(self, digest: bytes) -> str:
        if len(digest) != 32:
            raise InvalidArgument(f"blob digest must be 32 bytes, not {len(digest)}")
        h = digest_hex(digest)
        return f"{self._blob_prefix}{h[0:2]}/{h[2:4]}/{h}"

    def index_key(self, name: str) -> str:
        return f"{self._prefix}index/{name}"

    # -- errors ---------------------------------------------------------------------------------

    def _fail(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"{what}: {describe_error(exc)} ({self.location.describe()})")

    # -- the BlobBackend protocol ---------------------------------------------------------------

    def put(self, digest: bytes, data: bytes | memoryview) -> bool:
        """HEAD, then PUT if absent. Returns False if the object was already there. (The
        cache's uploads call `put_object` directly: they know the object is wanted.)"""
        if self.has(digest):
            return False
        self.put_object(digest, data)
        return True

    def put_object(self, digest: bytes, data: bytes | memoryview) -> None:
        """PUT the object unconditionally, with Content-MD5 so the server rejects a body
        damaged on the way (rewriting identical content is harmless)."""
        key = self.key_of(digest)
        body = bytes(data)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5)
        except Exception as exc:
            raise self._fail(f"cannot upload blob {digest_hex(digest)}", exc) from None

    def get(self, digest: bytes) -> bytes:
        key = self.key_of(digest)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(resp["Body"].read())
        except Exception as exc:
            if is_not_found(exc):
                raise NotFound(f"blob {digest_hex(digest)} not found") from None
            raise self._fail(f"cannot fetch blob {digest_hex(digest)}", exc) from None

    def read(self, digest: bytes, offset: int, size: int) -> bytes:
        """A ranged GET. A zero-length read still checks that the object exists (HEAD)."""
        key = self.key_of(digest)
        if offset < 0 or size < 0:
            raise InvalidArgument(f"bad blob range: offset {offset}, size {size}")
        try:
            if size == 0:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return b""
            rng = f"bytes={offset}-{offset + size - 1}"
            resp = self.client.get_object(Bucket=self.bucket, Key=key, Range=rng)
            return bytes(resp["Body"].read())[:size]
        except Exception as exc:
            if is_not_found(exc):
                raise NotFound(f"blob {digest_hex(digest)} not found") from None
            if _error_code(exc) == "InvalidRange":
                # Past the end (or an empty object): S3 answers 416 where a file reads empty.
                if not self.has(digest):
                    raise NotFound(f"blob {digest_hex(digest)} not found") from None
                return b""
            raise self._fail(f"cannot read blob {digest_hex(digest)}", exc) from None

    def has(self, digest: bytes) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key_of(digest))
            return True
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise self._fail(f"cannot look up blob {digest_hex(digest)}", exc) from None

    def delete(self, digest: bytes) -> bool:
        """Remove the object; False if it was absent (a HEAD first: S3's DELETE does not
        say whether anything was there)."""
        if not self.has(digest):
            return False
        self.delete_many([digest])
        return True

    def delete_many(self, digests: list[bytes]) -> None:
        """Batch delete (DeleteObjects, 1000 keys a request, with Content-MD5, which some
        servers require and every server accepts)."""
        for i in range(0, len(digests), _DELETE_BATCH):
            keys = [{"Key": self.key_of(d)} for d in digests[i : i + _DELETE_BATCH]]
            self._delete_keys(keys)

    def _delete_keys(self, keys: list[dict[str, str]]) -> None:
        body = {"Objects": keys, "Quiet": True}
        try:
            resp = self.client.delete_objects(Bucket=self.bucket, Delete=body)
        except Exception as exc:
            raise self._fail(f"cannot delete {len(keys)} objects", exc) from None
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"cannot delete {len(errors)} objects: {first.get('Code')} "
                f"{first.get('Message')} ({self.location.describe()})"
            )

    def iterate(self) -> Iterator[tuple[bytes, int, float]]:
        """Every blob in the bucket under the prefix (ListObjectsV2, paginated)."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=self._blob_prefix,
                PaginationConfig={"PageSize": self.list_page_size},
            )
            for page in pages:
                for obj in page.get("Contents") or []:
                    name = obj["Key"].rsplit("/", 1)[-1]
                    if len(name) != 64:
                        continue
                    try:
                        digest = bytes.fromhex(name)
                    except ValueError:
                        continue
                    if obj["Key"] != self.key_of(digest):
                        continue  # misplaced: not a blob of this layout
                    yield digest, int(obj["Size"]), obj["LastModified"].timestamp()
        except Exception as exc:
            raise self._fail("cannot list the bucket", exc) from None

    def sync(self) -> None:
        """A completed PUT is durable in the bucket: nothing to do."""

    def usage(self) -> tuple[int, int]:
        """(0, a very large number): the bucket's size is not known without listing it all."""
        return 0, BUCKET_FREE

    def close(self) -> None:
        self.client.close()

    # -- bucket checks and named objects (index backups) --------------------------------------

    def check_bucket(self) -> None:
        """Raise a one-line `StorageError` unless the bucket exists and these credentials may
        use it (HEAD bucket): wrong keys and missing buckets are told apart."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            code = _error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"bucket {self.bucket} does not exist at "
                    f"{self.location.endpoint or 'AWS S3'}"
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(
                    f"access to bucket {self.bucket} denied: check the credentials "
                    f"({self.location.describe()})"
                ) from None
            if _is_no_credentials(exc):
                raise StorageError(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, "
                    "or pass --credentials-file"
                ) from None
            raise self._fail("cannot reach the bucket", exc) from None

    def put_named(self, name: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.index_key(name), Body=data, ContentMD5=md5
            )
        except Exception as exc:
            raise self._fail(f"cannot upload {name}", exc) from None

    def get_named(self, name: str) -> bytes:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.index_key(name))
            return bytes(resp["Body"].read())
        except Exception as exc:
            if is_not_found(exc):
                raise NotFound(f"{name} not found in {self.location.describe()}") from None
            raise self._fail(f"cannot fetch {name}", exc) from None

    def list_named(self) -> list[str]:
        """Names of the objects under `<prefix>/index/`, sorted."""
        prefix = self.index_key("")
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                out += [o["Key"][len(prefix) :] for o in page.get("Contents") or []]
        except Exception as exc:
            raise self._fail("cannot list the index backups", exc) from None
        return sorted(out)

    def delete_named(self, names: list[str]) -> None:
        for i in range(0, len(names), _DELETE_BATCH):
            self._delete_keys([{"Key": self.index_key(n)} for n in names[i : i + _DELETE_BATCH]])


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return None if code is None else str(code)
    return None


def is_not_found(exc: Exception) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")


def _is_no_credentials(exc: Exception) -> bool:
    return type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError")


def describe_error(exc: Exception) -> str:
    """One line for an S3 or connection error, without request ids or credentials."""
    code = _error_code(exc)
    if code is not None:
        msg = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        return f"{code} {msg}".strip().replace("\n", " ")
    if _is_no_credentials(exc):
        return "no credentials found"
    text = str(exc).replace("\n", " ")
    return text or type(exc).__name__
