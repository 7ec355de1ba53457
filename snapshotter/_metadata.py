"""containerd's snapshot rules, pure: no files, no sqlite, no clock (callers pass `now_ns`).

A snapshot is active (writable, from Prepare), a view (read-only, from View) or committed
(from Commit of an active one; only committed snapshots can be parents). Keys of active
snapshots and views and names of committed ones share one namespace. Every operation
reads the current table through the small `Table` protocol and returns what to write;
`_store.py` applies that in one sqlite transaction and `MemoryTable` below in a dict.

The remote-layer rule (what makes lazy pulling work, see ../shared/SNAPSHOTTER.md): a
Prepare carrying `containerd.io/snapshot.ref=<chainID>` for a layer the caller found on
the p2pfs mount becomes a committed snapshot named `<namespace>/<chainID>` (same parent,
the request's labels, its lower dir recorded), and the answer is ALREADY_EXISTS;
containerd then finds it by a List filtered on that label and parent, and skips the
download. If that name is already taken by a committed snapshot with the same parent, it
is the same layer served again; taken otherwise, the Prepare falls back to a normal one.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping, Protocol

from ._errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

#: Set by containerd's unpacker on a layer's Prepare: the chain id the layer will commit as.
REF_LABEL = "containerd.io/snapshot.ref"
#: Our mark on a remotely served layer: its lower dir on the p2pfs mount.
REMOTE_LABEL = "containerd.io/snapshot/p2pfs.remote"
#: containerd's labels.Validate: key plus value at most this many bytes.
MAX_LABEL = 4096
_CONTAINERD_KEY = re.compile(r"([^/]+)/(\d+)/(.*)", re.S)


class Kind(enum.IntEnum):
    """Values as in snapshots.proto's Kind enum."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Snapshot:
    """One snapshot. `key` is the key (active, view) or the name (committed); `parent` is a
    committed name or "". `id` is the store's (0 before it is stored); `remote` is the lower
    dir of a remotely served layer ("" otherwise); size/inodes are the usage recorded at
    commit (live usage of active snapshots is measured on demand)."""

    key: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    id: int = 0
    remote: str = ""
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class ServeRemote:
    """Prepare's decision for a layer served from the p2pfs mount: store `snapshot` (None:
    an identical one is already stored under `name`), then answer ALREADY_EXISTS."""

    name: str
    snapshot: Snapshot | None


@dataclass(frozen=True)
class Mount:
    """A mount as containerd's types.Mount carries it."""

    type: str
    source: str
    options: tuple[str, ...]


class Table(Protocol):
    """What the rules need to read."""

    def get(self, key: str) -> Snapshot | None: ...

    def has_children(self, key: str) -> bool: ...


def clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """containerd drops empty label values (an empty value deletes the label) and refuses
    a key plus value over 4096 bytes."""
    out = {}
    for k, v in (labels or {}).items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label {k[:10]!r}...: key and value over {MAX_LABEL} bytes")
        if v != "":
            out[k] = v
    return out


def split_key(key: str) -> tuple[str, str]:
    """(namespace, client key) of a key as containerd's metadata store sends it
    (`<ns>/<seq>/<client key>`); ("", key) for anything else."""
    m = _CONTAINERD_KEY.fullmatch(key)
    return (m.group(1), m.group(3)) if m else ("", key)


def remote_name(key: str, target: str) -> str:
    """The committed name of a remotely served layer: its chain id under the key's namespace,
    so the same layer in two namespaces (with different parents there) does not collide."""
    ns, _ = split_key(key)
    return f"{ns}/{target}" if ns else target


def is_layer(key: str, labels: Mapping[str, str]) -> bool:
    """A Prepare for unpacking an image layer: CRI and ctr-remote label it; `ctr image pull`
    sends no labels, but its unpacker's keys read `extract-<id> <chainID>`."""
    return REF_LABEL in labels or split_key(key)[1].startswith("extract-")


def _require(table: Table, key: str, what: str = "snapshot") -> Snapshot:
    snap = table.get(key)
    if snap is None:
        raise NotFound(f"{what} {key!r} does not exist")
    return snap


def _check_parent(table: Table, parent: str) -> None:
    if parent:
        if _require(table, parent, "parent").kind != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")


