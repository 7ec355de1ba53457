"""The control socket's `fill` session on a real mount (SeaweedFS on loopback, real FUSE):
the daemon writes file bytes into a client's sealed memfd."""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import random
import socket
import time
import uuid

import pytest

from conftest import needs_fuse, p2pfs_cmd, wait_for
from p2pfs.errors import ConfigError
from p2pfs.fill import FillClient, FillError

pytestmark = needs_fuse
MiB = 1 << 20


def make_model(root):
    rng = random.Random(7)
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(rng.randbytes(9 * MiB + 12345))
    (root / "sub" / "small.txt").write_text("tiny")
    return root


@pytest.fixture(scope="module")
def model(seaweed, tmp_path_factory):
    src = make_model(tmp_path_factory.mktemp("fill-src"))
    url = f"s3://models/fill-{uuid.uuid4().hex[:6]}"
    p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), url, endpoint=seaweed.endpoint)
    return url, src


def partition(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random unaligned pieces covering [0, size)."""
    cuts = sorted({0, size, *(rng.randrange(size) for _ in range(20))})
    return [(a, b - a) for a, b in zip(cuts, cuts[1:])]


def test_fill_whole_file_in_unaligned_pieces_then_from_disk(model, seaweed, mount_factory):
    url, src = model
    want = (src / "weights.bin").read_bytes()
    m = mount_factory(url, seaweed.endpoint)
    path = m.path / "weights.bin"
    with FillClient(path) as fc:
        assert fc.size == len(want) and fc.chunk_size == MiB
        pieces = partition(len(want), random.Random(1))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: fc.fill(*p), pieces))
        assert fc.memory[:] == want
        fc.fill(2 * MiB + 3, MiB, at=10)  # somewhere else in our memory
        assert fc.memory[10:10 + MiB] == want[2 * MiB + 3:3 * MiB + 3]
        with pytest.raises(FillError, match="out of bounds"):
            fc.fill(len(want) - 1, 2)
        fc.fill(0, 16)  # the session survives a refused request
    st = m.status()
    assert st["fill_bytes"] >= len(want) and st["bytes_by_source"]["origin"] >= len(want)
    wait_for(lambda: m.status()["writeback_pending"] == 0, what="write-back")

    disk_before = st["hits"].get("disk", 0)
    origin_before = st["bytes_by_source"]["origin"]
    with FillClient(path) as fc:
        fc.fill(0, fc.size)
        assert fc.memory[:] == want
    st = m.status()
    assert st["bytes_by_source"]["origin"] == origin_before  # nothing fetched again
    assert st["hits"].get("disk", 0) + st["hits"].get("memory", 0) > disk_before


def test_fill_refuses_bad_clients_and_survives_them(model, seaweed, mount_factory, tmp_path):
    url, src = model
    m = mount_factory(url, seaweed.endpoint)
    control = os.getxattr(m.path, "user.p2pfs.control").decode()

    def raw_session(fds: list[int], path: str = "weights.bin") -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(control)
            socket.send_fds(s, [json.dumps({"op": "fill", "path": path}).encode() + b"\n"], fds)
            return json.loads(s.makefile("rb").readline())

    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 16 * MiB)
    try:
        reply = raw_session([unsealed])
        assert not reply["ok"] and "F_SEAL_SHRINK" in reply["error"]
    finally:
        os.close(unsealed)
    reply = raw_session([])
    assert not reply["ok"] and "file descriptor" in reply["error"]
    sealed = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, MiB)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        reply = raw_session([sealed], path="sub")
        assert not reply["ok"] and "not a regular file" in reply["error"]
    finally:
        os.close(sealed)

    with pytest.raises(ConfigError, match="not a regular file"):
        FillClient(m.path / "sub")
    with pytest.raises(ConfigError, match="not on a p2pfs mount"):
        FillClient(src / "weights.bin")

    # A client that asks for the whole file and hangs up at once.
    fc = FillClient(m.path / "weights.bin")
    fc._session.sock.sendall(json.dumps({"id": 0, "offset": 0, "length": fc.size, "at": 0}).encode()
                     + b"\n{not json\n")
    fc.close()
    time.sleep(0.5)
    assert m.alive()
    with FillClient(m.path / "sub" / "small.txt") as fc:
        fc.fill(0, fc.size)
        assert fc.memory[:] == b"tiny"


def test_fill_with_the_store_down_fails_within_the_timeout(tmp_path, mount_factory):
    from p2pfs.seaweed import SeaweedServer

    src = make_model(tmp_path / "src")
    sw = SeaweedServer(tmp_path / "sw").start()
    try:
        sw.create_bucket("filldown")
        p2pfs_cmd("publish", "--chunk-size", "1MiB", str(src), "s3://filldown/m",
                  endpoint=sw.endpoint)
        m = mount_factory("s3://filldown/m", sw.endpoint, "--read-timeout", "2")
        with FillClient(m.path / "weights.bin") as fc:
            sw.stop()
            t0 = time.monotonic()
            with pytest.raises(FillError) as e:
                fc.fill(0, 4 * MiB)
            assert time.monotonic() - t0 < 2 + 4
            assert "cannot connect" in str(e.value) or "within" in str(e.value)
            sw.start()  # same ports, same data: requests work again, same session
            deadline = time.monotonic() + 30
            while True:  # a restarted weed answers 500 until its volumes have registered
                try:
                    fc.fill(0, fc.size)
                    break
                except FillError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert fc.memory[:] == (src / "weights.bin").read_bytes()
        assert m.alive()
    finally:
        sw.stop()


def test_fill_and_fuse_readers_share_fetches(model, seaweed, mount_factory):
    """A fill and plain reads of the same file at the same time: both get the right bytes,
    and every chunk crosses the network once (single-flight across both paths)."""
    url, src = model
    want = (src / "weights.bin").read_bytes()
    m = mount_factory(url, seaweed.endpoint)
    path = m.path / "weights.bin"
    with FillClient(path) as fc, concurrent.futures.ThreadPoolExecutor(4) as pool:
        readers = [pool.submit(path.read_bytes) for _ in range(2)]
        pieces = [(o, min(MiB, fc.size - o)) for o in range(0, fc.size, MiB)]
        list(pool.map(lambda p: fc.fill(*p), pieces))
        assert fc.memory[:] == want
        assert all(r.result() == want for r in readers)
    st = m.status()
    assert st["bytes_by_source"]["origin"] == len(want)
