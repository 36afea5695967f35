"""The daemon's malloc tuning: block buffers freed after a burst of writes keep their pages
for the next burst (fresh processes, since mallopt is process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

BURSTS = """
import resource, sys
from artifactfs.fuse.daemon import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc(128 << 20)
def burst():
    # 32 buffers of 1 MiB alive at once, as pyfuse3's WRITE copies are until stored.
    bufs = [b"x" * (1 << 20) for _ in range(32)]
    del bufs
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_burst_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", BURSTS, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_second_burst_of_buffers_reuses_pages() -> None:
    untuned = _second_burst_faults("default")
    if untuned < 4000:
        pytest.skip(f"this C library keeps freed buffers mapped by itself ({untuned} faults)")
    # 32 MiB is 8,192 pages: the tuned process faults hardly any of them in again.
    assert _second_burst_faults("tuned") < 500
