"""Integration (issue 12, defects 1, 3, 4, 9, 11): hostile manifests next to a good model
under one prefix, a blob that shrank after indexing, and read-ahead under a small memory
tier, all on a real SeaweedFS and a real FUSE mount."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import trio
import trio_asyncio

from conftest import drop_page_cache, needs_fuse, p2pfs_cmd, wait_for

pytestmark = needs_fuse
MiB = 1 << 20
H = "ab" * 32


def _put(endpoint: str, objects: dict[str, bytes]) -> None:
    from p2pfs.config import S3Config
    from p2pfs.origin._s3 import S3Origin

    async def main():
        async with trio_asyncio.open_loop():
            o = await S3Origin.create("models", S3Config(endpoint_url=endpoint))
            try:
                for key, data in objects.items():
                    await o.put(key, data)
            finally:
                await o.aclose()

    trio.run(main)


def _manifest(**entry) -> bytes:
    f = {"path": "f", "type": "file", "size": 4, "chunks": [[0, 0, 4, 4, "none", H]]}
    f.update(entry)
    return json.dumps({"format": "p2pfs-manifest", "version": 1, "chunk_size": 4, "blobs": ["b"],
                       "entries": [{"path": "", "type": "dir"}, f]}).encode()


HOSTILE = {
    "uid": _manifest(uid=1099511627776),
    "gid": _manifest(gid=1 << 33),
    "mtime": _manifest(mtime_ns=1 << 70),
    "size": _manifest(size=1 << 64, chunks=[]),
    "rdev": _manifest(type="char", rdev=1 << 40),
    "digits": b'{"format":"p2pfs-manifest","version":1,"chunk_size":' + b"9" * 5000 + b"}",
    "nested": b"[" * 100000 + b"]" * 100000,
    "surrogate": _manifest(path="f\ud800"),
    "bomb": _manifest(size=2**31, chunks=[[0, 0, 65536, 2**31, "zstd", H]]),
}


def test_hostile_manifests_are_skipped_and_the_mount_survives_ls(seaweed, tmp_path, mount_factory):
    prefix = f"hostile-{uuid.uuid4().hex[:6]}"
    src = tmp_path / "good"
    src.mkdir()
    (src / "a.txt").write_text("good model")
    p2pfs_cmd("publish", str(src), f"s3://models/{prefix}/good", endpoint=seaweed.endpoint)
    objects = {f"{prefix}/{name}/.p2pfs/manifest.json": data for name, data in HOSTILE.items()}
    # Over the size limit: refused from the listing's size, never downloaded.
    from p2pfs.manifest import MAX_MANIFEST_BYTES
    objects[f"{prefix}/huge/.p2pfs/manifest.json"] = b" " * (MAX_MANIFEST_BYTES + 1)
    _put(seaweed.endpoint, objects)

    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint)
    assert os.listdir(m.path) == ["good"]
    problems = m.info["problems"]
    for name in [*HOSTILE, "huge"]:
        assert sum(f"{prefix}/{name}/" in p for p in problems) == 1, (name, problems)
    assert all("\n" not in p and len(p) < 1000 for p in problems)
    r = subprocess.run(["ls", "-lRn", str(m.path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "a.txt" in r.stdout, r.stderr
    assert (m.path / "good" / "a.txt").read_text() == "good model"
    assert m.alive()
    assert [x["path"] for x in m.status()["models"]] == ["good"]


def test_a_blob_that_shrank_fails_at_once_not_after_retries(seaweed, tmp_path, mount_factory):
    """Defect 9: a chunk range past the end of its blob was retried as an outage (EIO
    only after ~9 s); it is permanent for that manifest."""
    prefix = f"shrunk-{uuid.uuid4().hex[:6]}"
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(1).randbytes(3 * MiB)
    (src / "w.bin").write_bytes(data)
    _put(seaweed.endpoint, {f"{prefix}/w.bin": data})
    p2pfs_cmd("index", "--chunk-size", "1MiB", f"s3://models/{prefix}", endpoint=seaweed.endpoint)
    _put(seaweed.endpoint, {f"{prefix}/w.bin": data[: 2 * MiB + 100]})  # changed after indexing
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint, "--read-timeout", "20")
    t0 = time.monotonic()
    with open(m.path / "w.bin", "rb", buffering=0) as f:
        assert f.read(MiB) == data[:MiB]
        f.seek(2 * MiB + 4096)
        with pytest.raises(OSError) as exc:
            f.read(4096)
    assert exc.value.errno == 5
    assert time.monotonic() - t0 < 5, "a truncated blob must not be retried until the deadline"
    assert m.alive()


def test_read_ahead_does_not_evict_its_own_chunks(seaweed, tmp_path, mount_factory):
    """Defect 11: with a memory tier smaller than the read-ahead window, read-ahead evicted
    chunks before the reader got to them (2.8x disk reads for one sequential read)."""
    prefix = f"ra-{uuid.uuid4().hex[:6]}"
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(2).randbytes(24 * MiB)
    (src / "w.bin").write_bytes(data)
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), f"s3://models/{prefix}",
              endpoint=seaweed.endpoint)
    cache = tmp_path / "cache"
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint, "--memory-size", "4MiB",
                      cache_dir=cache)
    assert (m.path / "w.bin").read_bytes() == data  # cold: fills the disk cache
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    m.stop()
    drop_page_cache()
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint, "--memory-size", "4MiB",
                      cache_dir=cache)
    assert (m.path / "w.bin").read_bytes() == data
    s = m.status()
    assert s["hits"]["disk"] <= 24 * 1.1, s["hits"]
    assert s["bytes_by_source"].get("origin", 0) == 0


MMAP_READ = """
import mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    m[int(sys.argv[2])]
"""


def test_every_reader_sees_the_configured_read_timeout(tmp_path, mount_factory):
    """Defect 7: after an EIO the kernel re-issues the failed read-ahead synchronously, so
    `cat` failed after 2x read_timeout and an mmap fault after 3x (then SIGBUS)."""
    import signal

    from p2pfs.seaweed import SeaweedServer

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / name).write_bytes(random.Random(name).randbytes(4 * MiB))
    sw = SeaweedServer(tmp_path / "sw").start()
    try:
        sw.create_bucket("stall")
        p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), "s3://stall/m", endpoint=sw.endpoint)
        timeout = 2.0
        m = mount_factory("s3://stall/m", sw.endpoint, "--read-timeout", str(timeout))
        os.killpg(sw.proc.pid, signal.SIGSTOP)  # the store stalls: connections hang
        try:
            readers = {
                "cat": ["cat", str(m.path / "a")],
                "mmap": [os.sys.executable, "-c", MMAP_READ, str(m.path / "b"), str(MiB + 5)],
                "dd-direct": ["dd", f"if={m.path / 'c'}", "of=/dev/null", "bs=1M", "count=1",
                              "iflag=direct"],
            }
            took = {}
            for name, cmd in readers.items():
                t0 = time.monotonic()
                r = subprocess.run(cmd, capture_output=True, timeout=60)
                took[name] = time.monotonic() - t0
                assert r.returncode != 0, (name, r)
            assert all(t < timeout + 1.0 for t in took.values()), took
        finally:
            os.killpg(sw.proc.pid, signal.SIGCONT)
        assert m.alive()
    finally:
        sw.stop()
