"""The snapshotter over its real gRPC socket: a grpc client calls every snapshots.v1 method
with the message classes containerd's proxy client would send, including the remote-layer
flow containerd 1.6 drives, and reads the status codes containerd's errdefs maps. Also
`p2pfs-snapshotter serve` as a process (READY=1, /metrics, SIGTERM) and UNAVAILABLE from
a stopped or killed p2pfs daemon under a remote layer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from snapshotter import _proto as pb
from snapshotter._grpc import serve
from snapshotter._layerfs import DirRemoteLayers
from snapshotter._metadata import REF_LABEL, REMOTE_LABEL
from snapshotter._store import Store
from snapshotter.snapshotter import Snapshotter

from conftest import needs_fuse, p2pfs_cmd

DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
LAYER_HEX = "ab" * 32
C = grpc.StatusCode


class Client:
    """The proxy snapshotter's side: one stub per method over the unix socket."""

    def __init__(self, path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")

    def __getattr__(self, method: str):
        req, resp, stream = pb.RPCS[method]
        make = self.channel.unary_stream if stream else self.channel.unary_unary
        stub = make(pb.method_path(method), request_serializer=pb.message(req).SerializeToString,
                    response_deserializer=pb.message(resp).FromString)

        def call(**fields):
            return stub(pb.message(req)(snapshotter="p2pfs", **fields), timeout=20)
        return call

    def code(self, method: str, **fields) -> grpc.StatusCode:
        try:
            out = getattr(self, method)(**fields)
            if pb.RPCS[method][2]:
                list(out)
        except grpc.RpcError as exc:
            return exc.code()
        return C.OK


@pytest.fixture
def layers(tmp_path):
    d = tmp_path / "layers"
    (d / LAYER_HEX / "bin").mkdir(parents=True)
    (d / LAYER_HEX / "bin" / "sh").write_text("#!")
    return d


@pytest.fixture
def served(tmp_path, layers):
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(layers, timeout=1.0))
    sock = tmp_path / "s.sock"
    server = serve(sn, sock, workers=4)
    client = Client(sock)
    yield sn, client
    client.channel.close()
    server.stop(None).wait()
    sn.store.close()


def _mounts(resp) -> list[tuple[str, str, list[str]]]:
    return [(m.type, m.source, list(m.options)) for m in resp.mounts]


def _infos(client, *filters) -> list:
    return [i for resp in client.List(filters=list(filters)) for i in resp.info]


def test_every_method_over_the_socket(served, tmp_path):
    sn, c = served
    root = tmp_path / "root" / "snapshots"
    m = c.Prepare(key="default/1/extract-1 sha256:a", labels={"x": "1"})
    assert _mounts(m) == [("bind", f"{root}/1/fs", ["rw", "rbind"])]
    assert c.Commit(name="default/2/sha256:a", key="default/1/extract-1 sha256:a",
                    labels={"containerd.io/snapshot.ref": "sha256:a"}) == pb.Empty()
    m = c.Prepare(key="default/3/ctr", parent="default/2/sha256:a")
    assert _mounts(m) == [("overlay", "overlay", [f"workdir={root}/2/work", f"upperdir={root}/2/fs",
                                                  f"lowerdir={root}/1/fs"])]
    assert _mounts(c.Mounts(key="default/3/ctr")) == _mounts(m)
    v = c.View(key="default/4/view", parent="default/2/sha256:a")
    assert _mounts(v) == [("bind", f"{root}/1/fs", ["ro", "rbind"])]

    info = c.Stat(key="default/2/sha256:a").info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "default/2/sha256:a", "", pb.KINDS["COMMITTED"], {"containerd.io/snapshot.ref": "sha256:a"})
    assert info.created_at.ToNanoseconds() > 0 and info.updated_at == info.created_at

    req = pb.Info(name="default/3/ctr", labels={"a": "1", "b": "2"})
    upd = c.Update(info=req, update_mask=pb.FieldMask(paths=["labels.a"])).info
    assert dict(upd.labels) == {"a": "1"} and upd.kind == pb.KINDS["ACTIVE"]
    assert dict(c.Update(info=req).info.labels) == {"a": "1", "b": "2"}  # no mask: all labels

    assert sorted(i.name for i in _infos(c)) == ["default/2/sha256:a", "default/3/ctr", "default/4/view"]
    assert [i.name for i in _infos(c, "kind==view")] == ["default/4/view"]
    assert sorted(i.name for i in _infos(c, "kind==view", "labels.a==1")) == ["default/3/ctr", "default/4/view"]

    (tmp_path / "root/snapshots/2/fs/f").write_bytes(b"x" * 8192)
    u = c.Usage(key="default/3/ctr")
    assert u.inodes == 2 and u.size >= 8192

    assert c.Remove(key="default/4/view") == pb.Empty()
    assert c.Remove(key="default/3/ctr") == pb.Empty()
    (root / "77").mkdir()
    assert c.Cleanup() == pb.Empty()
    assert sorted(p.name for p in root.iterdir()) == ["1"]


