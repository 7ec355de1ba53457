"""Integration: a layer's start-up list is recorded by the first node that starts from it
lazily, stored next to its manifest, and warmed in the background by the next node from
the first open (real SeaweedFS, `p2pfs image convert-layer`, real FUSE mounts)."""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
import uuid

from conftest import needs_fuse, p2pfs_cmd, wait_for

pytestmark = needs_fuse
KiB = 1024


def write_tar(path, files: dict[str, bytes]):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def layer_tar(tmp_path) -> tuple:
    rng = random.Random(3)
    files = {f"app/mod{i}.py": rng.randbytes(700 * KiB) for i in range(6)}
    files["app/unused.bin"] = rng.randbytes(3000 * KiB)
    return write_tar(tmp_path / "layer.tar", files), files


def converted(seaweed, tmp_path, config: str) -> tuple:
    """The test layer converted under a fresh prefix, and a config file for its mounts:
    (url, layer hex, files, config path)."""
    url = f"s3://models/startup-{uuid.uuid4().hex[:6]}"
    path, files = layer_tar(tmp_path)
    res = json.loads(p2pfs_cmd("image", "convert-layer", str(path), url, "--json",
                               endpoint=seaweed.endpoint).stdout)
    cfg = tmp_path / "p2pfs.toml"
    cfg.write_text(config)
    return url, res["digest"].removeprefix("sha256:"), files, cfg


