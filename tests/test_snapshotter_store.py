"""The sqlite store (snapshotter/_store.py) and the service over it: the same answers as the
in-memory reference table, every snapshot kept across a restart (and a kill -9 mid-write),
dirs created with their rows and garbage-collected with them, real usage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter import _metadata as core
from snapshotter._errors import FailedPrecondition, NotFound, ServedRemotely, SnapshotterError
from snapshotter._layerfs import DirRemoteLayers
from snapshotter._metadata import Kind, MemoryTable, ServeRemote
from snapshotter._store import Store, disk_usage
from snapshotter.snapshotter import Snapshotter

REF = core.REF_LABEL
DIGEST = "containerd.io/snapshot/cri.layer-digest"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "root")
    yield s
    s.close()


def _rows(table) -> list:
    return [(s.id, s.key, s.kind, s.parent, dict(s.labels), s.created_ns, s.remote, s.size)
            for s in (table.all() if isinstance(table, Store) else table)]


# -- the same answers as the reference table ------------------------------------------

OPS = st.lists(st.tuples(
    st.sampled_from(["prepare", "view", "commit", "remove", "update", "layer"]),
    st.sampled_from(["n/1/a", "n/2/b", "n/3/c", "n/4/sha256:x", "n/5/sha256:y", ""]),
    st.sampled_from(["", "n/4/sha256:x", "n/5/sha256:y", "n/sha256:r", "n/1/a"]),
    st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["", "1", "2"]), max_size=2)),
    max_size=25)


def _apply(table, tx, op, key, other, labels, now):
    """One operation through the rules; the error class name or "ok"."""
    try:
        if op in ("prepare", "view", "layer"):
            kind = Kind.VIEW if op == "view" else Kind.ACTIVE
            if op == "layer":
                labels = {**labels, REF: "sha256:r"}
            plan = core.prepare(tx, kind=kind, key=key, parent=other, labels=labels, now_ns=now,
                                remote_lower="/layers/r" if op == "layer" else None)
            snap = plan.snapshot if isinstance(plan, ServeRemote) else plan
            if snap is not None:
                tx.insert(snap)
        elif op == "commit":
            old, new = core.commit(tx, name=other, key=key, labels=labels, now_ns=now)
            tx.replace(old.key, new)
        elif op == "remove":
            core.remove(tx, key)
            tx.delete(key)
        else:
            tx.replace(key, core.update(tx, key=key, labels=labels, paths=["labels.a"], now_ns=now))
    except SnapshotterError as exc:
        return type(exc).__name__
    return "ok"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_sqlite_answers_like_the_reference_table(tmp_path_factory, ops):
    root = tmp_path_factory.mktemp("st")
    store, ref = Store(root), MemoryTable()
    try:
        for now, (op, key, other, labels) in enumerate(ops):
            with store.transaction() as tx:
                got = _apply(store, tx, op, key, other, labels, now)
            assert got == _apply(ref, ref, op, key, other, labels, now), (op, key, other)
        assert _rows(store) == _rows(ref)
        on_disk = sorted(int(p.name) for p in store.snapshots_dir.iterdir())
        assert on_disk == sorted(s.id for s in ref)
        store.close()
        store = Store(root)  # reopened: the same rows
        assert _rows(store) == _rows(ref)
    finally:
        store.close()


# -- restart, crash, garbage collection ----------------------------------------------

def test_a_restarted_snapshotter_keeps_every_snapshot(tmp_path):
    layers = tmp_path / "layers"
    (layers / ("d" * 64)).mkdir(parents=True)
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(layers), clock=lambda: 42)
    sn.prepare("k8s.io/1/extract-1 sha256:base")
    (sn.store.fs_dir(sn.stat("k8s.io/1/extract-1 sha256:base")) / "hello").write_text("hi")
    sn.commit("k8s.io/2/sha256:base", "k8s.io/1/extract-1 sha256:base", {"l": "1"})
    with pytest.raises(ServedRemotely):
        sn.prepare("k8s.io/3/extract-2 sha256:top", "k8s.io/2/sha256:base",
                   {REF: "sha256:top", DIGEST: "sha256:" + "d" * 64})
    mounts = sn.prepare("k8s.io/4/ctr", "k8s.io/sha256:top")
    sn.view("k8s.io/5/view", "k8s.io/2/sha256:base")
    before = [(s.key, s.kind, s.parent, dict(s.labels), s.remote, s.id) for s in sn.list()]
    sn.store.close()

    sn2 = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(layers))
    try:
        assert [(s.key, s.kind, s.parent, dict(s.labels), s.remote, s.id) for s in sn2.list()] == before
        assert sn2.mounts("k8s.io/4/ctr") == mounts
        base = sn2.stat("k8s.io/2/sha256:base")
        assert (sn2.store.fs_dir(base) / "hello").read_text() == "hi"
        assert os.readlink(sn2.store.fs_dir(sn2.stat("k8s.io/sha256:top"))) == str(layers / ("d" * 64))
        assert sn2.stat("k8s.io/sha256:top").created_ns == 42
    finally:
        sn2.store.close()


def test_kill_mid_transaction_leaves_no_half_snapshot(tmp_path):
    """A process killed after a row and its dirs were written but before the commit: the row
    is gone after reopening and the dirs are swept."""
    root = tmp_path / "root"
    Store(root).close()
    script = textwrap.dedent(f"""
        import os, signal
        from snapshotter._store import Store
        from snapshotter._metadata import Snapshot, Kind
        s = Store({str(root)!r})
        with s.transaction() as tx:
            snap = tx.insert(Snapshot(key="n/1/half", kind=Kind.ACTIVE))
            assert s.fs_dir(snap).is_dir()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, timeout=60)
    assert r.returncode == -9
    assert (root / "snapshots" / "1").is_dir()  # the dirs were made, the row not committed
    s = Store(root)
    try:
        assert s.all() == [] and list(s.snapshots_dir.iterdir()) == []
        with s.transaction() as tx:  # the id is free again and its dirs are fresh
            snap = tx.insert(core.Snapshot(key="n/2/new", kind=Kind.ACTIVE))
        assert list(s.fs_dir(snap).iterdir()) == []
    finally:
        s.close()


