"""Fixtures and checks shared by the fault suite.

Every fault test ends with the same questions, asked by `check_daemon`: is the daemon
alive, does `p2pfs status` answer within STATUS_BOUND_S, and did its peak RSS (VmHWM)
stay within the memory cache it was given plus RSS_OVERHEAD. Reads go through
`read_file`, a child process with a timeout, so a hang fails the test instead of wedging
it. The figures (cases run, faults survived, worst EIO latency against its bound, peak
RSS against its limit) are collected in FIGURES and written, at the end of the session,
to `<pytest basetemp>/fault-figures.json` (and to $P2PFS_FAULT_FIGURES if set); the
terminal summary prints them. docs/RELIABILITY.md records a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import xxhash

from conftest import Mount, p2pfs_cmd, wait_for

MiB = 1 << 20
HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
READER = HERE / "_reader.py"
#: `p2pfs status` must answer within this (the CLI's own start-up is about 1 s of it).
STATUS_BOUND_S = 5.0
#: The daemon's memory beyond its chunk cache: the interpreter, aiobotocore and pyfuse3
#: (about 90 MiB idle here), the manifests, the write-back queue and the buffers of the
#: requests in flight. The fault mounts use 1 MiB chunks and --memory-size 32MiB; 32
#: queued write-backs and 16 requests of up to 8 MiB would be 160 MiB at worst, rarely
#: all at once. A zstd bomb took it to gigabytes (defect 3).
RSS_OVERHEAD = 256 * MiB
FAULT_MEMORY = 32 * MiB
#: Slack on top of read_timeout for a failing read: the kernel's round trip, the reader's
#: own start, a thread hand-off. Below read_timeout, so a reader that waits for two
#: timeouts (defect 7) is caught.
EIO_SLACK_S = 1.5


class Figures:
    """What the fault suite measured, for the summary and docs/RELIABILITY.md."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.eio: list[dict] = []
        self.rss: list[dict] = []
        self.started = time.time()

    def ran(self, kind: str, n: int = 1) -> None:
        self.cases[kind] += n

    def survived(self, fault: str, n: int = 1) -> None:
        self.faults[fault] += n

    def eio_latency(self, what: str, seconds: float, bound: float) -> None:
        self.eio.append({"what": what, "seconds": round(seconds, 3), "bound_s": bound})

    def peak_rss(self, what: str, peak: int, limit: int) -> None:
        self.rss.append({"what": what, "peak_bytes": peak, "limit_bytes": limit})

    def summary(self) -> dict:
        worst_eio = max(self.eio, key=lambda e: e["seconds"] / e["bound_s"], default=None)
        worst_rss = max(self.rss, key=lambda r: r["peak_bytes"], default=None)
        return {
            "date": time.strftime("%Y-%m-%d", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "cases_run": dict(sorted(self.cases.items())),
            "cases_total": sum(self.cases.values()),
            "faults_survived": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "worst_eio": worst_eio,
            "eio": self.eio,
            "worst_rss": worst_rss,
            "rss": self.rss,
        }


FIGURES = Figures()
_written: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def figures(tmp_path_factory) -> Iterator[Figures]:
    yield FIGURES
    out = tmp_path_factory.getbasetemp() / "fault-figures.json"
    text = json.dumps(FIGURES.summary(), indent=1) + "\n"
    out.write_text(text)
    _written.append(out)
    if os.environ.get("P2PFS_FAULT_FIGURES"):
        Path(os.environ["P2PFS_FAULT_FIGURES"]).write_text(text)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _written:
        return
    s = FIGURES.summary()
    tr = terminalreporter
    tr.section("fault suite figures")
    tr.write_line(f"cases run: {s['cases_total']}  {s['cases_run']}")
    tr.write_line(f"faults survived: {s['faults_total']}  {s['faults_survived']}")
    if s["worst_eio"]:
        w = s["worst_eio"]
        tr.write_line(f"worst EIO latency: {w['seconds']:.2f}s against a bound of {w['bound_s']}s ({w['what']})")
    if s["worst_rss"]:
        w = s["worst_rss"]
        tr.write_line(f"peak daemon RSS: {w['peak_bytes'] / MiB:.0f} MiB against a limit of "
                      f"{w['limit_bytes'] / MiB:.0f} MiB ({w['what']})")
    tr.write_line(f"written to {_written[0]}")


# -- reads in a child process ----------------------------------------------------------------
@dataclass
class Read:
    ok: bool
    errno: int = 0
    sha256: str = ""
    n: int = 0
    seconds: float = 0.0  # from the reader's first touch of the file to its end
    signal: int = 0  # the reader died of this signal (SIGBUS from mmap)
    hung: bool = False


def read_file(path: Path | str, *, mode: str = "buffered", offset: int = 0, length: int = -1,
              timeout: float = 60.0, copy: Path | None = None) -> Read:
    """Read `path` in a child process; a read still running after `timeout` is killed and
    reported as hung. With `copy`, the bytes read are written there too."""
    t_spawn = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(READER), str(path), mode, str(offset), str(length),
                             *([str(copy)] if copy else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL ends even a reader blocked in a FUSE request (it is killable)
        proc.communicate(timeout=30)
        return Read(ok=False, hung=True, seconds=time.monotonic() - t_spawn)
    t_end = time.monotonic()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    t0 = lines[0]["t0"] if lines else t_spawn
    if proc.returncode < 0:
        return Read(ok=False, signal=-proc.returncode, seconds=t_end - t0)
    last = lines[-1]
    return Read(ok=last["ok"], errno=last.get("errno", 0), sha256=last.get("sha256", ""),
                n=last.get("n", 0), seconds=last["t1"] - t0)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_served(path: Path, expected: bytes, *, mode: str = "buffered", timeout: float = 60.0) -> Read:
    r = read_file(path, mode=mode, timeout=timeout)
    assert not r.hung, f"read of {path} ({mode}) hung for {timeout}s"
    assert r.ok, f"read of {path} ({mode}) failed: errno {r.errno} signal {r.signal}"
    assert r.n == len(expected) and r.sha256 == sha256(expected), f"wrong bytes served from {path}"
    return r


# -- the daemon ----------------------------------------------------------------------------
def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def status_within(m: Mount, bound: float = STATUS_BOUND_S) -> dict:
    """`p2pfs status --json` of `m`, which must answer within `bound` seconds."""
    t0 = time.monotonic()
    try:
        r = p2pfs_cmd("status", str(m.path), "--json", check=False, timeout=bound + 5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"p2pfs status did not answer within {bound + 5}s") from None
    took = time.monotonic() - t0
    assert r.returncode == 0, f"p2pfs status failed: {r.stderr}"
    assert took < bound, f"p2pfs status took {took:.1f}s (bound {bound}s)"
    return json.loads(r.stdout)


def check_daemon(m: Mount, what: str, *, memory: int = FAULT_MEMORY) -> dict:
    """The daemon is alive, answers status in time, and its peak RSS is within its settings."""
    assert m.alive(), f"{what}: the daemon (pid {m.pid}) died"
    _, hwm = rss(m.pid)
    limit = memory + RSS_OVERHEAD
    FIGURES.peak_rss(what, hwm, limit)
    s = status_within(m)
    assert s["pid"] == m.pid
    assert hwm <= limit, f"{what}: daemon peak RSS {hwm / MiB:.0f} MiB over {limit / MiB:.0f} MiB"
    return s


# -- the disk cache on disk (format 2, docs/FORMAT.md "Disk cache") ------------------------
BLOCK = 4096
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@dataclass(frozen=True)
class Record:
    """One chunk the cache index names: at `at` of the data file `path` (of `fsize` bytes)."""

    path: Path
    at: int
    fsize: int
    size: int
    sha256: str
    xxh3: str


def data_files(cache_dir: Path) -> list[Path]:
    """Everything at a data file's depth under `files/` (whatever it is: a damaged cache
    may hold a directory or a FIFO there)."""
    return sorted((cache_dir / "files").glob("*/*"))


def index_records(cache_dir: Path) -> list[Record]:
    """The chunk records of the index, replayed as the scan does: a later record of a spot
    wins, a file id names one size (its first record's), a torn line names nothing. At run
    time the index also holds records of chunks evicted since (their ranges holes)."""
    by_spot: dict[tuple[str, int], Record] = {}
    sizes: dict[str, int] = {}
    try:
        raw = (cache_dir / "index").read_bytes()
    except FileNotFoundError:
        return []
    for line in raw.splitlines(keepends=True):
        parts = line.decode("ascii", "replace").split()
        if not line.endswith(b"\n") or len(parts) != 8 or parts[0] != "c":
            continue
        _, fid, at, fsize, size, digest, xxh, _ = parts
        if sizes.setdefault(fid, int(fsize)) != int(fsize):
            continue
        path = cache_dir / "files" / fid[:2] / fid
        by_spot[(fid, int(at))] = Record(path, int(at), int(fsize), int(size), digest, xxh)
    return sorted(by_spot.values(), key=lambda r: (str(r.path), r.at))


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The ranges of a file that hold data (SEEK_DATA/SEEK_HOLE: block granular)."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def _covered(extent: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    """Whether `extent` lies within the union of `ranges` widened to whole blocks."""
    merged: list[list[int]] = []
    for a, b in sorted((a - a % BLOCK, -(-b // BLOCK) * BLOCK) for a, b in ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return any(a <= extent[0] and extent[1] <= b for a, b in merged)


@dataclass
class CacheOnDisk:
    chunks: int     # chunks whose bytes are on disk and match their record's xxh3
    bytes: int      # their sizes (what the daemon's budget counts)
    allocated: int  # blocks the data files hold


def check_cache(cache_dir: Path, *, xxh3: bool = True) -> CacheOnDisk:
    """What a cache dir holds, checked: call it while the daemon is idle (after its scan,
    or with nothing being written). Every entry under `files/` is a regular data file in
    its own directory that a record names; the bytes of every chunk recorded whose range
    holds data match the record's xxh3 (a torn or corrupt chunk would not; `xxh3=False`
    skips this: the scan leaves bad bytes in place for the read-back to find); and no data
    file holds data outside its chunks (a torn write, an evicted chunk's bytes: punched)."""
    records = index_records(cache_dir)
    by_path: dict[Path, list[Record]] = {}
    for r in records:
        by_path.setdefault(r.path, []).append(r)
    for sub in (cache_dir / "files").iterdir():
        assert sub.is_dir() and not sub.is_symlink(), f"{sub.name}: no directory, left in files/"
    live, allocated = [], 0
    for path in data_files(cache_dir):
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode), f"{path.name}: {stat.filemode(st.st_mode)} left in the cache"
        mine = by_path.get(path)
        assert mine, f"{path.name}: a data file no record names, left in the cache"
        assert st.st_size == mine[0].fsize, f"{path.name}: {st.st_size} bytes, recorded {mine[0].fsize}"
        allocated += st.st_blocks * 512
        fd = os.open(path, os.O_RDONLY)
        try:
            extents = data_extents(fd, st.st_size)
            here = [r for r in mine if any(a <= r.at and r.at + r.size <= b for a, b in extents)]
            for r in here if xxh3 else ():
                got = os.pread(fd, r.size, r.at)
                assert xxhash.xxh3_64_hexdigest(got) == r.xxh3, f"{path.name}+{r.at}: torn or corrupt chunk"
            for e in extents:
                assert _covered(e, [(r.at, r.at + r.size) for r in here]), \
                    f"{path.name}: data at {e} that no chunk record names"
        finally:
            os.close(fd)
        assert here, f"{path.name}: a data file with no chunk in it"
        live += here
    return CacheOnDisk(len(live), sum(r.size for r in live), allocated)


def cache_bytes(cache_dir: Path) -> int:
    """Bytes the data files under a cache dir hold on disk (allocated blocks: a data file
    is created sparse at its file's size, and evicted chunks are holes)."""
    total = 0
    for root, _, files in os.walk(cache_dir / "files"):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def fuse_abort(m: Mount) -> bool:
    """Abort the FUSE connection of `m` (fusectl): the way out of a daemon wedged in D
    state on its own mount. True if there was a connection to abort."""
    from p2pfs.tune import FUSECTL, mount_entry

    entry = mount_entry(m.path)
    if entry is None:
        return False
    conn = FUSECTL / str(os.makedev(entry[0], entry[1])) / "abort"
    try:
        conn.write_text("1")
        return True
    except OSError:
        return False


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# -- objects in the store --------------------------------------------------------------------
def put_objects(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    import trio
    import trio_asyncio

    from p2pfs.config import S3Config
    from p2pfs.origin._s3 import S3Origin

    async def main() -> None:
        async with trio_asyncio.open_loop():
            o = await S3Origin.create(bucket, S3Config(endpoint_url=endpoint))
            try:
                for key, value in objects.items():
                    await o.put(key, value)
            finally:
                await o.aclose()

    trio.run(main)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def publish_dir(src: Path, url: str, endpoint: str, chunk_size: str = "1MiB") -> None:
    p2pfs_cmd("publish", "--chunk-size", chunk_size, str(src), url, endpoint=endpoint)


def good_model(root: Path, seed: int = 7, size: int = 3 * MiB + 4321) -> dict[str, bytes]:
    """A small model directory: one multi-chunk file, one small file. Returns its files."""
    import random

    rng = random.Random(seed)
    files = {"weights.bin": rng.randbytes(size), "config.json": b'{"layers": 2}'}
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private_seaweed(tmp_path_factory) -> Iterator:
    """A SeaweedFS of this module's own, for tests that stop or stall the store."""
    from p2pfs.seaweed import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("private-seaweed"))
    server.start()
    try:
        server.create_bucket("faults")
        yield server
    finally:
        if server.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()


@contextlib.contextmanager
def stalled(server) -> Iterator[None]:
    """SIGSTOP every process of a SeaweedServer (its own process group); always resumed."""
    pgid = server.proc.pid
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)


