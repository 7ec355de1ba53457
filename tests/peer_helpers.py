"""Several p2pfs nodes on one machine, for tests/test_peers_cluster.py and
bench/bench_peers.py.

- `StoreRelay`: a threaded TCP relay in front of SeaweedFS's S3 port. It counts the bytes
  the store sent to clients, per connection and in total: origin egress measured at the
  store's side, not by the daemons' own counters. Optionally paced (bytes/s), so that a
  cold read lasts long enough to inject a fault in the middle of it.
- `Cluster`: N `p2pfs mount` daemons (conftest's `Mount`, the real CLI), node i on
  127.0.0.(10+i) with its own mountpoint and cache dir; with peers on, each gets
  `--peer-listen` its address, `--peers` every address and one token file. Nodes are
  stopped (unmounted, then SIGKILLed by PID if they linger) whatever happened; a
  SIGSTOPped node gets SIGCONT first.
- `read_all_nodes`: one reader process per path, all released at the same instant, each
  reading the whole file (optionally hashing it) and saying when it began, ended and the
  longest single read(2) it waited for. A reader still running at its timeout is killed
  and reported as hung.

Run as a script (`python peer_helpers.py read PATH [--hash]`) it is that reader.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MiB = 1 << 20
#: Node i listens on 127.0.0.(FIRST_HOST + i).
FIRST_HOST = 10
_RELAY_BUF = 256 * 1024


# -- the store-side byte counter ---------------------------------------------------------------
@dataclass
class RelayConn:
    client: tuple[str, int]
    to_client: int = 0  # bytes the store sent (origin egress)
    to_store: int = 0
    open: bool = True
    pumps: int = 2  # directions still running; the last one closes both sockets


class StoreRelay:
    """Listens on (host, port) and forwards every connection to `upstream`.

    `rate` (bytes/s, 0 = none) paces the store->client direction, all connections
    together. The counters are bytes of TCP payload (HTTP heads included), so they are
    what the store really sent, a little more than the chunk bytes."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0,
                 rate: float = 0) -> None:
        self.upstream, self.rate = upstream, rate
        self._listener = socket.create_server((host, port), backlog=128)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._conns: list[RelayConn] = []
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._next_send = 0.0  # pacing: when the next byte may leave

    @property
    def endpoint(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def start(self) -> "StoreRelay":
        self._spawn(self._accept_loop)
        return self

    def __enter__(self) -> "StoreRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def egress(self) -> int:
        """Bytes the store sent to clients since the start (or the last reset)."""
        with self._lock:
            return sum(c.to_client for c in self._conns)

    def connections(self) -> list[RelayConn]:
        with self._lock:
            return [RelayConn(c.client, c.to_client, c.to_store, c.open, c.pumps) for c in self._conns]

    def reset(self) -> None:
        """Zero the counters (open connections keep counting from zero)."""
        with self._lock:
            for c in self._conns:
                c.to_client = c.to_store = 0
            self._conns = [c for c in self._conns if c.open]

    def stop(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:  # unblocks every pump's recv
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, addr = self._listener.accept()
            except OSError:
                return
            try:
                store = socket.create_connection(self.upstream, timeout=10)
                store.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = RelayConn(addr[:2])
            with self._lock:
                self._conns.append(conn)
                self._socks.update((client, store))
            self._spawn(self._pump, store, client, conn, True)
            self._spawn(self._pump, client, store, conn, False)

    def _pump(self, src: socket.socket, dst: socket.socket, conn: RelayConn, egress: bool) -> None:
        buf = bytearray(_RELAY_BUF)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                if egress and self.rate:
                    self._pace(n)
                dst.sendall(view[:n])
                if egress:
                    conn.to_client += n
                else:
                    conn.to_store += n
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            conn.pumps -= 1
            if conn.pumps:
                return
            conn.open = False
            self._socks.difference_update((src, dst))
        src.close()
        dst.close()

    def _pace(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            at = max(now, self._next_send)
            self._next_send = at + n / self.rate
        if at > now:
            time.sleep(at - now)


# -- N daemons -----------------------------------------------------------------------------
def mount_has_peer_flags() -> bool:
    """Whether this p2pfs's `mount` takes --peer-listen (the peer tier is wired in)."""
    r = subprocess.run([sys.executable, "-m", "p2pfs", "mount", "--help"], capture_output=True,
                       text=True, timeout=60)
    return "--peer-listen" in r.stdout


def node_host(i: int) -> str:
    return f"127.0.0.{FIRST_HOST + i}"


def free_port(hosts: Sequence[str]) -> int:
    """A port free on every one of `hosts`."""
    for _ in range(200):
        port = random.randrange(40000, 50000)
        ok = True
        for h in hosts:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def write_token(path: Path) -> Path:
    """A fresh cluster token file, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


class Cluster:
    """`n` nodes of one source URL under `base`; none runs until `start`.

    Every node's --peers lists all `n` addresses from the start, so a node not started
    yet is simply a member that is down (a join is `start(i)` later)."""

    def __init__(self, url: str, endpoint: str, base: Path, n: int, *, peers: bool,
                 args: Sequence[str] = (), port: int | None = None) -> None:
        from conftest import Mount

        self.url, self.endpoint, self.base, self.peers = url, endpoint, Path(base), peers
        self.hosts = [node_host(i) for i in range(n)]
        self.port = port or free_port(self.hosts)
        self.addrs = [f"{h}:{self.port}" for h in self.hosts]
        self.base.mkdir(parents=True, exist_ok=True)
        self.token_file = write_token(self.base / "token") if peers else None
        self.nodes: list[Mount] = []
        for i, addr in enumerate(self.addrs):
            mp = self.base / f"mnt{i}"
            mp.mkdir(exist_ok=True)
            extra = list(args)
            if peers:
                extra += ["--peer-listen", addr, "--peers", ",".join(self.addrs),
                          "--cluster-token-file", str(self.token_file)]
            self.nodes.append(Mount(url, mp, self.base / f"cache{i}", endpoint, extra))
        self._stopped: set[int] = set()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self, which: Sequence[int] | None = None, *, ready_timeout: float = 30.0) -> "Cluster":
        """Start the nodes `which` (default: all) at once; return when each is mounted
        and, with peers on, answers /healthz with 200."""
        which = list(range(len(self.nodes)) if which is None else which)
        with concurrent.futures.ThreadPoolExecutor(len(which)) as pool:
            for f in [pool.submit(self.nodes[i].start) for i in which]:
                f.result()
        if self.peers:
            for i in which:
                self.wait_peer_ready(i, ready_timeout)
        return self

    def wait_peer_ready(self, i: int, timeout: float) -> None:
        url = f"http://{self.addrs[i]}/healthz"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                with opener.open(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.code
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"node {i} ({self.addrs[i]}) not ready in {timeout}s: {last}")

    def path(self, i: int, rel: str) -> Path:
        return self.nodes[i].path / rel

    def pid(self, i: int) -> int:
        return self.nodes[i].pid

    def signal(self, i: int, sig: int) -> None:
        """Send `sig` to node i's daemon (by PID); remembers SIGSTOP so stop() resumes it."""
        os.kill(self.nodes[i].pid, sig)
        if sig == signal.SIGSTOP:
            self._stopped.add(i)
        elif sig == signal.SIGCONT:
            self._stopped.discard(i)

    def status(self, i: int) -> dict:
        return self.nodes[i].status()

    def statuses(self, which: Sequence[int] | None = None) -> list[dict]:
        which = range(len(self.nodes)) if which is None else which
        return [self.status(i) for i in which]

    def wait_writeback(self, which: Sequence[int] | None = None, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for i in range(len(self.nodes)) if which is None else which:
            while self.status(i).get("writeback_pending") and time.monotonic() < deadline:
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop every started node: SIGCONT the stopped ones, unmount, SIGKILL by PID
        what lingers. Never raises for one node before trying all."""
        errors = []
        for i in sorted(self._stopped):
            try:
                os.kill(self.nodes[i].pid, signal.SIGCONT)
            except (ProcessLookupError, OSError):
                pass
        self._stopped.clear()
        for m in self.nodes:
            try:
                m.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def bytes_by_source(statuses: Sequence[dict]) -> dict[str, int]:
    """bytes_by_source summed over nodes."""
    total: dict[str, int] = {}
    for s in statuses:
        for k, v in (s.get("bytes_by_source") or {}).items():
            total[k] = total.get(k, 0) + int(v)
    return total


# -- readers ---------------------------------------------------------------------------------
@dataclass
class Read:
    path: str
    ok: bool
    n: int = 0
    sha256: str = ""
    errno: int = 0
    t0: float = 0.0  # CLOCK_MONOTONIC, comparable with time.monotonic() here
    t1: float = 0.0
    max_gap: float = 0.0  # the longest single read(2), seconds
    hung: bool = False
    signal: int = 0

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


class Readers:
    """Reader processes for `paths`, spawned and waiting; `go()` releases them all at
    once (one line on each one's stdin) and `wait()` collects them."""

    def __init__(self, paths: Sequence[Path], *, hash: bool = True) -> None:
        self.paths = [str(p) for p in paths]
        self.procs = [subprocess.Popen([sys.executable, __file__, "read", p, *(["--hash"] if hash else [])],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
                      for p in self.paths]
        for p in self.procs:  # each says it is ready before it is told to go
            p.stdout.readline()
        self.t_go = 0.0

    def go(self) -> float:
        self.t_go = time.monotonic()
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return self.t_go

    def wait(self, timeout: float) -> list[Read]:
        deadline = self.t_go + timeout
        out: list[Read] = []
        for path, p in zip(self.paths, self.procs):
            try:
                stdout, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()  # SIGKILL ends even a reader blocked in a FUSE request
                p.communicate(timeout=30)
                out.append(Read(path, ok=False, hung=True, t0=self.t_go, t1=time.monotonic()))
                continue
            if p.returncode < 0:
                out.append(Read(path, ok=False, signal=-p.returncode))
                continue
            last = json.loads(stdout.strip().splitlines()[-1])
            out.append(Read(path, **last))
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)


def read_all_nodes(paths: Sequence[Path], *, timeout: float, hash: bool = True) -> list[Read]:
    """Read every path fully, all at once; one Read each, in order."""
    r = Readers(paths, hash=hash)
    try:
        r.go()
        return r.wait(timeout)
    finally:
        r.kill()


def _reader_main(path: str, do_hash: bool) -> None:
    h = hashlib.sha256() if do_hash else None
    buf = bytearray(8 * MiB)
    print("ready", flush=True)
    sys.stdin.readline()
    res: dict = {"ok": True, "n": 0, "max_gap": 0.0}
    res["t0"] = time.monotonic()
    try:
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buf)
            while True:
                a = time.monotonic()
                k = f.readinto(buf)
                res["max_gap"] = max(res["max_gap"], time.monotonic() - a)
                if not k:
                    break
                if h is not None:
                    h.update(view[:k])
                res["n"] += k
    except OSError as exc:
        res.update(ok=False, errno=exc.errno or 0)
    res["t1"] = time.monotonic()
    if h is not None:
        res["sha256"] = h.hexdigest()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "read":
        _reader_main(sys.argv[2], "--hash" in sys.argv[3:])
    else:
        sys.exit("usage: peer_helpers.py read PATH [--hash]")
