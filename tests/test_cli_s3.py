"""The command line of S3 stores against a real SeaweedFS: `init --backend s3` (credentials file
or the standard chain, one-line errors for wrong keys and a missing bucket), `sync` (uploads
itself, or waits for a running mount, with a timeout), and `init --restore-from-bucket`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from coreutil import crashing_core, open_core, workspace
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from artifactfs.store import Store

AFS = str(Path(sys.executable).parent / "artifactfs")
BS = 4096


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 90
        ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full.update(env or {})
    return subprocess.run([AFS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=full)  # fmt: skip


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout
    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("artifactfs: error:")]
    assert len(errs) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return errs[0]


@pytest.fixture
def creds_file(tmp_path: Path) -> Path:
    f = tmp_path / "keys.ini"
    f.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\n"
                 f"aws_secret_access_key = {SECRET_KEY}\n")  # fmt: skip
    return f


def s3_args(server: S3Server, bucket: str, prefix: str) -> list[str]:
    return ["--endpoint", server.endpoint, "--bucket", bucket, "--prefix", prefix,
            "--region", REGION]  # fmt: skip


def init_s3(store: Path, server: S3Server, bucket: str, prefix: str, creds: Path) -> None:
    res = run("init", str(store), "--backend", "s3", *s3_args(server, bucket, prefix),
              "--block-size", str(BS), "--cache-size", "64M", "--credentials-file", str(creds))
    assert res.returncode == 0, res.stderr
    assert "created store" in res.stdout


def test_init_with_credentials_file_keeps_keys_private(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str, creds_file: Path
) -> None:
    store = tmp_path / "store"
    init_s3(store, s3_server, s3_bucket, s3_prefix, creds_file)
    config = json.loads((store / "store.json").read_text())
    assert config["backend"] == "s3"
    assert config["s3"]["bucket"] == s3_bucket
    assert config["s3"]["cache_size"] == 64 << 20
    assert ACCESS_KEY not in (store / "store.json").read_text()
    assert SECRET_KEY not in (store / "store.json").read_text()
    assert os.stat(store / "s3-credentials.json").st_mode & 0o777 == 0o600
    res = run("sync", "--store", str(store))
    assert res.returncode == 0, res.stderr
    assert "all blocks are in" in res.stdout and "index backed up" in res.stdout
    assert SECRET_KEY not in res.stdout + res.stderr


def test_init_with_the_standard_chain(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    store = tmp_path / "store"
    res = run("init", str(store), "--backend", "s3", *s3_args(s3_server, s3_bucket, s3_prefix),
              env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert not (store / "s3-credentials.json").exists()
    assert run("sync", "--store", str(store), env=env).returncode == 0
    msg = one_line_error(run("sync", "--store", str(store), "--timeout", "5"))  # no keys
    assert "credentials" in msg or "denied" in msg


def test_wrong_secret_and_missing_bucket_are_one_line(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"aws_access_key_id": ACCESS_KEY,
                               "aws_secret_access_key": "not-the-secret"}))  # fmt: skip
    store = tmp_path / "store"
    args = ["init", str(store), "--backend", "s3"]
    msg = one_line_error(run(*args, *s3_args(s3_server, s3_bucket, s3_prefix),
                             "--credentials-file", str(bad)))  # fmt: skip
    assert "denied" in msg and "not-the-secret" not in msg
    assert not store.exists()
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"aws_access_key_id": ACCESS_KEY,
                                "aws_secret_access_key": SECRET_KEY}))  # fmt: skip
    msg = one_line_error(run(*args, *s3_args(s3_server, "no-such-bucket", s3_prefix),
                             "--credentials-file", str(good)))  # fmt: skip
    assert "does not exist" in msg
    msg = one_line_error(run(*args, "--endpoint", s3_server.endpoint))
    assert "--bucket" in msg


async def test_sync_uploads_then_restore_from_bucket(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str, creds_file: Path
) -> None:
    store = tmp_path / "store"
    init_s3(store, s3_server, s3_bucket, s3_prefix, creds_file)
    files = {f"acme/shared/ws/f{i}": hashlib.shake_256(b"%d" % i).digest(3000 + 9000 * i)
             for i in range(5)}  # fmt: skip
    async with crashing_core(store, block_size=BS) as core:  # a daemon killed, uploads pending
        await workspace(core)
        for path, data in files.items():
            await core.write_file(path, data)
    st = Store(store)
    assert st.index.upload_queue_stats()[0] > 0
    st.close()
    res = run("sync", "--store", str(store), "--timeout", "60")
    assert res.returncode == 0, res.stderr
    st = Store(store)
    assert st.index.upload_queue_stats() == (0, 0)
    st.close()

    restored = tmp_path / "restored"
    res = run("init", str(restored), "--restore-from-bucket",
              *s3_args(s3_server, s3_bucket, s3_prefix), "--credentials-file", str(creds_file))
    assert res.returncode == 0, res.stderr
    assert "restored store" in res.stdout
    async with open_core(restored, block_size=BS) as core:
        for path, data in files.items():
            assert await core.read_file(path) == data
    msg = one_line_error(run("init", str(restored), "--restore-from-bucket",
                             *s3_args(s3_server, s3_bucket, s3_prefix)))  # fmt: skip
    assert "not empty" in msg


async def test_sync_waits_for_a_running_mount_and_times_out(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str, creds_file: Path
) -> None:
    store = tmp_path / "store"
    init_s3(store, s3_server, s3_bucket, s3_prefix, creds_file)
    async with crashing_core(store, block_size=BS) as core:
        await workspace(core)
        await core.write_file("acme/shared/ws/x", b"x" * 10000)
    st = Store(store)
    with st.index.txn():  # a live mount (this process): sync must leave uploads to it
        st.index.register_mount(os.getpid(), "/somewhere", 0)
    st.close()
    t = time.monotonic()
    res = run("sync", "--store", str(store), "--timeout", "2")
    assert res.returncode == 4
    assert "not in the bucket" in one_line_error(res)
    assert time.monotonic() - t < 30
    st = Store(store)
    assert st.index.upload_queue_stats()[0] > 0  # nobody uploaded: the "mount" did not
    st.close()


def test_sync_of_a_local_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert run("init", str(store)).returncode == 0
    res = run("sync", "--store", str(store))
    assert res.returncode == 0 and "nothing to upload" in res.stdout


def test_sync_times_out_while_store_away(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_prefix: str, creds_file: Path
) -> None:
    import trio

    store = tmp_path / "store"
    init_s3(store, s3_server, s3_bucket, s3_prefix, creds_file)

    async def write() -> None:
        async with crashing_core(store, block_size=BS) as core:
            await workspace(core)
            await core.write_file("acme/shared/ws/y", b"y" * 10000)

    trio.run(write)
    s3_server.pause()
    try:
        res = run("sync", "--store", str(store), "--timeout", "2")
    finally:
        s3_server.resume()
    assert res.returncode == 4, res.stderr
    one_line_error(res)
    res = run("sync", "--store", str(store), "--timeout", "60")
    assert res.returncode == 0, res.stderr
