#!/usr/bin/env python3
"""Run the same file-system workloads on a plain directory, the passthrough FUSE floor and
artifactfs, in one run, and print one table with the figures and the ratios.

Targets (--only, comma separated; default plain,passthrough,artifactfs):
  plain                a directory on the work file system
  passthrough          scripts/passthrough.py of a directory there (inline disk I/O)
  passthrough-threads  the same with --threads (disk I/O in trio worker threads)
  artifactfs           `$ARTIFACTFS mount STORE MNT --foreground`, workloads in MNT/bench/shared/ws

Every target lives in one fresh temp dir under --workdir (default /var/tmp), so the plain
directory, the passthrough's backing directory and the artifactfs store share one file system.
Every FUSE daemon is stopped in `finally` (fusermount3 -u, wait; if that fails a lazy unmount and
a kill), and the temp dir is removed unless something is still mounted in it.

Needs root: cold figures drop the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`, which
also drops FUSE page caches, so no remount is needed).

Examples:
  .venv/bin/python scripts/bench.py --quick --only plain,passthrough
  .venv/bin/python scripts/bench.py --repeat 5 --json /tmp/bench.json
  ARTIFACTFS=/usr/local/bin/artifactfs .venv/bin/python scripts/bench.py --only artifactfs
  .venv/bin/python scripts/bench.py --quick --backend s3   # + an S3 store on a local SeaweedFS

--backend s3 adds a column "artifactfs-s3" (the same workloads on a store whose blocks go to a
SeaweedFS bucket started by the bench) and a table of upload and cold-read throughput next
to boto3 alone against the same server (scripts/bench_s3.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_checkpoints  # a sibling script, not a package
import bench_s3

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSTHROUGH = REPO_ROOT / "scripts" / "passthrough.py"
ARTIFACTFS = os.environ.get("ARTIFACTFS", str(REPO_ROOT / ".venv" / "bin" / "artifactfs"))
CACHE = Path("/tmp/artifactfs-bench-cache")
# A pure-Python sdist with ~10,000 entries; pinned so figures stay comparable between runs.
SDIST_PKG, SDIST_VERSION = "django", "5.2.19"
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 60.0
TARGETS = ("plain", "passthrough", "passthrough-threads", "artifactfs")
MiB = 1 << 20


@dataclass(frozen=True)
class Params:
    file_bytes: int
    rand_reads: int
    small_files: int
    small_dirs: int
    repo_files: int
    repo_commits: int


FULL = Params(1 << 30, 20_000, 10_000, 100, 3_000, 5)
QUICK = Params(64 * MiB, 2_000, 1_000, 100, 1_000, 3)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool  # throughput (speed ratio) vs time (time ratio)


METRICS = [
    Metric("seq_write", "seq write 1 MiB + fsync", "MB/s", True),
    Metric("seq_read_cold", "seq read, cold", "MB/s", True),
    Metric("seq_read_warm", "seq read, warm", "MB/s", True),
    Metric("rand_read", "4 KiB random pread, cold", "reads/s", True),
    Metric("create", "create 1 KiB files", "files/s", True),
    Metric("find", "find, cold", "s", False),
    Metric("stat", "os.stat all files", "s", False),
    Metric("ls_lR", "ls -lR >/dev/null", "s", False),
    Metric("rm_rf", "rm -rf small files", "s", False),
    Metric("untar", "tar -xf sdist", "s", False),
    Metric("cp_a", "cp -a extracted tree", "s", False),
    Metric("git_clone", "git clone --no-hardlinks", "s", False),
    Metric("git_status", "git status (2nd run)", "s", False),
]


class BenchError(Exception):
    """A setup step failed; the message says which and why."""


@dataclass
class Target:
    name: str
    workdir: Path
    settings: list[str] = field(default_factory=list)  # lines for the settings section
    pid: int | None = None  # the FUSE daemon, for its CPU time


@dataclass(frozen=True)
class Assets:
    tarball: Path  # uncompressed tar
    tarball_desc: str
    repo: Path
    repo_desc: str


# -- helpers ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by process *pid*."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def load_note() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm_up(path: Path) -> None:
    """Read a file, or every file under a directory, so it is in the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(MiB):
                pass


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_quiet(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}): "
                         f"{r.stderr.decode(errors='replace').strip()[-500:]}")


