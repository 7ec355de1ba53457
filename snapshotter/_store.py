"""Snapshots persisted in sqlite, and their directories under ROOT.

    ROOT/metadata.db             one row per snapshot (WAL, synchronous=FULL)
    ROOT/snapshots/<id>/fs       the upper dir (a committed snapshot's contents); for a
                                 remotely served layer a symlink to its dir on the p2pfs
                                 mount, so every lowerdir reads ROOT/snapshots/<id>/fs
                                 (short, and compactable by containerd's mount code)
    ROOT/snapshots/<id>/work     overlayfs's work dir (active snapshots)
    ROOT/trash/                  dirs being deleted

Crash safety: a snapshot's row and its dirs are created inside one transaction (dirs
first, commit last), so a crash leaves at worst a dir without a row; Remove and Cleanup
move dirs into trash/ inside the transaction and delete them after it. Cleanup (and
`open`) sweeps dirs without rows. Ids come from AUTOINCREMENT and are never reused.

One connection, guarded by a lock: grpc calls arrive on several threads, and every
operation is short (no remote checks or disk walks while the lock is held).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from ._metadata import Kind, Snapshot

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    remote TEXT NOT NULL,
    size INTEGER NOT NULL,
    inodes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""
_COLUMNS = "id, key, kind, parent, labels, created_ns, updated_ns, remote, size, inodes"


def _row(r: tuple) -> Snapshot:
    return Snapshot(id=r[0], key=r[1], kind=Kind(r[2]), parent=r[3], labels=json.loads(r[4]),
                    created_ns=r[5], updated_ns=r[6], remote=r[7], size=r[8], inodes=r[9])


class Transaction:
    """The `_metadata.Table` protocol plus writes, inside one sqlite transaction."""

    def __init__(self, store: "Store") -> None:
        self._store, self._db = store, store._db
        self.trash: list[tuple[Path, Path]] = []  # (where it was, where it is now)
        self.created: list[Path] = []

    def get(self, key: str) -> Snapshot | None:
        r = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _row(r) if r else None

    def has_children(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1",
                                (key,)).fetchone() is not None

    def insert(self, snap: Snapshot) -> Snapshot:
        """Store a new snapshot and make its dirs (upper and work; a symlink for a remote one)."""
        cur = self._db.execute(
            "INSERT INTO snapshots (key, kind, parent, labels, created_ns, updated_ns, remote,"
            " size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (snap.key, int(snap.kind), snap.parent, json.dumps(dict(snap.labels), sort_keys=True),
             snap.created_ns, snap.updated_ns, snap.remote, snap.size, snap.inodes))
        snap = replace(snap, id=cur.lastrowid)
        self.created.append(self._store.snapshots_dir / str(snap.id))
        self._store._make_dirs(snap)
        return snap

    def replace(self, old_key: str, snap: Snapshot) -> None:
        """Rewrite a snapshot in place (Commit renames the key; Update changes labels)."""
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ? WHERE key = ?",
            (snap.key, int(snap.kind), json.dumps(dict(snap.labels), sort_keys=True),
             snap.created_ns, snap.updated_ns, snap.size, snap.inodes, old_key))

    def delete(self, key: str) -> None:
        snap = self.get(key)
        if snap is None:
            return
        self._db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        if os.path.lexists(self._store.snapshots_dir / str(snap.id)):
            self.trash.append(self._store._to_trash(str(snap.id)))

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}


class Store:
    """Open (creating if needed) the store under `root`. Not a context manager on purpose:
    the snapshotter owns it for its life; call `close()`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.snapshots_dir = self.root / "snapshots"
        self.trash_dir = self.root / "trash"
        for d in (self.root, self.snapshots_dir, self.trash_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "metadata.db", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.cleanup()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """All of an operation's reads and writes, atomically; dirs moved to trash by it
        are deleted after it commits."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            tx = Transaction(self)
            try:
                yield tx
            except BaseException:
                self._db.execute("ROLLBACK")
                for orig, moved in tx.trash:  # put them back: the rows are back
                    os.rename(moved, orig)
                for path in tx.created:
                    shutil.rmtree(path, ignore_errors=True)
                raise
            self._db.execute("COMMIT")
        for _, moved in tx.trash:
            shutil.rmtree(moved, ignore_errors=True)

    def get(self, key: str) -> Snapshot | None:
        with self.transaction() as tx:
            return tx.get(key)

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[Kind, int]:
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind").fetchall()
        out = {k: 0 for k in Kind}
        out.update({Kind(k): n for k, n in rows})
        return out

    # -- directories ------------------------------------------------------------------
    def fs_dir(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id) / "fs"

    def work_dir(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id) / "work"

    def _make_dirs(self, snap: Snapshot) -> None:
        base = self.snapshots_dir / str(snap.id)
        if os.path.lexists(base):  # left by a crash before its row was committed
            shutil.rmtree(base)
        base.mkdir(mode=0o700)
        if snap.remote:
            os.symlink(snap.remote, base / "fs")
        else:
            (base / "fs").mkdir(mode=0o755)
            (base / "work").mkdir(mode=0o711)

    def _to_trash(self, name: str) -> tuple[Path, Path]:
        orig, dest = self.snapshots_dir / name, self.trash_dir / f"{name}-{uuid.uuid4().hex[:8]}"
        os.rename(orig, dest)
        return orig, dest

    def cleanup(self) -> list[int]:
        """Delete the dirs no snapshot owns (and anything left in trash/); the ids swept."""
        with self.transaction() as tx:
            ids = tx.ids()
            orphans = []
            for entry in os.scandir(self.snapshots_dir):
                if not (entry.name.isdigit() and int(entry.name) in ids):
                    orphans.append(entry.name)
                    tx.trash.append(self._to_trash(entry.name))
        for entry in os.scandir(self.trash_dir):
            shutil.rmtree(entry.path, ignore_errors=True)
        return sorted(int(n) for n in orphans if n.isdigit())


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under `path`, each inode once (hard links), like
    containerd's fs.DiskUsage; a dir removed meanwhile counts what was seen."""
    size = inodes = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
            inodes += 1
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(top) as it:
                    stack.extend(e.path for e in it)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return size, inodes
