"""Verify a checkpoint end to end: every manifest and every block against its digest.

Starting at a root manifest digest, `verify_tree`:
  1. reads every manifest reached from the root (each distinct digest once; the chunks of
     a big directory included), re-hashes it against its digest and parses it
     (`manifest.decode`);
  2. re-hashes every block the files name against its digest, each distinct block once;
  3. recomputes every file's whole-content SHA-256 from its blocks (holes, and stored blocks
     shorter than the file needs, read as zeros up to the file's size) and compares it with
     the one the manifest records. Files with the same content (same size, block list and
     recorded digest, hard links included) are hashed once.
The result lists findings (missing or corrupt manifest, missing or corrupt block, wrong file
digest) with the paths they affect, relative to the namespace root ("." is the root itself).

Blobs are read from the backend directly, never through the manifest cache of `Checkpoints`;
a block the backend lacks is looked up in the journal of small blocks that are committed but
not yet stored (`BlockIO.pending`, or what the caller passes). Reads and hashing run in worker
threads under `BlockIO.limiter`, in batches, so a mount that verifies keeps serving.

Must not import pyfuse3 or write SQL.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio

from artifactfs.core.blockio import BlockIO
from artifactfs.core.manifest import FILE, Entry, Manifest, ManifestError, decode, digest_of
from artifactfs.core.progress import Progress
from artifactfs.errors import NotFound, StorageError

MISSING_MANIFEST = "missing-manifest"
CORRUPT_MANIFEST = "corrupt-manifest"
MISSING_BLOCK = "missing-block"
CORRUPT_BLOCK = "corrupt-block"
WRONG_FILE_DIGEST = "wrong-file-digest"

# Paths kept per finding (a block shared by thousands of files lists a few and a count).
MAX_PATHS = 5
# Work per worker-thread hop: enough to amortise the hop, small enough to keep memory flat.
MANIFESTS_PER_HOP = 64
BYTES_PER_HOP = 32 << 20
FILE_COST = 64 << 10  # what a file weighs in a batch beyond its bytes

_OK, _MISSING, _CORRUPT = "ok", "missing", "corrupt"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # one of the constants above
    digest: bytes  # the manifest or block, or the file's recorded whole-content digest
    paths: tuple[str, ...]  # up to MAX_PATHS affected paths
    more: int = 0  # affected paths beyond those listed
    detail: str = ""

    def __str__(self) -> str:
        where = ", ".join(self.paths) + (f" and {self.more} more" if self.more else "")
        text = f"{self.kind} {self.digest.hex()}"
        if where:
            text += f" at {where}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(slots=True)
class VerifyReport:
    root: bytes
    manifests: int = 0  # distinct manifests checked
    blocks: int = 0  # distinct blocks checked
    block_bytes: int = 0  # their stored bytes
    files: int = 0  # distinct file contents whose digest was recomputed
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings


class _Paths:
    """Up to MAX_PATHS paths and a count of the rest."""

    __slots__ = ("listed", "more")

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, path: str) -> None:
        if len(self.listed) < MAX_PATHS:
            self.listed.append(path)
        else:
            self.more += 1

    def extend(self, other: _Paths) -> None:
        for p in other.listed:
            self.add(p)
        self.more += other.more


@dataclass(slots=True)
class _Content:
    """One distinct file content: its recorded digest, size and blocks; who has it."""

    sha256: bytes | None
    size: int
    blocks: tuple[tuple[int, bytes], ...]
    paths: _Paths
    owned: frozenset[bytes] = frozenset()  # blocks this content checks against their digests
    result: str = ""  # _OK, "mismatch", "incomplete" (a block could not be read)


def join(parent: str, name: bytes) -> str:
    text = os.fsdecode(name)
    return text if parent == "." else f"{parent}/{text}"


class _Verifier:
    def __init__(
        self,
        io: BlockIO,
        journal: Mapping[bytes, bytes],
        progress: Progress | None,
    ) -> None:
        self.io = io
        self.backend = io.backend
        self.journal = journal
        self.progress = progress
        # digest -> _OK/_MISSING/_CORRUPT, written only by the one content that owns the block.
        self.status: dict[bytes, str] = {}
        self.sizes: dict[bytes, int] = {}

    # ---- worker threads -----------------------------------------------------------------------

    def _read(self, digest: bytes) -> bytes | None:
        try:
            return self.backend.get(digest)
        except NotFound:
            return self.journal.get(digest)

    def _load_manifests(
        self, digests: Sequence[bytes]
    ) -> list[tuple[bytes, Manifest | None, str, str]]:
        """(digest, manifest or None, finding kind, detail) for each digest."""
        out: list[tuple[bytes, Manifest | None, str, str]] = []
        for digest in digests:
            try:
                data = self._read(digest)
            except StorageError as exc:
                out.append((digest, None, CORRUPT_MANIFEST, exc.message))
                continue
            if data is None:
                out.append((digest, None, MISSING_MANIFEST, "not in the blob store"))
                continue
            if digest_of(data) != digest:
                out.append((digest, None, CORRUPT_MANIFEST, "does not match its digest"))
                continue
            try:
                out.append((digest, decode(data), "", ""))
            except ManifestError as exc:
                out.append((digest, None, CORRUPT_MANIFEST, exc.message))
        return out

    def _check_contents(self, batch: Sequence[_Content]) -> int:
        """Hash the owned blocks and the whole content of each file; returns bytes read."""
        bs = self.io.block_size
        done = 0
        for c in batch:
            h = hashlib.sha256()
            complete = True
            top = (c.size + bs - 1) // bs
            pos = 0  # next block index the whole-content hash needs
            for idx, digest in sorted(c.blocks):
                try:
                    data = self._read(digest)
                except StorageError:
                    data = None
                if digest in c.owned:
                    if data is None:
                        self.status[digest] = _MISSING
                    else:
                        self.sizes[digest] = len(data)
                        ok = hashlib.sha256(data).digest() == digest
                        self.status[digest] = _OK if ok else _CORRUPT
                if data is None:
                    complete = False
                    continue
                done += len(data)
                if idx >= top or not complete:
                    continue
                if idx > pos:  # a hole: zeros
                    _feed_zeros(h, (idx - pos) * bs)
                want = min(bs, c.size - idx * bs)
                h.update(data[:want])
                if len(data) < want:
                    _feed_zeros(h, want - len(data))
                pos = idx + 1
            if not complete:
                c.result = "incomplete"
                continue
            if pos < top:
                _feed_zeros(h, c.size - pos * bs)
            c.result = _OK if h.digest() == c.sha256 else "mismatch"
        return done

    # ---- the walk -----------------------------------------------------------------------------

    async def run(self, root: bytes) -> VerifyReport:
        report = VerifyReport(root=root)
        contents = await self._walk(root, report)
        await self._check_files(contents, report)
        return report

    async def _walk(self, root: bytes, report: VerifyReport) -> list[_Content]:
        """Breadth-first over the manifests as stored: a chunked directory's chunks are
        manifests of their own, whose entries belong to the directory's path."""
        seen: dict[bytes, _Paths] = {}
        bad: dict[bytes, tuple[str, str]] = {}
        contents: dict[tuple[bytes | None, int, tuple[tuple[int, bytes], ...]], _Content] = {}
        # (digest, path of the directory it describes, the kinds it may have)
        level: list[tuple[bytes, str, tuple[str, ...]]] = [(root, ".", ("dir", "blob"))]
        first = _Paths()
        first.add(".")
        seen[root] = first

        def follow(digest: bytes, path: str, kinds: tuple[str, ...]) -> None:
            paths = seen.get(digest)
            if paths is None:
                paths = seen[digest] = _Paths()
                nxt.append((digest, path, kinds))
            paths.add(path)

        while level:
            nxt: list[tuple[bytes, str, tuple[str, ...]]] = []
            loaded: list[tuple[bytes, Manifest | None, str, str]] = []
            digests = [d for d, _, _ in level]
            for i in range(0, len(digests), MANIFESTS_PER_HOP):
                loaded += await trio.to_thread.run_sync(
                    self._load_manifests,
                    digests[i : i + MANIFESTS_PER_HOP],
                    limiter=self.io.limiter,
                )
            report.manifests += len(loaded)
            if self.progress is not None:
                self.progress("manifests", len(loaded), None)
            for (digest, path, kinds), (_, m, kind, detail) in zip(level, loaded, strict=True):
                if m is not None and m.kind not in kinds:
                    kind, detail = CORRUPT_MANIFEST, f"a {m.kind} manifest out of place"
                    m = None
                if m is None:
                    bad[digest] = (kind, detail)
                    continue
                if m.kind == "blob":
                    self._add_content(contents, m.self_entry, path)
                    continue
                for chunk in m.chunks:
                    follow(chunk, path, ("chunk",))
                for name, e in sorted(m.entries.items()):
                    child = join(path, name)
                    if e.type == FILE:
                        self._add_content(contents, e, child)
                    elif e.manifest is not None:
                        follow(e.manifest, child, ("dir",))
                    elif e.is_dir:
                        bad.setdefault(
                            digest, (CORRUPT_MANIFEST, f"directory {child} has no manifest")
                        )
            level = nxt
        for digest, (kind, detail) in bad.items():
            p = seen[digest]
            report.findings.append(Finding(kind, digest, tuple(p.listed), p.more, detail))
        return list(contents.values())

    @staticmethod
    def _add_content(
        contents: dict[tuple[bytes | None, int, tuple[tuple[int, bytes], ...]], _Content],
        e: Entry,
        path: str,
    ) -> None:
        key = (e.sha256, e.size, e.blocks)
        c = contents.get(key)
        if c is None:
            c = contents[key] = _Content(e.sha256, e.size, e.blocks, _Paths())
        c.paths.add(path)

    async def _check_files(self, contents: list[_Content], report: VerifyReport) -> None:
        # Each distinct block is checked by the first content that names it.
        block_paths: dict[bytes, _Paths] = {}
        for c in contents:
            owned = []
            for _, digest in c.blocks:
                paths = block_paths.get(digest)
                if paths is None:
                    paths = block_paths[digest] = _Paths()
                    owned.append(digest)
                paths.extend(c.paths)
            c.owned = frozenset(owned)
        batches: list[list[_Content]] = [[]]
        weight = 0
        for c in contents:
            if weight >= BYTES_PER_HOP:
                batches.append([])
                weight = 0
            batches[-1].append(c)
            weight += c.size + FILE_COST  # a small file costs an open and a read

        # Progress in file bytes (each distinct content once): unlike block bytes, their
        # total is known before anything is read.
        total = sum(c.size for c in contents)

        async def run(batch: list[_Content]) -> None:
            await trio.to_thread.run_sync(self._check_contents, batch, limiter=self.io.limiter)
            if self.progress is not None:
                self.progress("files", sum(c.size for c in batch), total)

        async with trio.open_nursery() as nursery:
            for batch in batches:
                if batch:
                    nursery.start_soon(run, batch)

        report.blocks = len(self.status)
        report.block_bytes = sum(self.sizes.values())
        report.files = len(contents)
        for digest, state in self.status.items():
            if state == _OK:
                continue
            p = block_paths[digest]
            if state == _MISSING:
                kind, detail = MISSING_BLOCK, "not in the blob store"
            else:
                kind, detail = CORRUPT_BLOCK, "does not match its digest"
            report.findings.append(Finding(kind, digest, tuple(p.listed), p.more, detail))
        for c in contents:
            if c.result != "mismatch":
                continue
            if any(self.status.get(d) != _OK for _, d in c.blocks):
                continue  # the bad block is reported, with this file among its paths
            detail = (
                "no whole-content digest recorded"
                if c.sha256 is None
                else "the content does not hash to the recorded digest"
            )
            report.findings.append(
                Finding(
                    WRONG_FILE_DIGEST, c.sha256 or b"", tuple(c.paths.listed), c.paths.more, detail
                )
            )


def _feed_zeros(h: hashlib._Hash, n: int, chunk: bytes = bytes(1 << 20)) -> None:
    while n > 0:
        step = min(n, len(chunk))
        h.update(chunk[:step] if step < len(chunk) else chunk)
        n -= step


async def verify_tree(
    io: BlockIO,
    root: bytes,
    *,
    journal: Mapping[bytes, bytes] | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify the tree whose root manifest digest is `root` (see the module docstring).

    `journal`: blocks committed but not yet in the backend (default: `io.pending`).
    `progress`: called on the trio thread, phases "manifests" (count) and "files" (bytes of
    the distinct file contents checked, of a known total).
    """
    return await _Verifier(io, io.pending if journal is None else journal, progress).run(root)