def mount_info(mnt: Path) -> str:
    """Mount type, options and read_ahead_kb of the mount at *mnt*, from /proc and /sys.

    Reads no file inside the mount, so it works even when the daemon is busy.
    """
    found = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                sep = fields.index("-")
                dev, fstype, opts = fields[2], fields[sep + 1], fields[sep + 3]
                try:
                    ra = Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip()
                except OSError:
                    ra = "?"
                found = f"type={fstype} read_ahead_kb={ra} options={fields[5]},{opts}"
    return found or "not mounted"


# -- FUSE start/stop ----------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_fuse(cmd: list[str], mnt: Path, log_path: Path, name: str) -> subprocess.Popen[bytes]:
    """Start a foreground FUSE daemon and wait until *mnt* is a mount point."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    try:
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode} before mounting "
                                 f"{mnt}:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not mount {mnt} within {MOUNT_TIMEOUT:.0f} s:\n"
                                 f"{log_tail(log_path)}")
            time.sleep(0.05)
    except BaseException:
        stop_fuse(proc, mnt, log_path, name)
        raise
    return proc


def stop_fuse(proc: subprocess.Popen[bytes], mnt: Path, log_path: Path, name: str) -> None:
    """Unmount and wait for the daemon; always leaves neither mount nor process behind.

    Raises BenchError if the clean path did not work (busy, timeout, non-zero exit).
    """
    problem = ""
    try:
        unmounted, last_err = False, ""
        for _ in range(10):
            if not os.path.ismount(mnt):
                unmounted = True
                break
            r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
            if r.returncode == 0:
                unmounted = True
                break
            last_err = r.stderr.strip()
            time.sleep(0.5)  # busy: a process may still be leaving the tree
        if not unmounted:
            problem = f"fusermount3 -u {mnt} kept failing: {last_err}"
        else:
            rc = proc.wait(timeout=UNMOUNT_TIMEOUT)
            if rc != 0:
                problem = f"{name} exited with {rc} after the unmount:\n{log_tail(log_path)}"
    except subprocess.TimeoutExpired:
        problem = f"{name} did not exit within {UNMOUNT_TIMEOUT:.0f} s of the unmount"
    finally:
        if proc.poll() is None or os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            proc.kill()
            proc.wait()
            problem = problem or f"{name}: had to lazy-unmount and kill it"
    if problem:
        raise BenchError(problem)


@contextlib.contextmanager
def fuse_mount(cmd: list[str], mnt: Path, log_path: Path, name: str) -> Iterator[int]:
    proc = start_fuse(cmd, mnt, log_path, name)
    try:
        yield proc.pid
    finally:
        stop_fuse(proc, mnt, log_path, name)


# -- targets ------------------------------------------------------------------------------------


@contextlib.contextmanager
def plain_target(root: Path) -> Iterator[Target]:
    d = root / "plain"
    d.mkdir()
    yield Target("plain", d, [f"plain: local directory {d}"])


@contextlib.contextmanager
def passthrough_target(root: Path, name: str, threads: bool) -> Iterator[Target]:
    src, mnt, log_path = root / f"{name}-src", root / f"{name}-mnt", root / f"{name}.log"
    src.mkdir()
    mnt.mkdir()
    # The same kernel cache settings as artifactfs: 5 s entry/attribute timeouts and cached
    # negative lookups (artifactfs answers a missing name with a 5 s negative entry).
    cmd = [sys.executable, str(PASSTHROUGH), str(src), str(mnt), "--entry-timeout", "5",
           "--attr-timeout", "5", "--negative-timeout", "5"]
    if threads:
        cmd.append("--threads")
    with fuse_mount(cmd, mnt, log_path, name) as pid:
        first = log_path.read_text(errors="replace").splitlines()[:1]
        declared = first[0].split(": ", 2)[-1] if first else "?"
        yield Target(name, mnt, [f"{name}: {declared}", f"{name}: measured {mount_info(mnt)}"],
                     pid)


@contextlib.contextmanager
def artifactfs_target(root: Path) -> Iterator[Target]:
    store, mnt, log_path = root / "artifactfs-store", root / "artifactfs-mnt", root / "afs.log"
    mnt.mkdir()
    run_quiet([ARTIFACTFS, "init", str(store)])
    cmd = [ARTIFACTFS, "mount", str(store), str(mnt), "--foreground", "--attr-timeout", "5"]
    with fuse_mount(cmd, mnt, log_path, "artifactfs") as pid:
        ws = mnt / "bench" / "shared" / "ws"
        for d in (mnt / "bench", mnt / "bench" / "shared", ws):  # sandbox, scope, namespace
            d.mkdir()
        yield Target("artifactfs", ws, [
            f"artifactfs: {' '.join(cmd[1:])}: entry_timeout=5s attr_timeout=5s "
            "negative_timeout=5s keep_cache=on writeback_cache=off read_ahead_kb=1024, "
            "fsync = syncfs of the blob store + WAL sync",
            f"artifactfs: measured {mount_info(mnt)}",
        ], pid)


def open_target(name: str, root: Path) -> contextlib.AbstractContextManager[Target]:
    if name == "plain":
        return plain_target(root)
    if name == "passthrough":
        return passthrough_target(root, name, threads=False)
    if name == "passthrough-threads":
        return passthrough_target(root, name, threads=True)
    if name == "artifactfs":
        return artifactfs_target(root)
    raise ValueError(name)


# -- test data (cached across runs) -------------------------------------------------------------


def _generate_tree(dest: Path, files: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [f"w{i:x}" for i in range(512)]
    per_dir = 100
    for i in range(files):
        d = dest / f"pkg{i // per_dir // 10:02d}" / f"mod{i // per_dir:03d}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(20, 2000)
        (d / f"file{i:05d}.py").write_text(" ".join(rng.choice(words) for _ in range(n)) + "\n")


def prepare_tarball() -> tuple[Path, str]:
    """An uncompressed tar of a real sdist (or, if pip cannot get it, of a generated tree).

    `pip download --no-binary django` rather than `--no-binary :all:`: with :all: pip also builds
    the build dependencies (setuptools, ...) from source, which took minutes here.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"{SDIST_PKG}-{SDIST_VERSION}.tar"
    if tar.exists():
        return tar, f"{SDIST_PKG} {SDIST_VERSION} sdist"
    generated = CACHE / "generated-5000.tar"
    if generated.exists():
        return generated, "generated tree of 5,000 files (sdist download failed earlier)"
    log(f"bench: downloading the {SDIST_PKG}=={SDIST_VERSION} sdist into {CACHE} (once)")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_PKG,
             "-d", tmp, f"{SDIST_PKG}=={SDIST_VERSION}"],
            capture_output=True, text=True, timeout=900,
        )
        got = sorted(Path(tmp).glob("*.tar.gz"))
        if r.returncode == 0 and got:
            part = tar.with_suffix(".tar.part")
            with gzip.open(got[0], "rb") as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, MiB)
            part.rename(tar)
            return tar, f"{SDIST_PKG} {SDIST_VERSION} sdist"
        log(f"bench: pip download failed ({r.stderr.strip()[-300:]}); generating a tree instead")
        tree = Path(tmp) / "tree"
        _generate_tree(tree / "generated", 5000, seed=1)
        part = generated.with_suffix(".tar.part")
        with tarfile.open(part, "w") as t:
            t.add(tree / "generated", arcname="generated")
        part.rename(generated)
    return generated, "generated tree of 5,000 files (sdist download failed)"


