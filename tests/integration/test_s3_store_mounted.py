"""An S3-backed store mounted for real (SeaweedFS on loopback): real programs write into the
local cache, `artifactfs sync` puts every block in the bucket after an unmount or a kill -9,
reads come back from the bucket when the cache is gone, and a store restored from the bucket
on a fresh directory mounts with every byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import is_mounted, kill_daemon, mounted, workspace
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from artifactfs.blobs.s3 import S3Credentials
from artifactfs.store import S3Settings, Store, init_store

pytestmark = pytest.mark.mounted

AFS = str(Path(sys.executable).parent / "artifactfs")
CREDS = S3Credentials(ACCESS_KEY, SECRET_KEY)


def settings(server: S3Server, bucket: str, prefix: str) -> S3Settings:
    return S3Settings(endpoint=server.endpoint, bucket=bucket, prefix=prefix, region=REGION,
                      connect_timeout=2, read_timeout=5, fetch_timeout=10)  # fmt: skip


def afs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([AFS, *args], capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def make_tree(root: Path) -> None:
    """A small source-like tree plus a few multi-block files."""
    for d in range(6):
        sub = root / f"pkg{d}" / "mod"
        sub.mkdir(parents=True)
        for f in range(15):
            data = hashlib.shake_256(b"%d-%d" % (d, f)).digest(300 + f * 97)
            (sub / f"f{f}.py").write_bytes(data)
    (root / "big.bin").write_bytes(hashlib.shake_256(b"big").digest(3 * 1024 * 1024 + 17))
    (root / "empty").write_bytes(b"")


def digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def queue(store: Path) -> int:
    st = Store(store)
    try:
        return st.index.upload_queue_stats()[0]
    finally:
        st.close()


def test_mounted_s3_store_sync_kill_and_restore(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    want = digests(src)
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    init_store(store, s3=settings(s3_server, s3_bucket, s3_prefix), credentials=CREDS)

    # Real programs write into the cache; an unmount, then sync uploads everything.
    with mounted(store, mnt, init=False) as m:
        ws = workspace(m.mountpoint)
        subprocess.run(["cp", "-a", f"{src}/.", str(ws / "copy")], check=True)
        subprocess.run(["tar", "-cf", str(tmp_path / "t.tar"), "-C", str(src), "."], check=True)
        (ws / "untar").mkdir()
        subprocess.run(["tar", "-xf", str(tmp_path / "t.tar"), "-C", str(ws / "untar")],
                       check=True)  # fmt: skip
        assert digests(ws / "copy") == want
    # (Without the uploader in the daemon the queue is full here; with it, it may be empty.)
    afs("sync", "--store", str(store))
    assert queue(store) == 0

    # The cache is lost: every block comes back from the bucket, verified.
    shutil.rmtree(store / "cache")
    (store / "cache").mkdir(mode=0o700)
    with mounted(store, mnt, init=False) as m:
        ws = m.mountpoint / "t" / "shared" / "ws"
        assert digests(ws / "untar") == want
        # A daemon killed with blocks not yet uploaded: fsync'ed data is in the cache and queue.
        extra = hashlib.shake_256(b"extra").digest(2 * 1024 * 1024)
        fd = os.open(ws / "extra.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, extra)
            os.fsync(fd)
        finally:
            os.close(fd)
        kill_daemon(m)
    assert not is_mounted(mnt)
    afs("sync", "--store", str(store))
    assert queue(store) == 0

    # A new machine: the store comes back from the bucket as of the backup sync just took.
    restored = tmp_path / "restored"
    afs("init", str(restored), "--restore-from-bucket", "--endpoint", s3_server.endpoint,
        "--bucket", s3_bucket, "--prefix", s3_prefix, "--region", REGION,
        "--credentials-file", str(store / "s3-credentials.json"))  # fmt: skip
    with mounted(restored, mnt, init=False) as m:
        ws = m.mountpoint / "t" / "shared" / "ws"
        assert digests(ws / "copy") == want
        assert digests(ws / "untar") == want
        assert (ws / "extra.bin").read_bytes() == extra


def test_mount_uploads_in_the_background_and_after_a_crash(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    """The daemon's uploader: unmount drains the queue (no sync needed); blocks left queued
    by a kill -9 are uploaded by the next mount on its own."""
    import time

    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    init_store(store, s3=settings(s3_server, s3_bucket, s3_prefix), credentials=CREDS)
    data = hashlib.shake_256(b"bg").digest(3 * 1024 * 1024 + 5)
    with mounted(store, mnt, init=False) as m:
        ws = workspace(m.mountpoint)
        (ws / "a.bin").write_bytes(data)
    assert queue(store) == 0  # unmount waited for the uploads
    with mounted(store, mnt, init=False) as m:
        ws = m.mountpoint / "t" / "shared" / "ws"
        s3_server.pause()  # the store is away: the blocks stay queued
        try:
            fd = os.open(ws / "b.bin", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.write(fd, data[::-1])
                os.fsync(fd)
            finally:
                os.close(fd)
            kill_daemon(m)
        finally:
            s3_server.resume()
    assert queue(store) > 0
    with mounted(store, mnt, init=False) as m:
        deadline = time.monotonic() + 60
        while queue(store) > 0:
            assert time.monotonic() < deadline, "the mount did not upload the queue"
            time.sleep(0.5)
    shutil.rmtree(store / "cache")  # only the bucket has them now
    (store / "cache").mkdir(mode=0o700)
    with mounted(store, mnt, init=False) as m:
        ws = m.mountpoint / "t" / "shared" / "ws"
        assert (ws / "a.bin").read_bytes() == data
        assert (ws / "b.bin").read_bytes() == data[::-1]


def test_small_writes_get_enospc_while_the_store_is_away_then_go_on(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    """The cache full of blocks not yet uploaded and the store away: small writes (journalled
    in the index, stored by the mover) fill the mount's dirty budget, then fail with ENOSPC
    after `full_wait` instead of hanging; after the store is back and `sync`, writes succeed
    and everything written before reads back."""
    import errno
    import time

    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    s3 = settings(s3_server, s3_bucket, s3_prefix)
    s3.cache_size, s3.full_wait = 1 << 20, 2.0
    init_store(store, s3=s3, credentials=CREDS)
    size = 60 * 1024  # a small block: journalled, not stored on the close path
    written: dict[str, bytes] = {}
    # A small dirty budget keeps the run short: ~140 files fill it, and the unmount after
    # drains them through the 1 MiB cache.
    with mounted(store, mnt, init=False, extra_args=["--dirty-budget", "8M"]) as m:
        ws = workspace(m.mountpoint)
        s3_server.pause()
        try:
            refused = None
            for i in range(1000):
                data = hashlib.shake_256(b"small-%d" % i).digest(size)
                try:
                    (ws / f"s{i}").write_bytes(data)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    refused = i
                    break
                written[f"s{i}"] = data
            assert refused is not None, "1000 small files fitted in a full cache"
            assert len(written) * size > 6 << 20
            t = time.monotonic()
            with pytest.raises(OSError) as info:  # still away: fails at once
                (ws / "again").write_bytes(b"x" * size)
            assert info.value.errno == errno.ENOSPC
            assert time.monotonic() - t < 2
            for name in list(written)[::20]:  # nothing written before is lost
                assert (ws / name).read_bytes() == written[name]
        finally:
            s3_server.resume()
        afs("sync", "--store", str(store), "--timeout", "120", timeout=150)
        deadline = time.monotonic() + 60
        while True:
            try:
                (ws / "after").write_bytes(b"back" * 1000)
                break
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                assert time.monotonic() < deadline, "writes did not resume"
                time.sleep(0.5)
        assert (ws / "after").read_bytes() == b"back" * 1000
        log = m.log_path.read_text(errors="replace")
        assert log.count("writes fail with ENOSPC") == 1
        assert "writes go on" in log
    assert queue(store) == 0
    with mounted(store, mnt, init=False) as m:
        ws = m.mountpoint / "t" / "shared" / "ws"
        for name, data in written.items():
            assert (ws / name).read_bytes() == data