def test_list_streams_in_batches(served):
    sn, c = served
    for i in range(250):
        c.Prepare(key=f"default/{i}/k")
    sizes = [len(r.info) for r in c.List()]
    assert sizes == [100, 100, 50]


def test_error_codes(served):
    sn, c = served
    c.Prepare(key="n/1/a")
    c.Commit(name="n/2/base", key="n/1/a")
    c.Prepare(key="n/3/b", parent="n/2/base")
    c.View(key="n/4/v", parent="n/2/base")
    mask = pb.FieldMask
    cases = [
        ("Prepare", dict(key="n/3/b"), C.ALREADY_EXISTS),
        ("Prepare", dict(key="n/5/x", parent="n/9/missing"), C.NOT_FOUND),
        ("Prepare", dict(key="n/5/x", parent="n/3/b"), C.INVALID_ARGUMENT),
        ("Prepare", dict(key=""), C.INVALID_ARGUMENT),
        ("Prepare", dict(key="n/5/x", labels={"k": "v" * 5000}), C.INVALID_ARGUMENT),
        ("View", dict(key="n/2/base"), C.ALREADY_EXISTS),
        ("Mounts", dict(key="n/9/missing"), C.NOT_FOUND),
        ("Mounts", dict(key="n/2/base"), C.FAILED_PRECONDITION),
        ("Commit", dict(name="n/2/base", key="n/3/b"), C.ALREADY_EXISTS),
        ("Commit", dict(name="n/6/c", key="n/4/v"), C.FAILED_PRECONDITION),
        ("Commit", dict(name="n/6/c", key="n/9/missing"), C.NOT_FOUND),
        ("Remove", dict(key="n/2/base"), C.FAILED_PRECONDITION),
        ("Remove", dict(key="n/9/missing"), C.NOT_FOUND),
        ("Stat", dict(key="n/9/missing"), C.NOT_FOUND),
        ("Usage", dict(key="n/9/missing"), C.NOT_FOUND),
        ("Update", dict(info=pb.Info(name="n/3/b", parent="x"), update_mask=mask(paths=["parent"])),
         C.INVALID_ARGUMENT),
        ("Update", dict(info=pb.Info(name="n/9/missing")), C.NOT_FOUND),
        ("List", dict(filters=["kind=="]), C.INVALID_ARGUMENT),
        ("List", dict(filters=['labels."unterminated']), C.INVALID_ARGUMENT),
    ]
    assert [(m, c.code(m, **f)) for m, f, _ in cases] == [(m, code) for m, _, code in cases]
    errors = sn.metrics.registry.get_sample_value
    assert errors("p2pfs_snapshotter_errors_total", {"method": "Prepare", "code": "INVALID_ARGUMENT"}) == 3
    assert errors("p2pfs_snapshotter_errors_total", {"method": "List", "code": "INVALID_ARGUMENT"}) == 2


