"""Diff of two trees of one namespace: two checkpoints, or a checkpoint and the live state.

Both sides are Merkle trees of manifests. The walk compares directory digests first and skips
every subtree whose digests are equal, so its cost grows with the difference, not the tree.
The live side is encoded on the fly (`Checkpoints.build` without storing): clean directories
contribute their recorded digests, only dirty ones are read from the index.

What counts as a change, per path (relative to the namespace root, '/'-separated; "." is the
root itself):
  added / removed   the path exists on one side only (every path below an added or removed
                    directory is listed too);
  type-changed      file, directory, symlink or special on one side, another type on the other
                    (what was below a directory that became something else is removed, what is
                    below a new directory is added);
  modified          same type, different content or metadata: for files and the like mode,
                    owner, mtime, size, content digest, symlink target, device number or
                    xattrs; for directories mode, owner or xattrs (a directory's mtime follows
                    its entries, which are reported themselves). atime, ctime and which names
                    share an inode are not compared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from artifactfs.core.checkpoints import Checkpoints
from artifactfs.core.manifest import DIR, Entry, Manifest
from artifactfs.index.db import NamespaceRow

ChangeKind = Literal["added", "removed", "modified", "type-changed"]


@dataclass(frozen=True, slots=True, order=True)
class Change:
    path: str
    kind: ChangeKind


def _join(prefix: str, name: bytes) -> str:
    text = os.fsdecode(name)
    return text if not prefix else f"{prefix}/{text}"


class _Differ:
    def __init__(self, cp: Checkpoints, live: dict[bytes, Manifest]) -> None:
        self.cp = cp
        self.live = live  # manifests of the live side encoded for this diff, never stored
        self.out: list[Change] = []
        self.manifests_read = 0

    async def raw(self, digest: bytes) -> Manifest:
        """One manifest or chunk as stored (unmerged)."""
        self.manifests_read += 1
        m = self.live.get(digest)
        return m if m is not None else await self.cp.raw(digest)

    async def manifest(self, digest: bytes) -> Manifest:
        """A whole directory (chunks merged)."""
        top = await self.raw(digest)
        if not top.chunks:
            return top
        entries: dict[bytes, Entry] = {}
        for c in top.chunks:
            entries.update((await self.raw(c)).entries)
        return Manifest(top.kind, top.self_entry, entries, top.chunks)

    async def differing_entries(
        self, ma: Manifest, mb: Manifest
    ) -> tuple[dict[bytes, Entry], dict[bytes, Entry]]:
        """The entries of two directories, minus the chunks they share (equal entries)."""
        shared = set(ma.chunks) & set(mb.chunks)
        out: list[dict[bytes, Entry]] = []
        for m in (ma, mb):
            if not m.chunks:
                out.append(m.entries)
                continue
            entries: dict[bytes, Entry] = {}
            for c in m.chunks:
                if c not in shared:
                    entries.update((await self.raw(c)).entries)
            out.append(entries)
        return out[0], out[1]

    async def subtree(self, digest: bytes | None, prefix: str, kind: ChangeKind) -> None:
        """List every path below a directory that exists on one side only."""
        if digest is None:
            return
        stack = [(digest, prefix)]
        while stack:
            d, pre = stack.pop()
            m = await self.manifest(d)
            for name, e in m.entries.items():
                path = _join(pre, name)
                self.out.append(Change(path, kind))
                if e.type == DIR:
                    stack.append((e.manifest or b"", path))

    async def entry(self, path: str, a: Entry | None, b: Entry | None) -> None:
        if a is None and b is None:
            return
        if a is None:
            assert b is not None
            self.out.append(Change(path, "added"))
            if b.type == DIR:
                await self.subtree(b.manifest, path, "added")
            return
        if b is None:
            self.out.append(Change(path, "removed"))
            if a.type == DIR:
                await self.subtree(a.manifest, path, "removed")
            return
        if a.type != b.type:
            self.out.append(Change(path, "type-changed"))
            if a.type == DIR:
                await self.subtree(a.manifest, path, "removed")
            if b.type == DIR:
                await self.subtree(b.manifest, path, "added")
            return
        if not a.content_equal(b):
            self.out.append(Change(path, "modified"))
        if a.type == DIR and a.manifest != b.manifest:
            await self.dirs(a.manifest or b"", b.manifest or b"", path)

    async def dirs(self, da: bytes, db: bytes, prefix: str) -> None:
        if da == db:
            return
        ea, eb = await self.differing_entries(await self.raw(da), await self.raw(db))
        for name in sorted(set(ea) | set(eb)):
            await self.entry(_join(prefix, name), ea.get(name), eb.get(name))

    async def roots(self, da: bytes, db: bytes) -> None:
        if da == db:
            return
        ma, mb = await self.raw(da), await self.raw(db)
        if not ma.self_entry.content_equal(mb.self_entry):
            self.out.append(Change(".", "modified"))
        if ma.kind == "dir" and mb.kind == "dir":
            await self.dirs(da, db, "")


async def diff(cp: Checkpoints, ns: NamespaceRow, a: bytes, b: bytes | None) -> list[Change]:
    """Changes from tree `a` to tree `b` (root manifest digests; b=None: the live state)."""
    return (await diff_counted(cp, ns, a, b))[0]


async def diff_counted(
    cp: Checkpoints, ns: NamespaceRow, a: bytes, b: bytes | None
) -> tuple[list[Change], int]:
    """`diff`, plus how many manifests the walk read (tests prove it skips equal subtrees)."""
    live: dict[bytes, Manifest] = {}
    if b is None:
        built = await cp.build(ns.root_inode, store_new=False)
        b, live = built.root, built.manifests
    d = _Differ(cp, live)
    await d.roots(a, b)
    return sorted(d.out), d.manifests_read
