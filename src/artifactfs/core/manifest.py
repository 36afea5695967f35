"""Checkpoint manifests: one canonical CBOR document per directory, stored under its digest.

A checkpoint is a Merkle tree. Each workspace directory becomes a manifest:

    {"v": 1, "kind": "dir", "self": <entry of the directory itself>,
     "entries": {name: <entry>, ...}}

and a blob namespace one manifest `{"v": 1, "kind": "blob", "self": <entry of the file>}`.
A directory of more than CHUNK_THRESHOLD entries is split: its manifest lists chunk digests,
`{"v": 1, "kind": "dir", "self": ..., "chunks": [digest, ...]}`, and each chunk
`{"v": 1, "kind": "chunk", "entries": {...}}` holds a run of consecutive names (bytewise
order). A name ends a chunk when its hash says so (about one name in CHUNK_AVERAGE), or the
chunk is full: boundaries depend on the names alone, so adding or changing one entry rewrites
one chunk and the short top manifest, not the whole directory.
An entry holds what `stat`, `getfattr` and `readlink` show of a node:

    t      "f" file, "d" directory, "l" symlink, "s" fifo/socket/device
    mode uid gid size rdev at mt ct bt     (times in ns; size/rdev omitted when 0)
    x      {xattr name: value}             (omitted when none)
    target symlink target (bytes)
    sha256 whole-content SHA-256 (files)
    blocks [[index, block digest], ...]    (files; a missing index is a hole)
    m      the child directory's manifest digest (directory entries in a parent)
    link, nlink   for a file with several names: one key shared by all its names (the inode
           number when the checkpoint was taken) and how many names it has

Canonical CBOR (sorted map keys, shortest integers) makes the encoding, and so the digest, a
function of the content alone: an unchanged directory keeps its digest, which is what lets a
checkpoint reuse unchanged subtrees and a diff skip them.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field
from typing import Any

import cbor2

from artifactfs.core.nodes import NodeKind
from artifactfs.errors import StorageError

MANIFEST_VERSION = 1
CHUNK_THRESHOLD = 48  # directories with more entries are chunked
CHUNK_AVERAGE = 16  # names per chunk on average
CHUNK_MAX = 128

FILE, DIR, SYMLINK, SPECIAL = "f", "d", "l", "s"
_TYPE_OF_KIND = {
    NodeKind.NSROOT: DIR,
    NodeKind.DIR: DIR,
    NodeKind.FILE: FILE,
    NodeKind.SYMLINK: SYMLINK,
    NodeKind.SPECIAL: SPECIAL,
}


class ManifestError(StorageError):
    """A manifest that does not hash to its digest or does not parse."""


@dataclass(frozen=True, slots=True)
class Entry:
    type: str
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    size: int = 0
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes | None = None
    sha256: bytes | None = None
    blocks: tuple[tuple[int, bytes], ...] = ()
    manifest: bytes | None = None
    link: int | None = None
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return self.type == DIR

    def to_cbor(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "t": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "at": self.atime_ns,
            "mt": self.mtime_ns,
            "ct": self.ctime_ns,
            "bt": self.btime_ns,
        }
        if self.size:
            d["size"] = self.size
        if self.rdev:
            d["rdev"] = self.rdev
        if self.xattrs:
            d["x"] = dict(self.xattrs)
        if self.target is not None:
            d["target"] = self.target
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.blocks:
            d["blocks"] = [[i, b] for i, b in self.blocks]
        if self.manifest is not None:
            d["m"] = self.manifest
        if self.link is not None:
            d["link"] = self.link
            d["nlink"] = self.nlink
        return d

    @classmethod
    def from_cbor(cls, d: Any) -> Entry:
        if not isinstance(d, dict):
            raise ManifestError("manifest entry is not a map")
        try:
            t = d["t"]
            if t not in (FILE, DIR, SYMLINK, SPECIAL):
                raise ManifestError(f"unknown entry type {t!r}")
            blocks = tuple((int(i), bytes(b)) for i, b in d.get("blocks", ()))
            return cls(
                type=t,
                mode=int(d["mode"]),
                uid=int(d["uid"]),
                gid=int(d["gid"]),
                atime_ns=int(d["at"]),
                mtime_ns=int(d["mt"]),
                ctime_ns=int(d["ct"]),
                btime_ns=int(d["bt"]),
                size=int(d.get("size", 0)),
                rdev=int(d.get("rdev", 0)),
                xattrs={bytes(k): bytes(v) for k, v in d.get("x", {}).items()},
                target=None if d.get("target") is None else bytes(d["target"]),
                sha256=None if d.get("sha256") is None else bytes(d["sha256"]),
                blocks=blocks,
                manifest=None if d.get("m") is None else bytes(d["m"]),
                link=None if d.get("link") is None else int(d["link"]),
                nlink=int(d.get("nlink", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest entry: {exc}") from None

    def content_equal(self, other: Entry) -> bool:
        """Same as `other` for a diff: everything but atime, ctime, btime and link keys."""
        return (
            self.type == other.type
            and self.mode == other.mode
            and self.uid == other.uid
            and self.gid == other.gid
            and self.xattrs == other.xattrs
            and (
                self.is_dir
                or (
                    self.mtime_ns == other.mtime_ns
                    and self.size == other.size
                    and self.rdev == other.rdev
                    and self.target == other.target
                    and self.sha256 == other.sha256
                )
            )
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """A decoded manifest. For a chunked directory as stored, `entries` is empty and
    `chunks` lists its chunks; `Checkpoints.manifest` returns it with `entries` merged.
    A chunk has kind "chunk" and the placeholder CHUNK_SELF as `self_entry`."""

    kind: str  # "dir", "blob" or "chunk"
    self_entry: Entry
    entries: dict[bytes, Entry] = field(default_factory=dict)
    chunks: tuple[bytes, ...] = ()


CHUNK_SELF = Entry(type=DIR, mode=0, uid=0, gid=0, atime_ns=0, mtime_ns=0, ctime_ns=0, btime_ns=0)


def _ends_chunk(name: bytes) -> bool:
    return int.from_bytes(hashlib.sha256(name).digest()[:4], "big") % CHUNK_AVERAGE == 0


def split(m: Manifest) -> tuple[Manifest, list[Manifest]]:
    """A directory manifest as stored: itself if small, else (top, chunks)."""
    if m.kind != "dir" or len(m.entries) <= CHUNK_THRESHOLD:
        return m, []
    chunks: list[Manifest] = []
    run: dict[bytes, Entry] = {}
    for name in sorted(m.entries):
        run[name] = m.entries[name]
        if _ends_chunk(name) or len(run) >= CHUNK_MAX:
            chunks.append(Manifest("chunk", CHUNK_SELF, run))
            run = {}
    if run:
        chunks.append(Manifest("chunk", CHUNK_SELF, run))
    digests = tuple(digest_of(encode(c)) for c in chunks)
    return Manifest("dir", m.self_entry, {}, digests), chunks


def entry_type(kind: int) -> str:
    return _TYPE_OF_KIND[NodeKind(kind)]


def mode_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISLNK(mode):
        return SYMLINK
    return SPECIAL


def encode(m: Manifest) -> bytes:
    """Canonical CBOR of one stored manifest (a chunked directory: its top, see `split`)."""
    doc: dict[str, Any] = {"v": MANIFEST_VERSION, "kind": m.kind}
    if m.kind != "chunk":
        doc["self"] = m.self_entry.to_cbor()
    if m.chunks:
        doc["chunks"] = list(m.chunks)
    elif m.kind in ("dir", "chunk"):
        doc["entries"] = {name: e.to_cbor() for name, e in m.entries.items()}
    return cbor2.dumps(doc, canonical=True)


def digest_of(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode(data: bytes, digest: bytes | None = None) -> Manifest:
    """Parse a manifest, checking it against `digest` when given."""
    if digest is not None and digest_of(data) != digest:
        raise ManifestError(f"manifest {digest.hex()} does not match its digest")
    try:
        doc = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for garbage input
        raise ManifestError(f"manifest does not parse: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != MANIFEST_VERSION:
        raise ManifestError("not an artifactfs manifest of a known version")
    kind = doc.get("kind")
    if kind not in ("dir", "blob", "chunk"):
        raise ManifestError(f"unknown manifest kind {kind!r}")
    self_entry = CHUNK_SELF if kind == "chunk" else Entry.from_cbor(doc.get("self"))
    entries: dict[bytes, Entry] = {}
    if kind == "dir" and "chunks" in doc:
        chunks = doc["chunks"]
        if not isinstance(chunks, list) or not all(
            isinstance(c, bytes) and len(c) == 32 for c in chunks
        ):
            raise ManifestError("malformed chunk list")
        return Manifest(kind, self_entry, {}, tuple(chunks))
    if kind in ("dir", "chunk"):
        raw = doc.get("entries")
        if not isinstance(raw, dict):
            raise ManifestError("directory manifest has no entries map")
        for name, e in raw.items():
            if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name:
                raise ManifestError(f"bad entry name {name!r}")
            entries[name] = Entry.from_cbor(e)
    return Manifest(kind, self_entry, entries)


def child_digests(m: Manifest) -> list[bytes]:
    """The manifests a walk visits after `m`: its chunks, then its child directories."""
    return list(m.chunks) + [e.manifest for e in m.entries.values() if e.manifest is not None]