def prepare_repo(files: int, commits: int) -> Path:
    repo = CACHE / f"repo-{files}-{commits}"
    if (repo / ".git").is_dir():
        return repo
    log(f"bench: generating a git repository of {files} files, {commits} commits (once)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="repo-"))
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
               GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)

    try:
        _generate_tree(tmp, files, seed=2)
        git("init", "-q", "-b", "main")
        git("add", "-A")
        git("commit", "-q", "-m", "initial")
        rng = random.Random(3)
        all_files = sorted(p for p in tmp.rglob("*.py"))
        for c in range(1, commits):
            for p in rng.sample(all_files, max(1, len(all_files) // 20)):
                with open(p, "a") as f:
                    f.write(f"# change {c}\n")
            git("commit", "-q", "-a", "-m", f"change {c}")
        git("gc", "-q")  # one pack, as a fetched repository would have
        tmp.rename(repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return repo


# -- workloads ----------------------------------------------------------------------------------


def seq_write(path: Path, size: int) -> float:
    # Every MiB a different window of one random pool: no two blocks of the file are equal,
    # so a deduplicating store (artifactfs) stores and later reads every byte, as with real
    # data. (One buffer written again and again made artifactfs store a single block.)
    pool = memoryview(os.urandom(MiB + 4096))

    def go() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left, i = size, 0
            while left:
                shift = i % 4096
                n = os.write(fd, pool[shift : shift + min(MiB, left)])
                left -= n
                i += 1
            os.fsync(fd)
        finally:
            os.close(fd)

    return size / timed(go) / 1e6


def seq_read(path: Path, size: int) -> float:
    buf = bytearray(MiB)
    total = 0

    def go() -> None:
        nonlocal total
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)

    elapsed = timed(go)
    if total != size:
        raise BenchError(f"read {total} bytes of {path}, expected {size}")
    return size / elapsed / 1e6


def rand_read(path: Path, size: int, count: int) -> float:
    rng = random.Random(42)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        # Random access as a database would declare it: no read-ahead on this descriptor.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

        def go() -> None:
            for off in offsets:
                if len(os.pread(fd, 4096, off)) != 4096:
                    raise BenchError(f"short read at {off} in {path}")

        return count / timed(go)
    finally:
        os.close(fd)


def create_files(tree: Path, files: int, dirs: int) -> tuple[float, list[str]]:
    payload = os.urandom(1024)
    paths = [str(tree / f"d{i % dirs:03d}" / f"f{i:05d}") for i in range(files)]

    def go() -> None:
        tree.mkdir()
        for i in range(dirs):
            os.mkdir(tree / f"d{i:03d}")
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)

    return files / timed(go), paths


def run_workloads(base: Path, p: Params, assets: Assets, report: Callable[[str, float], None],
                  ) -> None:
    """Run every workload in the fresh directory *base*, reporting each figure as it comes."""
    big = base / "big.bin"
    report("seq_write", seq_write(big, p.file_bytes))
    drop_caches()
    report("seq_read_cold", seq_read(big, p.file_bytes))
    report("seq_read_warm", seq_read(big, p.file_bytes))
    drop_caches()
    report("rand_read", rand_read(big, p.file_bytes, p.rand_reads))
    big.unlink()

    tree = base / "small"
    # Before every create-heavy workload: ext4 without a journal (this machine's /) skips inode
    # numbers freed in the last ~30 s while their inode-table block is cached, scanning them on
    # every allocation; after the previous target's cleanup that made creates several times
    # slower. Writing the dirty blocks out and dropping them removes that carry-over.
    drop_caches()
    rate, paths = create_files(tree, p.small_files, p.small_dirs)
    report("create", rate)
    drop_caches()
    report("find", timed(lambda: run_quiet(["find", str(tree)])))
    report("stat", timed(lambda: [os.stat(x) for x in paths]))
    report("ls_lR", timed(lambda: run_quiet(["ls", "-lR", str(tree)])))
    report("rm_rf", timed(lambda: run_quiet(["rm", "-rf", str(tree)])))

    extract = base / "extract"
    extract.mkdir()
    drop_caches()  # the rm -rf above, see create
    warm_up(assets.tarball)  # the source side is not what is measured
    report("untar", timed(lambda: run_quiet(["tar", "-xf", str(assets.tarball), "-C",
                                             str(extract)])))
    report("cp_a", timed(lambda: run_quiet(["cp", "-a", str(extract), str(base / "copy")])))

    clone = base / "clone"
    warm_up(assets.repo)
    report("git_clone", timed(lambda: run_quiet(["git", "clone", "-q", "--no-hardlinks",
                                                 str(assets.repo), str(clone)])))
    # Settle the index first. Git re-reads every file whose mtime falls in the same second as
    # the index ("racily clean"), and the clone writes its index in the second of its last
    # files: a status then re-reads hundreds of files, on any target, depending only on where
    # the second boundary fell. A status a second later writes an index that is past them.
    time.sleep(1.1)
    run_quiet(["git", "-C", str(clone), "status", "--porcelain"])
    report("git_status", timed(lambda: run_quiet(["git", "-C", str(clone), "status",
                                                  "--porcelain"])))


# -- report -------------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def ratio(num: float | None, den: float | None) -> float | None:
    """Speed ratio for throughput rows, time ratio for time rows: both num/den."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def render(medians: dict[str, dict[str, float]], targets: list[str]) -> str:
    ratio_cols = [("afs/plain", "artifactfs", "plain"),
                  ("afs/pass", "artifactfs", "passthrough"),
                  ("pass/plain", "passthrough", "plain")]
    head = ["workload", "unit", *targets, *(c[0] for c in ratio_cols)]
    rows = [head]
    for m in METRICS:
        vals = medians.get(m.key, {})
        row = [m.label, m.unit, *(fmt(vals.get(t)) for t in targets)]
        for _, a, b in ratio_cols:
            q = ratio(vals.get(a), vals.get(b))
            row.append("-" if q is None else f"{q:.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="short run: 64 MiB file, 2,000 random reads, 1,000 small files")
    # 5 full runs: on this VM one target's own figure moves 20-30% between runs (the
    # passthrough's clone 1.56-1.97 s in one run), and a median of 3 followed one bad round.
    p.add_argument("--repeat", type=int, help="runs per target; median reported "
                   "(default 1 with --quick, else 5)")
    p.add_argument("--only", default="plain,passthrough,artifactfs",
                   help=f"comma-separated targets out of {','.join(TARGETS)}")
    p.add_argument("--json", type=Path, help="also write all runs and medians to this file")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="skip the checkpoint figures (scripts/bench_checkpoints.py) at the end")
    p.add_argument("--backend", choices=("local", "s3"), default="local",
                   help="s3: also run on an S3-backed store against a local SeaweedFS and "
                   "compare its throughput with boto3 alone (scripts/bench_s3.py)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temp dir for all targets goes (default /var/tmp)")
    return p.parse_args(argv)


def preflight(targets: list[str], params: Params, workdir: Path) -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: cold figures write /proc/sys/vm/drop_caches")
    for tool in ("fusermount3", "git", "tar", "find", "ls", "cp", "rm"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found in PATH")
    if "artifactfs" in targets and not os.access(ARTIFACTFS, os.X_OK):
        raise BenchError(
            f"the artifactfs CLI is missing: {ARTIFACTFS} is not an executable. Install the "
            "project into .venv (pip install -e .), point ARTIFACTFS at the CLI, or leave it "
            "out: --only plain,passthrough")
    free = shutil.disk_usage(workdir).free
    need = len(targets) * params.file_bytes * 2 + (2 << 30)
    if free < need:
        raise BenchError(f"{workdir} has {free >> 30} GiB free; this run needs ~{need >> 30} GiB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        print(f"bench: error: unknown target(s) {unknown}; choose from {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL
    repeat = args.repeat or (1 if args.quick else 5)
    try:
        preflight(targets, params, args.workdir)
        tarball, tar_desc = prepare_tarball()
        repo = prepare_repo(params.repo_files, params.repo_commits)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    assets = Assets(tarball, tar_desc, repo,
                    f"{params.repo_files} files, {params.repo_commits} commits")

    runs: dict[str, dict[str, list[float]]] = {m.key: {t: [] for t in targets} for m in METRICS}
    settings: dict[str, list[str]] = {}
    s3_table = ""
    load_before = load_note()
    root = Path(tempfile.mkdtemp(prefix="artifactfs-bench-", dir=args.workdir))
    failed = False
    try:
        with contextlib.ExitStack() as stack:
            opened = {t: stack.enter_context(open_target(t, root)) for t in targets}
            settings = {t: opened[t].settings for t in targets}
            for rep in range(repeat):
                # Interleaved: each repetition visits every target, so drift hits all alike;
                # every other one in reverse order, so that a target that follows another
                # (its leftover writeback, a slow phase of the machine) is not always the same.
                for t in targets if rep % 2 == 0 else targets[::-1]:
                    base = opened[t].workdir / f"run{rep}"
                    base.mkdir()

                    def report(key: str, value: float, t: str = t, rep: int = rep) -> None:
                        runs[key][t].append(value)
                        unit = next(m.unit for m in METRICS if m.key == key)
                        log(f"[{rep + 1}/{repeat}] {t:<20} {key:<14} {fmt(value)} {unit}")

                    run_workloads(base, params, assets, report)
                    run_quiet(["rm", "-rf", str(base)])
            for t, target in opened.items():
                if target.pid is not None:
                    user, system = cpu_seconds(target.pid)
                    settings[t].append(f"{t}: daemon CPU {user:.1f} s user + {system:.1f} s "
                                       f"system over {repeat} run(s) of all workloads")
        if args.backend == "s3":  # one run of the workloads on an S3 store, then throughput
            s3_table = bench_s3.run(
                root / "s3", lambda base, rep: run_workloads(base, params, assets, rep),
                lambda key, value: runs[key].setdefault("artifactfs-s3", []).append(value),
                ARTIFACTFS, fuse_mount, drop_caches, params.file_bytes)
            targets.append("artifactfs-s3")
    except (BenchError, bench_s3.S3BenchError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        failed = True
    finally:
        if not any(os.path.ismount(p) for p in root.iterdir()):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"bench: something is still mounted under {root}; left it in place",
                  file=sys.stderr)
            failed = True
    if failed:
        return 1

    medians = {k: {t: statistics.median(v) for t, v in per.items() if v}
               for k, per in runs.items()}
    mode = "quick" if args.quick else "full"
    print(f"\nartifactfs bench ({mode}: {params.file_bytes // MiB} MiB file, "
          f"{params.rand_reads:,} random reads, {params.small_files:,} small files in "
          f"{params.small_dirs} dirs; median of {repeat} run(s))")
    print(f"work file system: {args.workdir}; tarball: {assets.tarball_desc}; "
          f"git repo: {assets.repo_desc}")
    print(f"machine: {load_before} at the start, {load_note()} at the end "
          "(other load makes the figures noisy)")
    print("ratios are num/den of the two columns: for MB/s, reads/s and files/s rows a SPEED "
          "ratio (>1 = faster); for s rows a TIME ratio (>1 = slower)\n")
    print(render(medians, targets))
    if s3_table:
        print(f"\n{s3_table}")
    print("\ncache settings:")
    for t in targets:
        for line in settings.get(t, []):
            print(f"  {line}")
    checkpoints: dict[str, float] = {}
    if not args.no_checkpoints:
        # Checkpoint costs (issue 4), on the core of a fresh store: quick = 10k files.
        files, dirs = (10_000, 100) if args.quick else (100_000, 1_000)
        work = Path(tempfile.mkdtemp(prefix="artifactfs-ckbench-", dir=args.workdir))
        try:
            checkpoints = trio.run(bench_checkpoints.run, work, files, dirs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print()
        print(bench_checkpoints.render(checkpoints, files, dirs))
    if args.json:
        args.json.write_text(json.dumps({
            "mode": mode, "repeat": repeat, "params": params.__dict__,
            "assets": {"tarball": assets.tarball_desc, "repo": assets.repo_desc},
            "settings": settings, "load": {"start": load_before, "end": load_note()},
            "metrics": [m.__dict__ for m in METRICS],
            "runs": runs, "medians": medians, "checkpoints": checkpoints,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
