"""The snapshotter service: containerd's rules (`_metadata`) over the sqlite store (`_store`)
and the remote layers (`_layerfs`). Blocking methods, safe to call from grpc's threads.

Order inside each call: read what the call depends on, then do anything slow (probe a
remote lower, walk an upper dir) with no lock held, then decide and write in one short
transaction. A Prepare or View over a remote lower that does not answer fails with
Unavailable before anything is written; so does Mounts.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from . import _metadata as core
from ._erofs import ErofsLowers
from ._errors import FailedPrecondition, ServedRemotely, Unavailable
from ._filters import compile_filters, snapshot_adaptor
from ._layerfs import NoRemoteLayers, RemoteLayers
from ._metadata import Kind, Mount, Snapshot
from ._store import Store, disk_usage

log = logging.getLogger("snapshotter")


class Metrics:
    """The snapshotter's Prometheus metrics, in a registry of their own."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.layers = Counter("p2pfs_snapshotter_layers", "Layer Prepares by where the layer was served from",
                              ["served"], registry=self.registry)
        self.errors = Counter("p2pfs_snapshotter_errors", "Calls answered with an error, by method and code",
                              ["method", "code"], registry=self.registry)
        self.unavailable = Counter("p2pfs_snapshotter_unavailable",
                                   "Calls refused because a remote lower did not answer",
                                   registry=self.registry)
        for served in ("remote", "local"):
            self.layers.labels(served=served)
        self._store = store
        self.registry.register(self)

    def collect(self):
        g = GaugeMetricFamily("p2pfs_snapshotter_snapshots", "Snapshots by kind", labels=["kind"])
        for kind, n in self._store.counts().items():
            g.add_metric([kind.filter_name], n)
        yield g