def test_an_error_inside_a_transaction_rolls_back_rows_and_dirs(store):
    with store.transaction() as tx:
        kept = tx.insert(core.Snapshot(key="keep", kind=Kind.ACTIVE))
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.insert(core.Snapshot(key="new", kind=Kind.ACTIVE))
            tx.delete("keep")
            raise RuntimeError("boom")
    assert [s.key for s in store.all()] == ["keep"]
    assert sorted(p.name for p in store.snapshots_dir.iterdir()) == [str(kept.id)]
    assert list(store.trash_dir.iterdir()) == []


def test_remove_and_cleanup_reclaim_the_dirs(tmp_path):
    sn = Snapshotter(Store(tmp_path / "root"))
    try:
        sn.prepare("n/1/a")
        (sn.store.fs_dir(sn.stat("n/1/a")) / "f").write_bytes(b"x" * 10000)
        sn.commit("n/2/base", "n/1/a")
        sn.prepare("n/3/c", "n/2/base")
        with pytest.raises(FailedPrecondition):
            sn.remove("n/2/base")
        sn.remove("n/3/c")
        sn.remove("n/2/base")
        with pytest.raises(NotFound):
            sn.stat("n/2/base")
        assert list(sn.store.snapshots_dir.iterdir()) == []
        # dirs nobody owns (a crash, an older version): Cleanup sweeps them
        (sn.store.snapshots_dir / "999" / "fs").mkdir(parents=True)
        (sn.store.snapshots_dir / "junk").mkdir()
        (sn.store.trash_dir / "7-leftover").mkdir()
        sn.prepare("n/4/d")
        sn.cleanup()
        assert [p.name for p in sn.store.snapshots_dir.iterdir()] == [str(sn.stat("n/4/d").id)]
        assert list(sn.store.trash_dir.iterdir()) == []
    finally:
        sn.store.close()


def test_remove_of_a_remote_layer_keeps_the_layer_on_the_mount(tmp_path):
    layer = tmp_path / "layers" / ("e" * 64)
    (layer / "bin").mkdir(parents=True)
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(tmp_path / "layers"))
    try:
        with pytest.raises(ServedRemotely):
            sn.prepare("n/1/extract-1 sha256:c", "", {REF: "sha256:c", DIGEST: "sha256:" + "e" * 64})
        sn.remove("n/sha256:c")
        assert (layer / "bin").is_dir()
        assert list(sn.store.snapshots_dir.iterdir()) == []
    finally:
        sn.store.close()


# -- usage ---------------------------------------------------------------------------

def test_usage_is_measured(tmp_path):
    sn = Snapshotter(Store(tmp_path / "root"))
    try:
        sn.prepare("n/1/a")
        up = sn.store.fs_dir(sn.stat("n/1/a"))
        empty = sn.usage("n/1/a")
        assert empty == disk_usage(up) and empty[1] == 1  # the upper dir itself
        (up / "big").write_bytes(os.urandom(1 << 20))
        os.link(up / "big", up / "same")  # a hard link counts once
        (up / "d").mkdir()
        (up / "d" / "small").write_bytes(b"x")
        size, inodes = sn.usage("n/1/a")
        assert inodes == 4 and (1 << 20) <= size - empty[0] < (1 << 20) + 64 * 1024
        sn.commit("n/2/c", "n/1/a")
        assert sn.usage("n/2/c") == (size, inodes)  # recorded at commit
        (sn.store.fs_dir(sn.stat("n/2/c")) / "more").write_bytes(b"x" * 100000)
        assert sn.usage("n/2/c") == (size, inodes)  # committed: not re-measured
    finally:
        sn.store.close()


def test_counts_by_kind(store):
    with store.transaction() as tx:
        tx.insert(core.Snapshot(key="a", kind=Kind.ACTIVE))
        tx.insert(core.Snapshot(key="b", kind=Kind.ACTIVE))
        tx.insert(core.Snapshot(key="c", kind=Kind.COMMITTED))
    assert store.counts() == {Kind.ACTIVE: 2, Kind.COMMITTED: 1, Kind.VIEW: 0}


