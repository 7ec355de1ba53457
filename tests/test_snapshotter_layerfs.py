"""snapshotter/_layerfs.py: timed directory probes and DirRemoteLayers over a plain directory.
(A real p2pfs mount whose daemon stops or dies: tests/test_snapshotter_grpc.py.)"""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from snapshotter._errors import Unavailable
from snapshotter._layerfs import DirRemoteLayers, Prober

HEX = "cd" * 32


def test_many_concurrent_probes_that_answer_are_all_fine(tmp_path):
    slow = threading.Event()

    def open_dir(path):  # answers, but only after every probe has started
        slow.wait(1.0)

    prober = Prober(timeout=5.0, max_hung=2, open_dir=open_dir)
    with ThreadPoolExecutor(12) as pool:
        results = [pool.submit(prober.probe, str(tmp_path)) for _ in range(12)]
        time.sleep(0.2)
        slow.set()
        assert [f.result() for f in results] == [None] * 12
    assert prober.hung() == 0


def test_hung_probes_are_bounded_and_recover():
    release = threading.Event()
    prober = Prober(timeout=0.2, max_hung=2, open_dir=lambda path: release.wait())
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="no answer within 0.2s"):
            prober.probe("/mnt/x")
        assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="2 earlier probes"):
        prober.probe("/mnt/x")  # no third thread behind a dead mount: refused at once
    assert time.monotonic() - t0 < 0.1
    release.set()  # the daemon answers again: the hung threads return
    deadline = time.monotonic() + 5
    while prober.hung() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prober.hung() == 0 and prober.probe("/mnt/x") is None


def test_errors_are_returned(tmp_path):
    err = Prober().probe(str(tmp_path / "missing"))
    assert err is not None and err.errno == errno.ENOENT
    (tmp_path / "file").write_text("x")
    assert Prober().probe(str(tmp_path / "file")).errno == errno.ENOTDIR


def test_dir_remote_layers_lookup_and_check(tmp_path):
    layers = DirRemoteLayers(tmp_path)
    cri = {"containerd.io/snapshot/cri.layer-digest": f"sha256:{HEX}"}
    stargz = {"containerd.io/snapshot/remote/stargz.digest": f"sha256:{HEX}"}
    assert layers.lookup(cri) is None  # not converted
    (tmp_path / HEX).mkdir()
    assert layers.lookup(cri) == layers.lookup(stargz) == str(tmp_path / HEX)
    for bad in ({}, {"containerd.io/snapshot/cri.layer-digest": "sha256:../../etc"},
                {"containerd.io/snapshot/cri.layer-digest": f"sha512:{HEX}"},
                {"other": f"sha256:{HEX}"}):
        assert layers.lookup(bad) is None
    layers.check([str(tmp_path / HEX)])
    with pytest.raises(Unavailable, match="No such file"):
        layers.check([str(tmp_path / HEX), str(tmp_path / "gone")])


def test_a_hung_mount_makes_lookup_fall_back_to_a_normal_pull(tmp_path):
    layers = DirRemoteLayers(tmp_path, timeout=0.1)
    release = threading.Event()
    layers.prober = Prober(timeout=0.1, open_dir=lambda path: release.wait())
    try:
        assert layers.lookup({"containerd.io/snapshot/cri.layer-digest": f"sha256:{HEX}"}) is None
    finally:
        release.set()