class Snapshotter:
    """containerd's snapshots.v1 operations. Keys and names are as containerd's metadata
    store sends them (`<ns>/<seq>/<key>`)."""

    def __init__(self, store: Store, remote: RemoteLayers | None = None, *,
                 clock: Callable[[], int] = time.time_ns, erofs: ErofsLowers | None = None) -> None:
        self.store = store
        self.remote = remote or NoRemoteLayers()
        self.clock = clock
        self.metrics = Metrics(store)
        #: Remote layers mounted as EROFS (None: every remote lowerdir is its FUSE dir).
        self.erofs = erofs
        if erofs is not None:
            erofs.sweep(s.remote for s in store.all() if s.remote)

    # -- creating ---------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
                ) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels or {})

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
             ) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels or {})

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        layer = kind == Kind.ACTIVE and core.is_layer(key, labels)
        lower = self.remote.lookup(labels) if layer and core.REF_LABEL in labels else None
        with self.store.transaction() as tx:
            parents = core.chain(tx, Snapshot(key="", kind=kind, parent=parent)) if parent else []
        self._check(parents)
        with self.store.transaction() as tx:
            plan = core.prepare(tx, kind=kind, key=key, parent=parent, labels=labels,
                                now_ns=self.clock(), remote_lower=lower)
            if isinstance(plan, core.ServeRemote):
                if plan.snapshot is not None:
                    tx.insert(plan.snapshot)
            else:
                snap = tx.insert(plan)
        if isinstance(plan, core.ServeRemote):
            self.metrics.layers.labels(served="remote").inc()
            log.info("layer %s served remotely from %s", plan.name, lower)
            if self.erofs is not None and lower is not None:
                self.erofs.warm(lower)
            raise ServedRemotely(f"target snapshot {plan.name!r}: served from the p2pfs mount")
        if layer:
            self.metrics.layers.labels(served="local").inc()
            log.info("layer %s pulled normally: %s", key, self._why_local(key, labels, lower))
        remote_lowers = [p.remote for p in parents if p.remote]
        if remote_lowers and kind == Kind.ACTIVE:
            self.remote.prepared(key, remote_lowers)
        return self._mounts(snap, parents, self._lowers(parents))

    @staticmethod
    def _why_local(key: str, labels: Mapping[str, str], lower: str | None) -> str:
        if core.REF_LABEL not in labels:
            return ("no snapshot labels (a client like `ctr image pull`; pull through CRI, "
                    "e.g. `p2pfs-snapshotter pull`)")
        if not any(k.startswith("containerd.io/snapshot/") for k in labels):
            return ("no layer digest label (set disable_snapshot_annotations = false in "
                    "containerd's CRI config)")
        if lower is None:
            return "its layer is not converted (or the layers mount did not answer)"
        return f"{core.remote_name(key, labels[core.REF_LABEL])} is held by another snapshot"

    def _check(self, parents: Sequence[Snapshot]) -> None:
        remote_lowers = [p.remote for p in parents if p.remote]
        if remote_lowers:
            try:
                self.remote.check(remote_lowers)
            except Unavailable:
                self.metrics.unavailable.inc()
                raise

    def _lowers(self, parents: Sequence[Snapshot]) -> dict[str, str]:
        """The EROFS mount to use for each remote lower that has one, mounted now if need
        be (only for mounts handed out: a layer Prepare served remotely needs none)."""
        if self.erofs is None:
            return {}
        found = {r: self.erofs.lower(r) for r in dict.fromkeys(p.remote for p in parents if p.remote)}
        return {r: path for r, path in found.items() if path is not None}

    def _mounts(self, snap: Snapshot, parents: Sequence[Snapshot],
                lowers: Mapping[str, str]) -> list[Mount]:
        return core.mounts(snap, fs_dir=str(self.store.fs_dir(snap)),
                           work_dir=str(self.store.work_dir(snap)),
                           lower_dirs=[lowers.get(p.remote) or str(self.store.fs_dir(p))
                                       for p in parents])

    def mounts(self, key: str) -> list[Mount]:
        with self.store.transaction() as tx:
            snap = core.stat(tx, key)
            parents = core.chain(tx, snap)
        if snap.kind == Kind.COMMITTED:  # as containerd's storage: only active ones and views
            raise FailedPrecondition(f"snapshot {key!r} is committed: it has no mounts")
        self._check(parents)
        return self._mounts(snap, parents, self._lowers(parents))

    # -- committing and removing ------------------------------------------------------
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        active = self.store.get(key)
        size, inodes = (disk_usage(self.store.fs_dir(active))
                        if active is not None and active.kind == Kind.ACTIVE else (0, 0))
        with self.store.transaction() as tx:
            old, new = core.commit(tx, name=name, key=key, labels=labels, now_ns=self.clock(),
                                   size=size, inodes=inodes)
            tx.replace(old.key, new)
        if core.is_layer(key, old.labels):
            # The hook gets the Prepare's labels too: they carry the layer digest whether or
            # not the client repeats them on Commit.
            self.remote.committed(name, {**old.labels, **new.labels}, str(self.store.fs_dir(new)))

    def remove(self, key: str) -> None:
        with self.store.transaction() as tx:
            snap = tx.get(key)
            remote = snap.remote if snap is not None else ""
            core.remove(tx, key)
            tx.delete(key)
        if remote and self.erofs is not None and not any(s.remote == remote for s in self.store.all()):
            self.erofs.release(remote)

    def cleanup(self) -> None:
        swept = self.store.cleanup()
        if swept:
            log.info("cleanup removed the dirs of %d snapshots no longer known", len(swept))
        if self.erofs is not None:
            gone = self.erofs.sweep(s.remote for s in self.store.all() if s.remote)
            if gone:
                log.info("cleanup detached %d EROFS layer mounts no snapshot uses", len(gone))

    # -- reading ----------------------------------------------------------------------
    def stat(self, key: str) -> Snapshot:
        with self.store.transaction() as tx:
            return core.stat(tx, key)

    def update(self, key: str, labels: Mapping[str, str] | None, paths: Iterable[str]) -> Snapshot:
        with self.store.transaction() as tx:
            new = core.update(tx, key=key, labels=labels, paths=paths, now_ns=self.clock())
            tx.replace(key, new)
        return new

    def list(self, filters: Iterable[str] = ()) -> list[Snapshot]:
        match = compile_filters(filters)
        return [s for s in self.store.all()
                if match(snapshot_adaptor(name=s.key, parent=s.parent, kind=s.kind.filter_name,
                                          labels=s.labels))]

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): measured now for an active snapshot, recorded at commit for a
        committed one; 0 for a remote layer (its bytes live in p2pfs's cache, not here)."""
        snap = self.stat(key)
        if snap.kind == Kind.ACTIVE:
            return disk_usage(self.store.fs_dir(snap))
        return snap.size, snap.inodes