def test_first_lazy_start_records_and_the_next_node_prefetches(seaweed, mount_factory, tmp_path):
    # Pack read-ahead off: this test is about the list alone (a lazy start's neighbours
    # are fetched by it otherwise: test_pack_readahead_fetches_tar_neighbours).
    url, hex_, files, cfg = converted(seaweed, tmp_path,
                                      "[mount]\nstartup_window = 1.0\n[fetch]\npack_readahead = 0\n")
    started = ["app/mod0.py", "app/mod3.py", "app/mod5.py"]

    first = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    for name in started:
        assert (first.path / hex_ / name).read_bytes() == files[name]
    wait_for(lambda: first.status().get("startup", {}).get("lists_recorded") == 1, timeout=15,
             what="start-up list stored")
    assert first.status()["startup"]["lists_loaded"] == 0

    second = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    with open(second.path / hex_ / started[0], "rb") as f:  # the first open starts the warm-up
        f.read(1)
    chunks = sum(-(-len(files[n]) // (256 * KiB)) for n in started)
    wait_for(lambda: second.status()["startup"].get("chunks_prefetched") == chunks, timeout=15,
             what="start-up list loaded")
    st = second.status()
    assert st["startup"]["lists_loaded"] == 1 and st["startup"]["lists_recorded"] == 0
    wait_for(lambda: second.status()["cache_chunks"] >= chunks, timeout=15, what="list warmed")
    # What was not read at start-up was not fetched: only the listed files' bytes came in.
    origin = second.status()["bytes_by_source"].get("origin", 0)
    assert origin < sum(len(files[n]) for n in started) * 1.1 + 64 * KiB
    for name in started[1:]:  # served from the local cache now, not fetched again
        before = second.status()["bytes_by_source"].get("origin", 0)
        assert (second.path / hex_ / name).read_bytes() == files[name]
        assert second.status()["bytes_by_source"].get("origin", 0) == before
    time.sleep(1.5)  # its window closes: nothing new is recorded over the loaded list
    assert second.status()["startup"]["lists_recorded"] == 0


def test_pack_readahead_fetches_tar_neighbours(seaweed, mount_factory, tmp_path):
    url, hex_, files, cfg = converted(seaweed, tmp_path,
                                      "[mount]\nstartup_window = 0\n[fetch]\npack_readahead = \"2MiB\"\n")
    m = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    assert (m.path / hex_ / "app/mod0.py").read_bytes() == files["app/mod0.py"]
    # mod1 and mod2 follow mod0 in the tar, so in the pack: fetched without being read.
    wait_for(lambda: m.status()["prefetched_chunks"] >= 6, timeout=10, what="neighbours fetched")
    before = m.status()["bytes_by_source"].get("origin", 0)
    assert (m.path / hex_ / "app/mod1.py").read_bytes() == files["app/mod1.py"]
    st = m.status()
    assert st["bytes_by_source"].get("origin", 0) == before  # served from memory
    assert st["bytes_by_source"].get("memory", 0) >= len(files["app/mod1.py"])
    # Far past the window: not fetched.
    assert before < 2 * 700 * KiB + 2 * 1024 * KiB + 64 * KiB


def test_a_layers_small_files_are_cached_in_one_data_file_per_pack(seaweed, mount_factory, tmp_path):
    """Creating a file costs the write-back ~1 ms of CPU on ext4, and a start-up reads
    thousands of small files: a layer's chunks of one pack share one local data file."""
    rng = random.Random(5)
    files = {f"lib/m{i:02d}.py": rng.randbytes(rng.randint(1, 9) * KiB) for i in range(40)}
    tar = write_tar(tmp_path / "small.tar", files)
    url = f"s3://models/small-{uuid.uuid4().hex[:6]}"
    hex_ = json.loads(p2pfs_cmd("image", "convert-layer", str(tar), url,
                                "--json", endpoint=seaweed.endpoint).stdout)["digest"][7:]
    cfg = tmp_path / "p2pfs.toml"
    cfg.write_text("[mount]\nstartup_window = 0\n[fetch]\npack_readahead = 0\n"
                   "[cache]\nwriteback_idle_cpus = 0\n")
    cache = tmp_path / "cache-small"
    m = mount_factory(url, seaweed.endpoint, "--config", str(cfg), cache_dir=cache)
    for name, data in files.items():
        assert (m.path / hex_ / name).read_bytes() == data
    wait_for(lambda: m.status()["writeback_done"] >= len(files), timeout=15, what="write-back")
    data_files = [p for p in (cache / "files").rglob("*") if p.is_file()]
    assert len(data_files) == 1  # 40 files, one pack
    m.stop()
    # The next daemon on this cache serves every file from that one data file.
    again = mount_factory(url, seaweed.endpoint, "--config", str(cfg), cache_dir=cache)
    for name, data in files.items():
        assert (again.path / hex_ / name).read_bytes() == data
    st = again.status()
    assert st["bytes_by_source"].get("origin", 0) == 0
    assert st["bytes_by_source"].get("disk", 0) == sum(map(len, files.values()))


def test_a_recorded_erofs_start_lists_every_read_with_the_page_push_on(seaweed, mount_factory,
                                                                      tmp_path):
    """The page push stores the pack read-ahead's bytes into an EROFS blob's page cache, so
    the kernel never asks for them: while a layer's start-up reads are recorded nothing is
    pushed, or the list (every later node's prefetch) would miss the reads it spared."""
    from test_image_convert import erofs_layer, needs_erofs

    needs_erofs()
    url, hex_, files, cfg = converted(
        seaweed, tmp_path, "[mount]\nstartup_window = 1.0\nerofs_page_push = true\n"
        "[fetch]\npack_readahead = \"4MiB\"\n")
    started = ["app/mod0.py", "app/mod1.py", "app/mod2.py", "app/mod3.py"]
    first = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    with erofs_layer(first.path, hex_, tmp_path / "erofs") as root:
        for name in started:
            assert (root / name).read_bytes() == files[name]
        wait_for(lambda: first.status().get("startup", {}).get("lists_recorded") == 1,
                 timeout=15, what="start-up list stored")
    assert first.status()["page_push"]["pushes"] == 0
    second = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    with erofs_layer(second.path, hex_, tmp_path / "erofs2") as root:
        want = sum(-(-len(files[n]) // (256 * KiB)) for n in started)
        wait_for(lambda: second.status()["startup"].get("chunks_prefetched", 0) >= want,
                 timeout=15, what="the whole start-up list loaded")
        for name in started:
            assert (root / name).read_bytes() == files[name]


def test_a_recorded_erofs_start_lists_the_files_read_and_not_their_blob_neighbours(
        seaweed, mount_factory, tmp_path):
    """EROFS reads a layer's files from one blob in which they lie back to back: the kernel's
    read-ahead on that blob runs past the end of a file into the next ones, which nobody
    opened. The recording node bypasses the blob's page cache, so its list holds only what
    EROFS asked for, and a later node prefetches exactly the files read."""
    from test_image_convert import erofs_layer, needs_erofs

    needs_erofs()
    # A 3 s window ends on a 2 s pause in its reads: the reads below have 2 s between them to
    # spare, and the 2.5 s before the first one closed the recording while it began at the open.
    url, hex_, files, cfg = converted(
        seaweed, tmp_path, "[mount]\nstartup_window = 3.0\n[fetch]\npack_readahead = 0\n")
    started = ["app/mod0.py", "app/mod3.py"]  # mod1 and mod4 follow them in the blob
    first = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    with erofs_layer(first.path, hex_, tmp_path / "erofs") as root:
        time.sleep(2.5)  # mounted well before the container reads: the window starts at a read
        for name in started:
            assert (root / name).read_bytes() == files[name]
        wait_for(lambda: first.status().get("startup", {}).get("lists_recorded") == 1,
                 timeout=15, what="start-up list stored")
        again = {name: (root / name).read_bytes() for name in files}  # served after the window
        assert again == files
    assert first.status()["page_push"]["pushes"] == 0  # its blob bypassed the page cache

    second = mount_factory(url, seaweed.endpoint, "--config", str(cfg))
    # The snapshotter's first lookup, before it mounts: the list is fetched from here on,
    # while the image is built, and waits for the blob's open to be pushed.
    assert (second.path / ".erofs" / f"{hex_}.img").stat().st_size > 0
    want = sum(-(-len(files[n]) // (256 * KiB)) for n in started)
    wait_for(lambda: second.status()["startup"].get("chunks_prefetched", 0) >= want,
             timeout=15, what="the start-up list loaded")
    wait_for(lambda: second.status()["cache_chunks"] >= want, timeout=15, what="list fetched")
    time.sleep(0.5)
    st = second.status()
    assert st["startup"]["chunks_prefetched"] == want and st["page_push"]["pushes"] == 0
    with erofs_layer(second.path, hex_, tmp_path / "erofs2") as root:
        # A listed layer's blob goes through its page cache: the list is pushed there at
        # the open (what came before it, parked), and nothing is fetched again.
        wait_for(lambda: second.status()["page_push"]["pushed_bytes"]
                 >= sum(len(files[n]) for n in started), timeout=15, what="list pushed")
        origin = second.status()["bytes_by_source"].get("origin", 0)
        for name in started:
            assert (root / name).read_bytes() == files[name]
        assert second.status()["bytes_by_source"].get("origin", 0) == origin
