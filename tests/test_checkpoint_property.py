"""Checkpoints against a model: random operation sequences on a workspace, interleaved with
taking checkpoints, diffing and restoring them.

After every step:
  - the incremental encoding of the live tree (reusing clean directories, as a checkpoint
    does) equals a from-scratch encoding: no change ever escapes the dirty tracking;
  - after a restore, the tree (names, types, modes, owners, mtimes, contents, symlink
    targets, xattrs, link counts, hard-link groups) is exactly the one walked when that
    checkpoint was taken;
  - a diff (checkpoint against live, or two checkpoints) equals the reference diff computed
    from the two walked trees;
  - the index invariants hold.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import trio
from coreutil import check_invariants, open_core, workspace
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_checkpoints import Model, model, reference_diff
from test_core_property import apply_core, core_tree, draw_op

from artifactfs.core import manifest
from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.diff import diff
from artifactfs.core.restore import restore
from artifactfs.index.db import CheckpointRow

WS = "acme/shared/ws"
EXAMPLES = int(os.environ.get("ARTIFACTFS_PROP_EXAMPLES", "40"))
RANDOM = os.environ.get("ARTIFACTFS_PROP_RANDOM", "") not in ("", "0")
MAX_STEPS = 25
HANDLE_OPS = ("open", "pwrite", "ftruncate", "close")


async def run(tmp: Path, data: st.DataObject) -> None:
    group = data.draw(st.booleans(), label="group commit")
    # Tiny chunks make every directory of the small trees drawn here a chunked one.
    tiny = data.draw(st.booleans(), label="tiny chunks")
    saved_params = manifest.CHUNK_THRESHOLD, manifest.CHUNK_AVERAGE, manifest.CHUNK_MAX
    if tiny:
        manifest.CHUNK_THRESHOLD, manifest.CHUNK_AVERAGE, manifest.CHUNK_MAX = 1, 2, 2
    try:
        await run_steps(tmp, data, group)
    finally:
        manifest.CHUNK_THRESHOLD, manifest.CHUNK_AVERAGE, manifest.CHUNK_MAX = saved_params


async def run_steps(tmp: Path, data: st.DataObject, group: bool) -> None:
    async with open_core(tmp / "store", group_commit=group) as core:
        top = await workspace(core, WS)
        ns = core.store.index.namespace_by_root(top)
        assert ns is not None
        cp = Checkpoints(core.store.index, core.io)
        saved: list[tuple[CheckpointRow, tuple[Model, set[frozenset[str]]]]] = []
        steps = data.draw(st.integers(1, MAX_STEPS), label="steps")
        for i in range(steps):
            tree, _, _ = await core_tree(core, top, {})
            action = data.draw(
                st.sampled_from(["op"] * 5 + ["checkpoint", "restore", "diff"]), label="action"
            )
            if action == "op" or (action != "checkpoint" and not saved):
                op = draw_op(data, tree)
                if op[0] in HANDLE_OPS:
                    continue
                note(f"step {i}: {op}")
                await apply_core(core, op, WS, {})
            elif action == "checkpoint":
                note(f"step {i}: checkpoint c{len(saved)}")
                row = await cp.create(ns, f"c{len(saved)}", "prop")
                saved.append((row, await model(core)))
            elif action == "restore":
                k = data.draw(st.integers(0, len(saved) - 1), label="which")
                note(f"step {i}: restore c{k}")
                row, want = saved[k]
                await restore(cp, ns, row.root, actor="prop")
                got = await model(core)
                assert got[0] == want[0], f"tree differs after restoring c{k}"
                assert got[1] == want[1], f"hard-link groups differ after restoring c{k}"
            else:
                k = data.draw(st.integers(0, len(saved) - 1), label="which")
                j = data.draw(st.integers(-1, len(saved) - 1), label="against")
                row, old = saved[k]
                if j < 0:
                    note(f"step {i}: diff c{k} live")
                    new = (await model(core))[0]
                    got = await diff(cp, ns, row.root, None)
                else:
                    note(f"step {i}: diff c{k} c{j}")
                    new = saved[j][1][0]
                    got = await diff(cp, ns, row.root, saved[j][0].root)
                assert [(c.path, c.kind) for c in got] == reference_diff(old[0], new)
            core.fs.forget(list(core.fs.lookups.items()))
            check_invariants(core.store, busy=set(core.fs.files))
            incremental = await cp.build(top, store_new=False)
            scratch = await cp.build(top, store_new=False, reuse=False)
            assert incremental.root == scratch.root, f"dirty tracking missed step {i}"
        cp.close()


@settings(
    max_examples=EXAMPLES,
    derandomize=not RANDOM,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_checkpoints_match_the_model(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="artifactfs-ckprop-") as tmp:
        trio.run(run, Path(tmp), data)