class RecordingLayers(DirRemoteLayers):
    """DirRemoteLayers that records the hook calls (the interface's fake, not a mock of ours)."""

    def __init__(self, mount):
        super().__init__(mount)
        self.calls = []

    def committed(self, name, labels, upper_dir):
        self.calls.append(("committed", name, dict(labels), upper_dir))

    def prepared(self, key, lower_dirs):
        self.calls.append(("prepared", key, list(lower_dirs)))


def test_hooks_see_layer_commits_and_prepares_over_remote_lowers(tmp_path):
    (tmp_path / "layers" / ("f" * 64)).mkdir(parents=True)
    remote = RecordingLayers(tmp_path / "layers")
    sn = Snapshotter(Store(tmp_path / "root"), remote)
    try:
        # a normally unpacked layer: committed() with the Prepare's labels (the digest) merged in
        sn.prepare("k8s.io/1/extract-1 sha256:a", "", {REF: "sha256:a", DIGEST: "sha256:" + "0" * 64})
        sn.commit("k8s.io/2/sha256:a", "k8s.io/1/extract-1 sha256:a", {REF: "sha256:a"})
        upper = str(sn.store.fs_dir(sn.stat("k8s.io/2/sha256:a")))
        assert remote.calls == [("committed", "k8s.io/2/sha256:a",
                                 {REF: "sha256:a", DIGEST: "sha256:" + "0" * 64}, upper)]
        with pytest.raises(ServedRemotely):
            sn.prepare("k8s.io/3/extract-2 sha256:b", "k8s.io/2/sha256:a",
                       {REF: "sha256:b", DIGEST: "sha256:" + "f" * 64})
        remote.calls.clear()
        # a container's rootfs over the remote layer: prepared() names the remote lower
        sn.prepare("k8s.io/4/ctr", "k8s.io/sha256:b")
        sn.view("k8s.io/5/view", "k8s.io/sha256:b")  # views are not prepared
        sn.prepare("k8s.io/6/plain")
        sn.commit("k8s.io/7/not-a-layer", "k8s.io/6/plain")  # not a layer: no hook
        assert remote.calls == [("prepared", "k8s.io/4/ctr", [str(tmp_path / "layers" / ("f" * 64))])]
    finally:
        sn.store.close()


@pytest.mark.parametrize("labels, why", [
    ({}, "no snapshot labels"),
    ({REF: "sha256:c"}, "disable_snapshot_annotations = false"),
    ({REF: "sha256:c", DIGEST: "sha256:" + "1" * 64}, "not converted"),
])
def test_a_layer_pulled_normally_says_why(tmp_path, caplog, labels, why):
    sn = Snapshotter(Store(tmp_path / "root"), DirRemoteLayers(tmp_path))
    try:
        with caplog.at_level("INFO", logger="snapshotter"):
            sn.prepare("k8s.io/1/extract-1 sha256:c", "", labels)
        assert any("pulled normally" in r.message and why in r.message for r in caplog.records)
        assert sn.metrics.registry.get_sample_value("p2pfs_snapshotter_layers_total", {"served": "local"}) == 1
    finally:
        sn.store.close()


def test_concurrent_calls_keep_rows_and_dirs_consistent(tmp_path):
    """grpc calls arrive on many threads: whatever interleaving, only our errors, every row
    has its dirs, every dir its row, and every parent is committed."""
    import random
    import threading

    sn = Snapshotter(Store(tmp_path / "root"))
    sn.prepare("n/0/base-key")
    sn.commit("n/0/base", "n/0/base-key")
    failures: list[BaseException] = []
    done: list[int] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        names = ["n/0/base"] + [f"n/c/{i}" for i in range(6)]
        for _ in range(60):
            key = f"n/k/{rnd.randrange(8)}"
            try:
                op = rnd.randrange(5)
                if op == 0:
                    sn.prepare(key, rnd.choice(names))
                elif op == 1:
                    sn.commit(rnd.choice(names[1:]), key)
                elif op == 2:  # views too, or each of the 8 view keys could succeed only once
                    sn.remove(rnd.choice([key, key + "v"] + names[1:]))
                elif op == 3:
                    sn.view(key + "v", rnd.choice(names))
                else:
                    sn.usage(key)
                done.append(op)
            except SnapshotterError:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert failures == []
        # every kind of call succeeded, more than a few times (a commit needs its key active and
        # its name free, it is the rarest: 8-27 of ~160 tries over 200 interleavings here)
        assert all(done.count(op) > 3 for op in range(5)), [done.count(op) for op in range(5)]
        rows = sn.store.all()
        assert sorted(int(p.name) for p in sn.store.snapshots_dir.iterdir()) == sorted(s.id for s in rows)
        by_key = {s.key: s for s in rows}
        for s in rows:
            assert sn.store.fs_dir(s).is_dir()
            assert not s.parent or by_key[s.parent].kind == Kind.COMMITTED
        assert list(sn.store.trash_dir.iterdir()) == []
    finally:
        sn.store.close()