def test_remote_layer_flow_as_containerd_drives_it(served, layers, tmp_path):
    """Prepare with CRI's labels -> ALREADY_EXISTS; containerd's lookup List finds the target
    under its label and parent; the next layer and the container stack on it."""
    sn, c = served
    c.Prepare(key="k8s.io/1/extract-1 sha256:base")
    c.Commit(name="k8s.io/2/sha256:base", key="k8s.io/1/extract-1 sha256:base")
    labels = {REF_LABEL: "sha256:top", DIGEST_LABEL: f"sha256:{LAYER_HEX}",
              "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/busybox:v1"}
    with pytest.raises(grpc.RpcError) as err:
        c.Prepare(key="k8s.io/3/extract-2 sha256:top", parent="k8s.io/2/sha256:base", labels=labels)
    assert err.value.code() == C.ALREADY_EXISTS
    found = _infos(c, f'labels."containerd.io/snapshot.ref"==sha256:top,parent=="k8s.io/2/sha256:base"')
    assert [(i.name, i.kind, i.parent) for i in found] == [
        ("k8s.io/sha256:top", pb.KINDS["COMMITTED"], "k8s.io/2/sha256:base")]
    assert found[0].labels[REMOTE_LABEL] == str(layers / LAYER_HEX)
    assert c.code("Stat", key="k8s.io/sha256:top") == C.OK
    # a layer that is not converted: normal mounts, containerd unpacks into them
    m = c.Prepare(key="k8s.io/4/extract-3 sha256:more", parent="k8s.io/sha256:top",
                  labels={REF_LABEL: "sha256:more", DIGEST_LABEL: "sha256:" + "0" * 64})
    root = tmp_path / "root" / "snapshots"
    top_id = sn.stat("k8s.io/sha256:top").id
    assert _mounts(m)[0][2][-1] == f"lowerdir={root}/{top_id}/fs:{root}/1/fs"
    assert os.path.realpath(root / str(top_id) / "fs") == str(layers / LAYER_HEX)
    # a base layer too (parent=="" must match an empty parent)
    with pytest.raises(grpc.RpcError):
        c.Prepare(key="k8s.io/5/extract-4 sha256:solo", labels={**labels, REF_LABEL: "sha256:solo"})
    assert [i.name for i in _infos(c, f'labels."{REF_LABEL}"==sha256:solo,parent==""')] == ["k8s.io/sha256:solo"]
    assert _mounts(c.View(key="k8s.io/6/v", parent="k8s.io/sha256:solo")) == [
        ("bind", str(root / str(sn.stat("k8s.io/sha256:solo").id) / "fs"), ["ro", "rbind"])]
    assert c.Usage(key="k8s.io/sha256:top") == pb.UsageResponse(size=0, inodes=0)
    served_count = {s: sn.metrics.registry.get_sample_value("p2pfs_snapshotter_layers_total", {"served": s})
                    for s in ("remote", "local")}
    assert served_count == {"remote": 2, "local": 2}  # base and "more" unpacked, top and solo served


def test_a_failure_of_ours_is_unknown_and_writes_nothing(served, tmp_path):
    sn, c = served
    snapshots = tmp_path / "root" / "snapshots"
    snapshots.rmdir()
    snapshots.write_text("not a directory")  # the dirs cannot be made
    try:
        assert c.code("Prepare", key="n/1/a") == C.UNKNOWN
        assert c.code("Stat", key="n/1/a") == C.NOT_FOUND  # the row was rolled back
    finally:
        snapshots.unlink()
        snapshots.mkdir()
    assert c.code("Prepare", key="n/1/a") == C.OK


def test_mounts_over_a_vanished_remote_layer_is_unavailable(served, layers):
    sn, c = served
    assert c.code("Prepare", key="k8s.io/1/extract-1 sha256:x",
                  labels={REF_LABEL: "sha256:x", DIGEST_LABEL: f"sha256:{LAYER_HEX}"}) == C.ALREADY_EXISTS
    c.Prepare(key="k8s.io/2/ctr", parent="k8s.io/sha256:x")
    (layers / LAYER_HEX / "bin" / "sh").unlink()
    (layers / LAYER_HEX / "bin").rmdir()
    (layers / LAYER_HEX).rmdir()
    assert c.code("Mounts", key="k8s.io/2/ctr") == C.UNAVAILABLE
    assert c.code("Prepare", key="k8s.io/3/ctr2", parent="k8s.io/sha256:x") == C.UNAVAILABLE
    assert c.code("View", key="k8s.io/4/v", parent="k8s.io/sha256:x") == C.UNAVAILABLE
    assert c.code("Stat", key="k8s.io/3/ctr2") == C.NOT_FOUND  # nothing written
    (layers / LAYER_HEX).mkdir()
    assert c.code("Mounts", key="k8s.io/2/ctr") == C.OK


# -- the served process ---------------------------------------------------------------

def test_serve_process_notifies_ready_serves_metrics_and_stops_on_sigterm(tmp_path):
    notify = tmp_path / "notify"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify))
    ns.settimeout(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = tmp_path / "snap.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapshotter.cli", "--json-logs", "serve", "--socket", str(sock), "--root",
         str(tmp_path / "root"), "--metrics-addr", f"127.0.0.1:{port}"],
        env={**os.environ, "NOTIFY_SOCKET": str(notify)}, stderr=subprocess.PIPE, text=True)
    try:
        msg = ns.recv(4096).decode()
        assert msg.startswith("READY=1") and sock.is_socket()
        c = Client(sock)
        c.Prepare(key="default/1/extract-1 sha256:a")
        c.channel.close()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'p2pfs_snapshotter_snapshots{kind="active"} 1.0' in body
        assert 'p2pfs_snapshotter_layers_total{served="local"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert ns.recv(4096).decode() == "STOPPING=1"
        assert not sock.exists()
        assert '"msg": "layer default/1/extract-1 sha256:a pulled normally' in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ns.close()


