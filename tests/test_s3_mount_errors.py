"""`artifactfs mount` of an S3 store checks its bucket first (real SeaweedFS): wrong keys, a
missing bucket and an endpoint that refuses or hangs each give one line and a non-zero exit
before any daemon starts, and leave no mount behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import is_mounted
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, closed_port

from artifactfs.blobs.s3 import S3Credentials
from artifactfs.store import S3Settings, init_store

pytestmark = pytest.mark.mounted

AFS = str(Path(sys.executable).parent / "artifactfs")
CREDS = S3Credentials(ACCESS_KEY, SECRET_KEY)
STORE_ERROR_EXIT = 2


def afs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # Only the store's own keys file counts: no AWS_* from the environment of the run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([AFS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)  # fmt: skip


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == STORE_ERROR_EXIT, (res.returncode, res.stdout, res.stderr)
    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("artifactfs: error:")]
    assert len(errs) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert SECRET_KEY not in res.stdout + res.stderr
    return errs[0]


@pytest.fixture
def store_and_mnt(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> Iterator[tuple[Path, Path]]:
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    settings = S3Settings(endpoint=s3_server.endpoint, bucket=s3_bucket, prefix=s3_prefix,
                          region=REGION)  # fmt: skip
    init_store(store, s3=settings, credentials=CREDS)
    try:
        yield store, mnt
    finally:
        if is_mounted(mnt):  # the check let a mount through: never leave it behind
            afs("umount", str(mnt))
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def edit_config(store: Path, **s3: str) -> None:
    config = json.loads((store / "store.json").read_text())
    config["s3"].update(s3)
    (store / "store.json").write_text(json.dumps(config))


def mount_fails(store: Path, mnt: Path) -> str:
    """Mount in the background (the user's path) and check it failed before spawning."""
    res = afs("mount", str(store), str(mnt))
    msg = one_line_error(res)
    assert not is_mounted(mnt)
    assert not list((store / "logs").glob("mount-*.log")), "a daemon was started"
    return msg


def test_wrong_secret(store_and_mnt: tuple[Path, Path]) -> None:
    store, mnt = store_and_mnt
    keys = store / "s3-credentials.json"
    keys.write_text(json.dumps({"aws_access_key_id": ACCESS_KEY,
                                "aws_secret_access_key": "not-the-secret"}))  # fmt: skip
    os.chmod(keys, 0o600)
    msg = mount_fails(store, mnt)
    assert "denied" in msg and "check the credentials" in msg
    assert "not-the-secret" not in msg
    # The same in the foreground (systemd, fstab): no daemon serves a store it cannot use.
    res = afs("mount", str(store), str(mnt), "--foreground")
    assert "denied" in one_line_error(res)
    assert not is_mounted(mnt)


def test_missing_bucket(s3_server: S3Server, store_and_mnt: tuple[Path, Path]) -> None:
    store, mnt = store_and_mnt
    bucket = s3_server.new_bucket()
    edit_config(store, bucket=bucket)
    s3_server.client().delete_bucket(Bucket=bucket)  # gone since the store was made
    msg = mount_fails(store, mnt)
    assert f"bucket {bucket} does not exist" in msg


def test_unreachable_endpoint_fails_fast(store_and_mnt: tuple[Path, Path]) -> None:
    store, mnt = store_and_mnt
    edit_config(store, endpoint=f"http://127.0.0.1:{closed_port()}")
    t = time.monotonic()
    msg = mount_fails(store, mnt)
    assert time.monotonic() - t < 10
    assert "cannot reach the bucket" in msg and "Could not connect" in msg


def test_hanging_endpoint_fails_within_bound(
    s3_server: S3Server, store_and_mnt: tuple[Path, Path]
) -> None:
    store, mnt = store_and_mnt
    s3_server.pause()  # accepts connections, never answers
    try:
        t = time.monotonic()
        msg = mount_fails(store, mnt)
        took = time.monotonic() - t
    finally:
        s3_server.resume()
    assert "cannot reach the bucket" in msg and "timeout" in msg.lower()
    assert took < 20  # two HEADs of at most 5 s each, and the CLI's start
