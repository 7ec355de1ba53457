"""The CLI against real mounts: paths resolved at startup, the metrics listener bound
before the mount (prometheus_client), global options after the command, and the status
table. A real SeaweedFS and real FUSE daemons (tests/conftest.py)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import needs_fuse, p2pfs_cmd
from p2pfs.tune import mount_entry

pytestmark = needs_fuse
MiB = 1 << 20


@pytest.fixture(scope="module")
def model(seaweed, tmp_path_factory):
    """A small checkpoint, published with --endpoint-url after the command (regression:
    'No such option: --endpoint-url'); no AWS_ENDPOINT_URL in the environment."""
    import torch
    from safetensors.torch import save_file

    src = tmp_path_factory.mktemp("src")
    g = torch.Generator().manual_seed(1)
    save_file({"w": torch.randn(512, 1024, generator=g), "b": torch.randn(1000, generator=g)},
              src / "model.safetensors")
    (src / "config.json").write_text('{"hidden": 1024}')
    url = f"s3://models/cli-{uuid.uuid4().hex[:6]}/m"
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    r = subprocess.run([sys.executable, "-m", "p2pfs", "publish", str(src), url, "--chunk-size",
                        "1MiB", "--endpoint-url", seaweed.endpoint, "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {"url": url, "src": src}


def _in(cwd: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pfs", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_relative_cache_dir_serves_clients_in_any_directory(model, seaweed, mount_factory,
                                                            tmp_path, monkeypatch):
    """Regression: the control socket's xattr held 'rel-cache/control.sock', so status,
    prefetch and gpuload's fill failed from every other directory."""
    monkeypatch.chdir(tmp_path)  # the mount command (a subprocess) starts here
    m = mount_factory(model["url"], seaweed.endpoint, cache_dir=Path("rel-cache"))
    cache = tmp_path / "rel-cache"
    ctl = os.getxattr(m.path, "user.p2pfs.control").decode()
    assert ctl == str(cache / "control.sock")
    assert m.info["control"] == ctl
    assert os.readlink(f"/proc/{m.pid}/cwd") == "/"  # the daemon holds no directory busy
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in ("/", str(elsewhere)):
        r = _in(cwd, "status", str(m.path), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cache_dir"] == str(cache)
    r = _in(str(elsewhere), "prefetch", str(m.path / "config.json"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["ok"] is True, r.stderr
    # gpuload's fill goes through the same socket.
    code = ("import gpuload, torch; from safetensors.torch import load_file; import sys\n"
            f"a = gpuload.load({str(m.path / 'model.safetensors')!r}, device='cpu')\n"
            f"b = load_file({str(model['src'] / 'model.safetensors')!r})\n"
            "sys.exit(0 if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else 3)")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(elsewhere), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert m.status()["fill_requests"] > 0
    assert (cache / "p2pfs.log").exists()


def _lock_is_free(cache: Path) -> bool:
    fd = os.open(cache / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("case", ["port in use", "address not local"])
def test_bad_metrics_address_fails_in_one_line_before_mounting(model, seaweed, tmp_path, case):
    """Regression: the listener was bound after the mount: a traceback, and the mount made."""
    mp, cache = tmp_path / "mnt", tmp_path / "cache"
    mp.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        addr, want = {
            "port in use": (f"127.0.0.1:{busy.getsockname()[1]}", "Address already in use"),
            "address not local": ("192.0.2.1:9464", "Cannot assign requested address"),
        }[case]
        try:
            r = p2pfs_cmd("mount", model["url"], str(mp), "--cache-dir", str(cache),
                          "--metrics-addr", addr, endpoint=seaweed.endpoint, check=False)
            assert r.returncode == 1, r.stderr
            assert r.stderr.startswith("p2pfs: error: cannot serve metrics at")
            assert want in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
            assert mount_entry(mp) is None
            assert _lock_is_free(cache)  # no daemon left behind
            log = (cache / "p2pfs.log").read_text()
            assert "Traceback" not in log and "mounted" not in log
        finally:
            if mount_entry(mp) is not None:
                p2pfs_cmd("unmount", "--lazy", str(mp), check=False)


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_and_status_of_a_real_mount(model, seaweed, mount_factory):
    m = mount_factory(model["url"], seaweed.endpoint, "--metrics-addr", "127.0.0.1:0")
    url = m.info["metrics_url"]
    assert url.startswith("http://127.0.0.1:") and not url.startswith("http://127.0.0.1:0/")
    data = (m.path / "model.safetensors").read_bytes()
    assert data == (model["src"] / "model.safetensors").read_bytes()
    # A scraper that connects and says nothing holds no one else up.
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port)):
        t0 = time.monotonic()
        got = _scrape(url)
        assert time.monotonic() - t0 < 3
    s = m.status()
    assert s["metrics_url"] == url
    documented = ["p2pfs_reads_total", "p2pfs_read_bytes_total", "p2pfs_chunk_hits_total",
                  "p2pfs_chunk_misses_total", "p2pfs_bytes_total", "p2pfs_origin_requests_total",
                  "p2pfs_writeback_total", "p2pfs_writeback_dropped_total",
                  "p2pfs_fill_requests_total", "p2pfs_fill_bytes_total", "p2pfs_fetch_seconds_bucket",
                  "p2pfs_fetch_seconds_count", "p2pfs_fetch_seconds_sum", "p2pfs_read_seconds_count",
                  "p2pfs_cache_used_bytes", "p2pfs_cache_budget_bytes", "p2pfs_cache_chunks",
                  "p2pfs_cache_evicted_chunks", "p2pfs_cache_corrupt_dropped",
                  "p2pfs_memory_cache_bytes", "p2pfs_in_flight_chunks", "p2pfs_writeback_pending"]
    assert [n for n in documented if n not in got] == []
    assert got["p2pfs_bytes_total"][(("source", "origin"),)] >= len(data)
    assert got["p2pfs_fetch_seconds_count"][()] == got["p2pfs_origin_requests_total"][()] > 0
    assert got["p2pfs_fetch_seconds_bucket"][(("le", "+Inf"),)] == got["p2pfs_fetch_seconds_count"][()]
    assert got["p2pfs_reads_total"][()] > 0
    # The control socket's `metrics` op serves the same exposition.
    ctl = os.getxattr(m.path, "user.p2pfs.control").decode()
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(ctl)
        c.sendall(b'{"op": "metrics"}\n')
        text = json.loads(c.makefile("rb").readline())["text"]
    assert "# TYPE p2pfs_fetch_seconds histogram" in text and 'p2pfs_bytes_total{source="origin"}' in text
    # The human status: aligned sections, no Python reprs (regression: hits {'memory': 184}).
    human = p2pfs_cmd("status", str(m.path)).stdout
    lines = human.splitlines()
    for section in ("mount", "cache", "chunks by source", "origin", "errors", "write-back"):
        assert section in lines, human
    assert "{" not in human and "'" not in human
    assert f"metrics     {url}" in human and "hit ratio" in human


def test_a_cache_dir_too_long_for_the_control_socket_is_refused_before_mounting(tmp_path):
    from conftest import p2pfs_cmd

    deep = tmp_path / ("d" * 100)
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = p2pfs_cmd("mount", "s3://models/x", str(mp), "--cache-dir", str(deep), check=False,
                  endpoint="http://127.0.0.1:9")
    assert r.returncode == 1 and "too long a path for the control socket" in r.stderr
    assert not os.path.ismount(mp)