# -- a real p2pfs mount whose daemon stops answering ----------------------------------

@needs_fuse
@pytest.mark.s3
@pytest.mark.fuse
def test_a_stopped_or_killed_fuse_daemon_means_unavailable_not_a_hang(seaweed, mount_factory, tmp_path):
    src = tmp_path / "layer"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "sh").write_bytes(b"x" * 1000)
    prefix = f"snaplayers{os.getpid()}"
    p2pfs_cmd("publish", str(src), f"s3://models/{prefix}/{LAYER_HEX}", endpoint=seaweed.endpoint)
    m = mount_factory(f"s3://models/{prefix}", seaweed.endpoint)
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(m.path, timeout=1.0))
    server = serve(sn, tmp_path / "s.sock", workers=4)
    c = Client(tmp_path / "s.sock")
    try:
        assert c.code("Prepare", key="k8s.io/1/extract-1 sha256:x",
                      labels={REF_LABEL: "sha256:x", DIGEST_LABEL: f"sha256:{LAYER_HEX}"}) == C.ALREADY_EXISTS
        c.Prepare(key="k8s.io/2/ctr", parent="k8s.io/sha256:x")
        assert c.code("Mounts", key="k8s.io/2/ctr") == C.OK
        os.kill(m.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert c.code("Mounts", key="k8s.io/2/ctr") == C.UNAVAILABLE
            assert time.monotonic() - t0 < 5
        finally:
            os.kill(m.pid, signal.SIGCONT)
        # the hung probe returns once the daemon answers again
        deadline = time.monotonic() + 10
        while c.code("Mounts", key="k8s.io/2/ctr") != C.OK and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.code("Mounts", key="k8s.io/2/ctr") == C.OK
        os.kill(m.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert c.code("Mounts", key="k8s.io/2/ctr") == C.UNAVAILABLE
        assert time.monotonic() - t0 < 5
    finally:
        c.channel.close()
        server.stop(None).wait()
        sn.store.close()


def test_the_socket_path_exists_only_while_it_accepts(tmp_path, layers, monkeypatch):
    """containerd dials a missing path every 10 ms: a path that exists must accept (the
    socket is renamed into place once listening) and is removed before the server stops,
    so a redial finds no file instead of a refusing socket (which means gRPC backoff)."""
    from snapshotter import _grpc

    sock = tmp_path / "s.sock"
    seen: dict[str, bool] = {}
    make_server = grpc.server

    def spying_server(*args, **kwargs):
        server = make_server(*args, **kwargs)
        add, stop = server.add_insecure_port, server.stop

        def add_port(address):
            port = add(address)
            seen["path after bind"] = sock.exists()
            return port

        def stop_server(grace):
            seen["path at stop"] = sock.exists()
            return stop(grace)
        server.add_insecure_port, server.stop = add_port, stop_server
        return server

    monkeypatch.setattr(_grpc.grpc, "server", spying_server)
    # a staging socket left by a snapshotter that died before its rename (a PID not alive)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / ".s.sock.999999999"))
    dead.close()
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(layers, timeout=1.0))
    try:
        server = _grpc.serve(sn, sock, workers=2)
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(sock))  # accepted: it listens
        conn.close()
        _grpc.shutdown(server, sock, None)
        assert seen == {"path after bind": False, "path at stop": False}

        with pytest.raises(FileNotFoundError):
            socket.socket(socket.AF_UNIX).connect(str(sock))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layers", "root"]  # no staging name left
    finally:
        sn.store.close()


def test_a_successors_socket_is_not_removed_by_the_snapshotter_that_leaves(tmp_path, layers):
    from snapshotter import _grpc

    sock = tmp_path / "s.sock"
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(layers, timeout=1.0))
    successor = socket.socket(socket.AF_UNIX)
    try:
        server = _grpc.serve(sn, sock, workers=2)
        sock.unlink()  # a new snapshotter took the path (its socket in place of ours)
        successor.bind(str(sock))
        theirs = os.stat(sock).st_ino
        _grpc.shutdown(server, sock, None)
        assert sock.is_socket() and os.stat(sock).st_ino == theirs
    finally:
        successor.close()
        sn.store.close()
