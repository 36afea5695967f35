"""The Python API: the runnable examples of docs/API.md under trio and asyncio, errors and
policy through a credential, and the API and a running mount seeing each other's writes."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
from pathlib import Path

import pytest
import trio

import artifactfs
from artifactfs.errors import Exists, NotFound, ReadOnly
from artifactfs.store import init_store

DOC = Path(__file__).resolve().parent.parent / "docs" / "API.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _runnable(code: str) -> tuple[str, bool]:
    """(source, is_async): top-level awaits are wrapped in `async def example()`."""
    if "asyncio.run(" in code:
        return code, False
    return "async def example():\n" + textwrap.indent(code, "    "), True


@pytest.mark.parametrize("loop", ["trio", "asyncio"])
@pytest.mark.parametrize("n", range(len(EXAMPLES)))
def test_doc_examples(tmp_path: Path, n: int, loop: str) -> None:
    store = tmp_path / "store"
    init_store(store)
    source, is_async = _runnable(EXAMPLES[n])
    ns: dict[str, object] = {"STORE": str(store)}
    exec(compile(source, f"docs/API.md example {n + 1}", "exec"), ns)
    if is_async:
        fn = ns["example"]
        assert callable(fn)
        if loop == "trio":
            trio.run(fn)
        else:
            asyncio.run(fn())


async def test_errors_and_credentials(tmp_path: Path) -> None:
    store_path = tmp_path / "store"
    init_store(store_path)
    async with await artifactfs.open_store(store_path) as store:
        await store.create_namespace("acme/shared/data")
        await store.write_file("acme/shared/data/f", b"shared")
        with pytest.raises(Exists):
            await store.create_namespace("acme/shared/data")
        with pytest.raises(NotFound):
            await store.read_file("acme/shared/data/missing")
        await store.makedirs("acme/user-bob/secret")
        await store.write_file("acme/user-bob/secret/k", b"bob")
    from artifactfs.cli.credential_cmd import issue  # the CLI's own function

    await trio.to_thread.run_sync(
        lambda: issue(sandbox="acme", user="alice", session="s1", ttl="1h", shared="ro",
                      user_scope="rw", output=tmp_path / "alice.cred", store=store_path)
    )
    async with await artifactfs.open_store(store_path, credential=tmp_path / "alice.cred") as s:
        assert sorted(await s.listdir("acme")) == ["sess-s1", "shared", "user-alice"]
        assert await s.read_file("acme/shared/data/f") == b"shared"
        with pytest.raises(ReadOnly):
            await s.write_file("acme/shared/data/g", b"no")
        with pytest.raises(NotFound):
            await s.read_file("acme/user-bob/secret/k")
        await s.create_namespace("acme/sess-s1/work")
        await s.write_file("acme/sess-s1/work/x", b"mine")
        await s.checkpoint_create("acme/sess-s1/work", "c1")
        with pytest.raises(ReadOnly):
            await s.checkpoint_create("acme/shared/data", "nope")


def test_api_and_a_running_mount_see_each_other(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mountutil

    store_path = tmp_path / "store"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mountutil.mounted(store_path, mnt) as m:
        ws = mountutil.workspace(m.mountpoint, "acme", "shared", "ws")
        (ws / "from-mount").write_bytes(b"written through the mount")
        cached = ws / "shared-file"
        cached.write_bytes(b"v1")
        assert cached.read_bytes() == b"v1"  # now in the kernel's caches

        async def use_api() -> None:
            async with await artifactfs.open_store(store_path) as store:
                assert await store.read_file("acme/shared/ws/from-mount") == (
                    b"written through the mount"
                )
                await store.write_file("acme/shared/ws/from-api", b"written by the API")
                await store.write_file("acme/shared/ws/shared-file", b"version two")
                deadline = time.monotonic() + 1.0
                while (ws / "shared-file").read_bytes() != b"version two":
                    assert time.monotonic() < deadline, "the mount showed stale data after 1 s"
                    await trio.sleep(0.05)
                assert (ws / "from-api").read_bytes() == b"written by the API"

        trio.run(use_api)