def prepare(table: Table, *, kind: Kind, key: str, parent: str,
            labels: Mapping[str, str] | None, now_ns: int,
            remote_lower: str | None = None) -> Snapshot | ServeRemote:
    """Prepare (kind ACTIVE) or View (kind VIEW). `remote_lower` is the layer's directory on
    the p2pfs mount when the caller found one for these labels; only an active Prepare
    with the ref label uses it."""
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(f"only active snapshots and views can be created, not {kind.name}")
    if not key:
        raise InvalidArgument("empty snapshot key")
    labels = clean_labels(labels)
    _check_parent(table, parent)
    if table.get(key) is not None:
        raise AlreadyExists(f"snapshot {key!r} already exists")
    target = labels.get(REF_LABEL, "")
    if kind == Kind.ACTIVE and target and remote_lower:
        name = remote_name(key, target)
        held = table.get(name)
        if held is None:
            return ServeRemote(name, Snapshot(
                key=name, kind=Kind.COMMITTED, parent=parent,
                labels={**labels, REMOTE_LABEL: remote_lower}, created_ns=now_ns,
                updated_ns=now_ns, remote=remote_lower))
        if held.kind == Kind.COMMITTED and held.parent == parent and held.remote:
            return ServeRemote(name, None)
        # The name is taken by something else: unpack normally.
    return Snapshot(key=key, kind=kind, parent=parent, labels=labels, created_ns=now_ns,
                    updated_ns=now_ns)


def commit(table: Table, *, name: str, key: str, labels: Mapping[str, str] | None,
           now_ns: int, size: int = 0, inodes: int = 0) -> tuple[Snapshot, Snapshot]:
    """(the active snapshot, the committed one replacing it: same id and parent, the commit's
    labels (not inherited), the usage measured by the caller)."""
    if not name:
        raise InvalidArgument("empty snapshot name")
    labels = clean_labels(labels)
    if table.get(name) is not None:
        raise AlreadyExists(f"committed snapshot {name!r} already exists")
    active = _require(table, key)
    if active.kind != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key!r} is not active")
    return active, replace(active, key=name, kind=Kind.COMMITTED, labels=labels,
                           created_ns=now_ns, updated_ns=now_ns, size=size, inodes=inodes)


def remove(table: Table, key: str) -> Snapshot:
    """The snapshot to delete; a parent of another snapshot cannot go."""
    snap = _require(table, key)
    if table.has_children(key):
        raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
    return snap


def stat(table: Table, key: str) -> Snapshot:
    return _require(table, key)


def update(table: Table, *, key: str, labels: Mapping[str, str] | None,
           paths: Iterable[str], now_ns: int) -> Snapshot:
    """Only labels change: no paths replaces them all, `labels` too, `labels.K` sets (or,
    absent from `labels`, deletes) one; any other path is refused."""
    snap = _require(table, key)
    labels = dict(labels or {})
    paths = list(paths)
    new = dict(snap.labels)
    if not paths:
        new = labels
    for path in paths:
        if path.startswith("labels."):
            new[path[len("labels."):]] = labels.get(path[len("labels."):], "")
        elif path == "labels":
            new = dict(labels)
        else:
            raise InvalidArgument(f"cannot update {path!r} of snapshot {key!r}")
    return replace(snap, labels=clean_labels(new), updated_ns=now_ns)


def chain(table: Table, snap: Snapshot) -> list[Snapshot]:
    """The snapshot's parents, nearest first."""
    out, parent, seen = [], snap.parent, {snap.key}
    while parent:
        if parent in seen:
            raise RuntimeError(f"parent loop at {parent!r}")  # the rules make this impossible
        seen.add(parent)
        p = _require(table, parent, "parent")
        out.append(p)
        parent = p.parent
    return out


def mounts(snap: Snapshot, *, fs_dir: str, work_dir: str, lower_dirs: list[str]) -> list[Mount]:
    """containerd's overlay snapshotter's mounts. `fs_dir`/`work_dir` are the snapshot's own
    upper and work dirs; `lower_dirs` its parents', nearest first."""
    if not lower_dirs:
        return [Mount("bind", fs_dir, ("ro" if snap.kind == Kind.VIEW else "rw", "rbind"))]
    if snap.kind != Kind.ACTIVE and len(lower_dirs) == 1:
        return [Mount("bind", lower_dirs[0], ("ro", "rbind"))]
    options = []
    if snap.kind == Kind.ACTIVE:
        options += [f"workdir={work_dir}", f"upperdir={fs_dir}"]
    options.append("lowerdir=" + ":".join(lower_dirs))
    return [Mount("overlay", "overlay", tuple(options))]


class MemoryTable:
    """The table in a dict: the reference the sqlite store is tested against."""

    def __init__(self) -> None:
        self.rows: dict[str, Snapshot] = {}
        self._next = 1

    def get(self, key: str) -> Snapshot | None:
        return self.rows.get(key)

    def has_children(self, key: str) -> bool:
        return any(s.parent == key for s in self.rows.values())

    def insert(self, snap: Snapshot) -> Snapshot:
        snap = replace(snap, id=self._next)
        self._next += 1
        self.rows[snap.key] = snap
        return snap

    def replace(self, old_key: str, snap: Snapshot) -> None:
        del self.rows[old_key]
        self.rows[snap.key] = snap

    def delete(self, key: str) -> None:
        del self.rows[key]

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(sorted(self.rows.values(), key=lambda s: s.id))