def wait_serving(server, timeout: float = 60.0) -> None:
    """A restarted weed answers 500 until its volumes have registered: wait for a GET."""
    import urllib.error
    import urllib.request

    def ok() -> bool:
        try:
            urllib.request.urlopen(server.endpoint + "/faults/", timeout=2).close()
            return True
        except urllib.error.HTTPError as exc:
            return exc.code < 500
        except OSError:
            return False

    wait_for(ok, timeout=timeout, what="SeaweedFS to serve again")


@pytest.fixture
def tmpfs(tmp_path) -> Iterator:
    """A factory of small tmpfs mounts (a cache disk that fills); always unmounted."""
    mounted: list[Path] = []

    def make(size: str = "16m", name: str = "tmpfs") -> Path:
        d = tmp_path / name
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                       check=True, capture_output=True, timeout=30)
        mounted.append(d)
        return d

    yield make
    for d in reversed(mounted):
        r = subprocess.run(["umount", str(d)], capture_output=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def good_store(seaweed, tmp_path_factory) -> dict:
    """One good model published with 1 MiB chunks: {"url" of the prefix holding it (the
    model is `good` under it), "files": name -> bytes}."""
    src = tmp_path_factory.mktemp("good-src") / "good"
    files = good_model(src)
    url = f"s3://models/{unique('faults')}"
    publish_dir(src, f"{url}/good", seaweed.endpoint)
    return {"url": url, "files": files, "src": src}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
