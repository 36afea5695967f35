"""S3Backend against a real SeaweedFS on loopback: the shared blob contract, plus what only S3
has (key layout, batch delete, one-line errors for wrong keys, missing bucket, closed port)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from blob_contract import BackendFactory, BlobBackendContract, blob
from s3server import ACCESS_KEY, REGION, S3Server, closed_port

from artifactfs.blobs.s3 import S3Backend, S3Credentials, S3Location
from artifactfs.errors import StorageError

CREDS = S3Credentials(ACCESS_KEY, "artifactfs-test-secret-0123456789")


def make(server: S3Server, bucket: str, prefix: str = "p", **kw: object) -> S3Backend:
    loc = S3Location(server.endpoint, bucket, prefix, REGION)
    return S3Backend(loc, CREDS, **kw)  # type: ignore[arg-type]


class TestS3Contract(BlobBackendContract):
    @pytest.fixture
    def backend_factory(
        self, s3_server: S3Server, s3_bucket: str, s3_prefix: str
    ) -> BackendFactory:
        return lambda: make(s3_server, s3_bucket, s3_prefix)


def test_key_layout(s3_server: S3Server, s3_bucket: str, s3_prefix: str) -> None:
    b = make(s3_server, s3_bucket, prefix=f"{s3_prefix}/a/")
    d, data = blob("layout")
    b.put(d, data)
    h = d.hex()
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix=s3_prefix)
    assert [o["Key"] for o in listing["Contents"]] == [f"{s3_prefix}/a/sha256/{h[:2]}/{h[2:4]}/{h}"]
    b.close()


def test_batch_delete(s3_server: S3Server, s3_bucket: str, s3_prefix: str) -> None:
    b = make(s3_server, s3_bucket, s3_prefix)
    blobs = [blob(f"del-{i}", 100) for i in range(30)]
    for d, data in blobs:
        b.put(d, data)
    b.delete_many([d for d, _ in blobs[:25]])
    assert {d for d, _, _ in b.iterate()} == {d for d, _ in blobs[25:]}
    b.close()


def test_listing_paginates(s3_server: S3Server, s3_bucket: str, s3_prefix: str) -> None:
    b = make(s3_server, s3_bucket, s3_prefix)
    b.list_page_size = 25
    want = {blob(f"page-{i}", 10)[0] for i in range(120)}  # five pages

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda d: b.put_object(d, b""), want))
    assert {d for d, _, _ in b.iterate()} == want
    b.close()


def test_wrong_secret_is_one_line(s3_server: S3Server, s3_bucket: str) -> None:
    loc = S3Location(s3_server.endpoint, s3_bucket, "p", REGION)
    b = S3Backend(loc, S3Credentials(ACCESS_KEY, "wrong-secret"), attempts=1)
    with pytest.raises(StorageError) as info:
        b.check_bucket()
    assert "denied" in info.value.message
    assert "wrong-secret" not in info.value.message
    assert "\n" not in info.value.message
    with pytest.raises(StorageError):
        b.put(*blob("x"))


def test_missing_bucket_is_one_line(s3_server: S3Server) -> None:
    b = make(s3_server, "no-such-bucket-here")
    with pytest.raises(StorageError) as info:
        b.check_bucket()
    assert "does not exist" in info.value.message


def test_closed_port_fails_fast(s3_bucket: str) -> None:
    import time

    loc = S3Location(f"http://127.0.0.1:{closed_port()}", s3_bucket, "p", REGION)
    b = S3Backend(loc, CREDS, connect_timeout=1, read_timeout=1, attempts=2)
    t = time.monotonic()
    with pytest.raises(StorageError) as info:
        b.get(blob("x")[0])
    assert time.monotonic() - t < 10
    assert "\n" not in info.value.message
