"""stats and the event-log queries in the core tier."""

from __future__ import annotations

import os
import time
from pathlib import Path

from coreutil import open_core, workspace

from artifactfs.core.grid import find_namespace
from artifactfs.core.stats import StoreStats, gather
from artifactfs.store import Store


async def test_stats_count_and_dedup(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core, "acme/shared/ws")
        await workspace(core, "acme/user-alice/p")
        await workspace(core, "beta/shared/q")
        data = os.urandom(2 * core.bs)
        await core.write_file("acme/shared/ws/a", data)
        await core.write_file("acme/shared/ws/b", data)  # same content: stored once
        await core.write_file("acme/user-alice/blob", b"x" * 10)
        ns = find_namespace(core.store.index, "acme/shared/ws")
        await core.fs.checkpoints.create(ns, "c", "test")
        s = gather(core.store.index, core.store.backend)
    assert s.sandboxes == 2 and s.namespaces == 4
    by = {(x.sandbox, x.scope): (x.workspaces, x.blobs) for x in s.scopes}
    assert by == {
        ("acme", "shared"): (1, 0),
        ("acme", "user-alice"): (1, 1),
        ("beta", "shared"): (1, 0),
    }
    assert s.files == 3 and s.logical_bytes == 4 * 4096 + 10
    assert s.unique_blocks == 3 and s.unique_block_bytes == 2 * 4096 + 10
    assert s.dedup_ratio == round((4 * 4096 + 10) / (2 * 4096 + 10), 3)
    assert s.checkpoints == 1 and s.manifest_bytes > 0 and s.checkpoint_bytes == 2 * 8192
    assert s.blobs >= 4 and s.upload_queue == 0 and s.mounts == []
    # A registered mount of a live pid is listed; a dead one is not.
    store = Store(path)
    with store.index.txn():
        store.index.register_mount(os.getpid(), "/mnt/x", 0)
        store.index.register_mount(2**22 + 12345, "/mnt/dead", 0)
    s = gather(store.index, store.backend)
    store.close()
    assert [m.mountpoint for m in s.mounts] == ["/mnt/x"]
    assert StoreStats.model_validate_json(s.model_dump_json()) == s


async def test_event_filters(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core, "acme/shared/ws")
        await workspace(core, "beta/shared/ws")
        ns = find_namespace(core.store.index, "beta/shared/ws")
        await core.fs.checkpoints.create(ns, "c", "test")
        index = core.store.index
        every = index.ops_events()
        assert every[0].type == "store.init"
        beta = index.ops_events(sandbox="beta")
        assert beta and all(e.sandbox == "beta" for e in beta)
        assert {e.type for e in beta} >= {"namespace.create", "checkpoint.create"}
        cps = index.ops_events(type_prefix="checkpoint.")
        assert [e.type for e in cps] == ["checkpoint.create"]
        assert index.ops_events(type_prefix="checkpoint_") == []  # '_' is literal
        assert index.ops_events(since_ns=time.time_ns() + 10**9) == []
        assert [e.seq for e in index.ops_events(after=every[-2].seq)] == [every[-1].seq]
        assert len(index.ops_events(limit=2)) == 2


def test_sizes_read_in_the_largest_unit_of_one_or_more() -> None:
    from artifactfs.units import human

    assert [human(n) for n in (0, 1023, 1024, 400 * 1024, 3 << 20, 5 << 40, 2000 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "400.0 KiB", "3.0 MiB", "5.0 TiB", "2000.0 TiB",
    ]
