"""The mounted namespace: one inode table built from one or more manifests. Pure.

A mount of a prefix shows each model found under it as a directory at its relative path
(intermediate directories are synthesized); a prefix that is itself a model is the root.
Hard links share their target's inode.
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass, field

from .manifest import Entry, Manifest
from .plan import ChunkLoc

ROOT_INODE = 1


@dataclass(slots=True)
class Node:
    inode: int
    st_mode: int
    entry: Entry | None = None  # None for synthesized directories
    blob_prefix: str = ""  # object key prefix the entry's blobs are relative to
    blobs: tuple[str, ...] = ()
    children: dict[bytes, int] | None = None
    parent: int = ROOT_INODE
    nlink: int = 1
    model: str = ""  # mount-relative path of the model this node belongs to

    @property
    def size(self) -> int:
        return self.entry.size if self.entry else 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st_mode)

    def locs(self, span: range) -> list[ChunkLoc]:
        assert self.entry is not None
        chunks = self.entry.chunks
        return [ChunkLoc(self.blob_prefix + self.blobs[chunks[i].blob], chunks[i]) for i in span]


@dataclass
class Tree:
    nodes: dict[int, Node] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # mount path -> manifest digest

    def lookup_path(self, path: str) -> Node | None:
        node = self.nodes[ROOT_INODE]
        for part in (p for p in path.split("/") if p):
            if node.children is None or part.encode() not in node.children:
                return None
            node = self.nodes[node.children[part.encode()]]
        return node


class TreeConflict(ValueError):
    """Two models (or a model and a synthesized directory) claim one path differently."""


def build_tree_skipping(models: list[tuple[str, Manifest, str]]) -> tuple[Tree, list[str]]:
    """`build_tree`, leaving out each model that conflicts with those before it (in mount
    path order) and saying why: one model must not keep every other one from mounting.
    The common case builds once; only a conflict pays for rebuilding."""
    try:
        return build_tree(models), []
    except TreeConflict:
        pass
    kept: list[tuple[str, Manifest, str]] = []
    problems: list[str] = []
    for m in sorted(models, key=lambda m: m[0]):
        try:
            build_tree([*kept, m])
        except TreeConflict as exc:
            problems.append(f"model {m[0] or '/'} skipped: {exc}")
            continue
        kept.append(m)
    return build_tree(kept), problems


def build_tree(models: list[tuple[str, Manifest, str]]) -> Tree:
    """`models`: (mount-relative directory, manifest, object key prefix of its blobs)."""
    tree = Tree()
    tree.nodes[ROOT_INODE] = Node(ROOT_INODE, stat.S_IFDIR | 0o755, children={})
    next_inode = ROOT_INODE + 1

    def ensure_dir(path: str) -> Node:
        nonlocal next_inode
        node = tree.nodes[ROOT_INODE]
        for part in (p for p in path.split("/") if p):
            assert node.children is not None
            child = node.children.get(part.encode())
            if child is None:
                new = Node(next_inode, stat.S_IFDIR | 0o755, children={}, parent=node.inode)
                tree.nodes[next_inode] = new
                node.children[part.encode()] = next_inode
                next_inode += 1
                node = new
            else:
                node = tree.nodes[child]
                if node.children is None:
                    raise TreeConflict(f"{path!r} is both a file and a directory")
        return node

    for mount_dir, manifest, blob_prefix in sorted(models, key=lambda m: m[0]):
        tree.models[mount_dir] = manifest.digest
        by_path: dict[str, int] = {}
        base = ensure_dir(mount_dir)
        by_path[""] = base.inode
        # Parents before children: sort by depth, then path.
        for e in sorted(manifest.entries, key=lambda e: (e.path.count("/"), e.path)):
            if e.path == "":
                if base.entry is not None:
                    raise TreeConflict(f"{mount_dir!r} is the root of two models")
                base.entry = e
                base.st_mode = e.st_mode
                base.blob_prefix, base.blobs, base.model = blob_prefix, manifest.blobs, mount_dir
                continue
            parent_path = posixpath.dirname(e.path)
            parent = tree.nodes[by_path[parent_path]] if parent_path in by_path else ensure_dir(
                posixpath.join(mount_dir, parent_path))
            by_path.setdefault(parent_path, parent.inode)
            name = posixpath.basename(e.path).encode()
            if parent.children is None:
                raise TreeConflict(f"{posixpath.join(mount_dir, e.path)!r}: parent is not a directory")
            if e.type == "hardlink":
                continue  # second pass, once targets exist
            node = Node(next_inode, e.st_mode, entry=e, blob_prefix=blob_prefix,
                        blobs=manifest.blobs, parent=parent.inode, model=mount_dir,
                        children={} if e.type == "dir" else None)
            tree.nodes[next_inode] = node
            parent.children[name] = next_inode
            by_path[e.path] = next_inode
            next_inode += 1
        for e in manifest.entries:
            if e.type == "hardlink":
                target = tree.nodes[by_path[e.target]]
                parent = tree.nodes[by_path[posixpath.dirname(e.path)]]
                assert parent.children is not None
                parent.children[posixpath.basename(e.path).encode()] = target.inode
                target.nlink += 1
    for node in tree.nodes.values():
        if node.children is not None:
            node.nlink = 2 + sum(1 for c in node.children.values() if tree.nodes[c].is_dir)
    return tree
