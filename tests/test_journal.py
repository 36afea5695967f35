"""The journal of small blocks (blobs/journal.py): segments, their records, who owns them,
readers in other processes, and what a crash leaves."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from coreutil import BLOCK, open_core, workspace

from artifactfs.blobs.journal import (
    Journal,
    JournalReader,
    dead_segments,
    read_segment,
    record,
    remove_segments,
)


def block(i: int, n: int = 3000) -> tuple[bytes, bytes]:
    data = (b"block %d " % i) * (n // 8)
    return hashlib.sha256(data).digest(), data


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("*.jnl"))


def test_records_read_back_up_to_a_torn_or_damaged_one(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    blocks = [block(i) for i in range(4)]
    for d, b in blocks:
        j.append(d, b)
    assert j.current is not None
    fd = j.current.fd
    assert read_segment(fd) == blocks
    # A machine crash mid-append: the last record cut short.
    size = os.fstat(fd).st_size
    os.ftruncate(fd, size - 10)
    assert read_segment(fd) == blocks[:3]
    # Bytes that do not hash to their digest end the segment there.
    second = len(record(*blocks[0]))
    raw = os.open(j.current.path, os.O_WRONLY)  # not O_APPEND: pwrite in place
    os.pwrite(raw, b"X", second + 40)
    os.close(raw)
    assert read_segment(fd) == blocks[:1]
    j.close()


def test_a_failed_append_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    j.append(*block(0))
    real = os.write

    def short(fd: int, data: bytes) -> int:
        return real(fd, data[:100])  # a disk that fills up mid-record

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError) as info:
        j.append(*block(1))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    j.append(*block(2))
    assert j.current is not None
    assert read_segment(j.current.fd) == [block(0), block(2)]
    j.close()


def test_segments_go_once_their_blocks_are_stored(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    (d0, b0), (d1, b1) = block(0), block(1)
    j.append(d0, b0)
    j.append(d1, b1)
    first = segments(tmp_path)
    j.stored(d0)
    assert j.retirable() == []  # d1 still waits: the sealed segment stays
    assert segments(tmp_path) == first
    j.append(*block(2))  # a new segment
    assert len(segments(tmp_path)) == 2
    j.stored(d1)
    done = j.retirable()
    assert [s.path for s in done] == first
    remove_segments(j.drop(done))
    assert len(segments(tmp_path)) == 1
    j.stored(block(2)[0])
    remove_segments(j.drop(j.retirable()))
    assert segments(tmp_path) == []
    j.close()


def test_reader_finds_blocks_as_segments_grow_and_go(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    reader = JournalReader(tmp_path)
    (d0, b0), (d1, b1) = block(0), block(1)
    assert reader.get(d0) is None
    j.append(d0, b0)
    assert reader.get(d0) == b0
    j.append(d1, b1)  # only the new tail is scanned
    assert reader.get(d1) == b1
    assert reader.digests() == {d0, d1}
    assert reader.totals() == (2, len(b0) + len(b1))
    j.stored(d0)
    j.stored(d1)
    remove_segments(j.drop(j.retirable()))
    assert reader.get(d0) is None and reader.digests() == set()
    j.close()


def test_a_dead_daemons_segment_is_found_and_adopted(tmp_path: Path) -> None:
    """A process that dies leaves its segment with the flock free: a live journal's
    segments are never taken for dead, a dead one is found once, and its blocks are read."""
    d, b = block(7)
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from artifactfs.blobs.journal import Journal
        Journal(Path({str(tmp_path)!r})).append({d!r}, {b!r})
        os._exit(0)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    mine = Journal(tmp_path)
    mine.append(*block(1))
    found = dead_segments(tmp_path, mine)
    assert len(found) == 1
    path, fd = found[0]
    assert read_segment(fd) == [(d, b)]
    assert dead_segments(tmp_path, mine) == []  # we hold its lock now
    mine.adopt(path, fd, [(d, b)])
    assert [s.path for s in mine.retirable() if s.path == path] == []  # d not stored yet
    mine.stored(d)
    remove_segments(mine.drop([s for s in mine.retirable() if s.path == path]))
    assert not path.exists()
    mine.close()


async def test_a_block_the_journal_refuses_is_stored_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal that cannot take a block (a full disk) does not fail the close: the block
    is stored on the commit path as a large one is."""
    async with open_core(tmp_path / "s", block_size=BLOCK) as core:
        await workspace(core)
        assert core.io.journal is not None

        def full(digest: bytes, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(core.io.journal, "append", full)
        await core.write_file("acme/shared/ws/f", b"refused by the journal")
        digest = hashlib.sha256(b"refused by the journal").digest()
        assert core.store.backend.has(digest)
        assert digest not in core.io.pending
        assert await core.read_file("acme/shared/ws/f") == b"refused by the journal"


async def test_sync_closes_the_journal_fds_it_used(tmp_path: Path) -> None:
    async with open_core(tmp_path / "s") as core:
        await workspace(core)
        await core.write_file("acme/shared/ws/f", b"x" * 100)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            await core.io.sync()
        assert len(os.listdir("/proc/self/fd")) == before


async def test_a_clean_stop_leaves_no_segment(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with open_core(path) as core:
        await workspace(core)
        await core.write_file("acme/shared/ws/f", b"closed before the unmount")
        assert segments(core.store.journal_dir)
    assert segments(path / "journal") == []  # stored, synced and retired at the stop
