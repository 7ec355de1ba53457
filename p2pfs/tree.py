"""The mounted namespace: one inode table built from one or more manifests. Pure.

A mount of a prefix shows each model found under it as a directory at its relative path
(intermediate directories are synthesized); a prefix that is itself a model is the root.
Hard links share their target's inode.

Where each chunk goes in the disk cache (its `Spot`) is decided here: a file of a model is
one local data file (plan.file_id), kept in the shape of the file; the files of an image
layer are many and small, so a layer's chunks of one pack share one data file, in pack
order (`PackLayout`): creating a file costs ~1 ms of CPU here, a start-up reads thousands.
"""

from __future__ import annotations

import bisect
import hashlib
import posixpath
import stat
from dataclasses import dataclass, field
from operator import attrgetter

from . import erofs
from ._buffers import ALIGN
from .manifest import ChunkRef, Entry, Manifest
from .plan import ChunkLoc, Spot, file_id

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
    layout: "PackLayout | None" = None  # image layers: where their chunks sit on disk
    _file_id: str = ""  # the entry's content id (plan.file_id), computed on first use
    #: An image layer's EROFS file (`.erofs/<layer>.img` or `.blob`): (image, which).
    virtual: "tuple[LayerImage, str] | None" = None

    @property
    def size(self) -> int:
        if self.virtual is not None:
            return self.virtual[0].size(self.virtual[1])
        return self.entry.size if self.entry else 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st_mode)

    @property
    def file_id(self) -> str:
        assert self.entry is not None
        if not self._file_id:
            self._file_id = file_id(self.entry)
        return self._file_id

    def locs(self, span: range) -> list[ChunkLoc]:
        entry = self.entry
        assert entry is not None
        chunks, prefix, blobs = entry.chunks, self.blob_prefix, self.blobs
        if self.layout is not None:
            spot = self.layout.spot
            return [ChunkLoc(prefix + blobs[chunks[i].blob], chunks[i], spot(chunks[i]))
                    for i in span]
        starts, fid = entry.starts, self.file_id
        return [ChunkLoc(prefix + blobs[chunks[i].blob], chunks[i],
                         Spot(fid, starts[i], entry.size)) for i in span]


#: The directory, beside an image layer's, that holds its EROFS image and blob.
EROFS_DIR = ".erofs"


class LayerImage:
    """An image layer's EROFS metadata image and blob layout (p2pfs/erofs.py), built on
    first use, once: `build()` is CPU work (about 0.3 s for 16,000 entries), run off the
    FUSE thread by the caller. A layer EROFS cannot express gets `error` and no files."""

    def __init__(self, manifest: Manifest, layer: str, digest: str = "") -> None:
        self.manifest = manifest
        self.layer = layer                      # the layer's mount-relative dir
        self.digest = digest or manifest.digest  # the manifest's (the image's UUID)
        self.paths: dict[str, int] = {}         # entry path -> inode (set at attach)
        self.image: "erofs.Image | None" = None
        self.error: str = ""
        self.blob_inode: int | None = None      # the `.blob` file's inode (set at attach)
        self.opened = False                     # the kernel has the blob open (EROFS mounted it)
        self.direct = False                     # ... bypassing its page cache (fs.open)
        self._positions: dict[str, list[tuple[int, int]]] | None = None

    @property
    def ready(self) -> bool:
        return self.image is not None or bool(self.error)

    def build(self) -> None:
        if self.ready:
            return
        try:
            self.image = erofs.build(self.manifest, uuid=_uuid(self.digest))
        except erofs.ErofsUnsupported as exc:
            self.error = str(exc)
            return
        self.positions()  # here, off the FUSE thread, rather than at the first page push

    def size(self, which: str) -> int:
        if self.image is None:
            return 0
        return len(self.image.meta) if which == "img" else self.image.blob_size

    def positions(self) -> dict[str, list[tuple[int, int]]]:
        """Per chunk digest, where its bytes sit in the blob as whole pages: (offset, zero
        bytes after it to the page's end); a file's last chunk is padded with the zeros the
        blob holds there, a chunk that starts or ends inside a page elsewhere is left out
        (p2pfs/pagepush.py pushes these into the kernel's page cache)."""
        if self._positions is None:
            if self.image is None:
                return {}
            by_path = {e.path: e for e in self.manifest.files()}
            out: dict[str, list[tuple[int, int]]] = {}
            for x in self.image.extents:
                e = by_path[x.path]
                last = len(e.chunks) - 1
                for i, c in enumerate(e.chunks):
                    off = x.offset + e.starts[i]
                    if off % erofs.BLOCK or (i < last and c.size % erofs.BLOCK):
                        continue
                    pad = (-(off + c.size)) % erofs.BLOCK if i == last else 0
                    out.setdefault(c.digest, []).append((off, pad))
            self._positions = out
        return self._positions


#: A pack's chunks in the order a layer's data file holds them (docs/FORMAT.md, "Pack layout id").
_PACK_ORDER = attrgetter("offset", "length", "size", "digest", "compression")


class PackLayout:
    """The disk cache's layout of one image layer: for each pack the layer uses, one data
    file holding the layer's chunks of that pack in pack order (stored offset, then the
    rest of the ref), each at the first block boundary after the one before it: on disk
    a small file takes a block as it would on its own, its write can bypass the page cache
    (O_DIRECT, as a model file's chunks do) and evicting it punches whole blocks.

    Why not a data file per file, as for models: a layer's files are thousands of small
    ones that a start-up reads together, and a new file costs the write-back about 1 ms
    of CPU on ext4 here (2,000 creates: 2.2 s; the same bytes into 10 files: 0.09 s), on
    the cores the starting container needs. Packs hold files in tar order, so this keeps
    what a start reads together in a few long files, read back sequentially.

    A spot is a pure function of the layer's manifest (its digest names the data file
    with the pack's key), never of what else is mounted: the cache's index records spots,
    and one recorded must mean the same bytes after a restart. Two layers sharing a pack
    get two data files; the cache finds a chunk by its digest in either. Built at attach
    (about 70 ms for a 15,000-file layer), not on the first read, which is a container's
    start waiting on the trio thread."""

    __slots__ = ("_spots",)

    def __init__(self, manifest: Manifest, digest: str, blob_keys: tuple[str, ...]) -> None:
        by_blob: dict[int, set[ChunkRef]] = {}
        for e in manifest.files():
            for c in e.chunks:
                by_blob.setdefault(c.blob, set()).add(c)
        self._spots: dict[ChunkRef, Spot] = {}
        for blob, refs in by_blob.items():
            order = sorted(refs, key=_PACK_ORDER)
            fid = hashlib.sha256(f"p2pfs-pack-layout 1\n{digest}\n{blob_keys[blob]}\n"
                                 .encode()).hexdigest()
            ats, at = [], 0
            for c in order:
                ats.append(at)
                at += -(-c.size // ALIGN) * ALIGN
            fsize = ats[-1] + order[-1].size
            for c, at in zip(order, ats):
                self._spots[c] = Spot(fid, at, fsize)

    def spot(self, ref: ChunkRef) -> Spot:
        return self._spots[ref]


@dataclass
class Tree:
    nodes: dict[int, Node] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # mount path -> manifest digest
    next_inode: int = ROOT_INODE + 1
    #: Per pack blob (shared by many files: image layers), its chunks by offset.
    _packs: dict[str, tuple[list[int], list[ChunkLoc]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if ROOT_INODE not in self.nodes:
            self.nodes[ROOT_INODE] = Node(ROOT_INODE, stat.S_IFDIR | 0o755, children={})

    def lookup_path(self, path: str) -> Node | None:
        node = self.nodes[ROOT_INODE]
        for part in (p for p in path.split("/") if p):
            if node.children is None or part.encode() not in node.children:
                return None
            node = self.nodes[node.children[part.encode()]]
        return node

    def pack_neighbours(self, loc: ChunkLoc, nbytes: int) -> list[ChunkLoc]:
        """The chunks stored after `loc` in its pack, up to `nbytes` of stored bytes: in an
        image layer's pack they belong to the files next to it in the layer's tar (a
        package's other modules, a library's neighbours), which a start-up reads next.
        Only packs (blobs of `blob_root: ".."` manifests) are indexed."""
        index = self._packs.get(loc.key)
        if index is None:
            return []
        offsets, locs = index
        i = bisect.bisect_right(offsets, loc.ref.offset)
        out: list[ChunkLoc] = []
        end = loc.ref.offset + loc.ref.length + nbytes
        while i < len(locs) and offsets[i] < end:
            out.append(locs[i])
            i += 1
        return out

    def _index_packs(self, manifest: Manifest, blob_prefix: str) -> None:
        """Add a layer's chunks to the pack index (at attach: cost of the new layer only)."""
        if manifest.blob_root == ".":
            return
        added: dict[str, dict[int, ChunkLoc]] = {}
        for e in manifest.files():
            for c in e.chunks:
                key = blob_prefix + manifest.blobs[c.blob]
                added.setdefault(key, {}).setdefault(c.offset, ChunkLoc(key, c))
        for key, by_offset in added.items():
            old_offsets, old_locs = self._packs.get(key, ([], []))
            merged = dict(zip(old_offsets, old_locs))
            for off, loc in by_offset.items():
                merged.setdefault(off, loc)
            offsets = sorted(merged)
            self._packs[key] = (offsets, [merged[o] for o in offsets])

    def attach(self, mount_dir: str, manifest: Manifest,
               blob_prefix: str) -> dict[int, tuple[bytes, ...]]:
        """Add one model at `mount_dir` to a live tree; returns the existing directories
        that changed, by inode, with the names they gained: the kernel's cached attributes
        of those directories are stale, and so is any negative entry it cached for a name.

        All or nothing: a conflict raises TreeConflict before anything changes, so a
        mount that is serving keeps serving what it had. Inodes are never reused or
        renumbered (the kernel and open files hold them). Pure and synchronous: no await
        can interleave with a half-attached model."""
        if mount_dir in self.models:
            raise TreeConflict(f"{mount_dir or '/'!r} is mounted already")
        digest = manifest.digest
        plan = _Attach(self)
        plan.model(mount_dir, manifest, blob_prefix, digest)
        touched = plan.commit(mount_dir, digest)
        self._index_packs(manifest, blob_prefix)
        return touched


def _uuid(digest: str) -> bytes:
    """An EROFS image's UUID: the first 16 bytes of its manifest's sha256 (what
    `erofs.build` takes by default, without encoding the manifest again)."""
    return bytes.fromhex(digest.removeprefix("sha256:"))[:16]


class TreeConflict(ValueError):
    """Two models (or a model and a synthesized directory) claim one path differently."""


def build_tree_skipping(models: list[tuple[str, Manifest, str]]) -> tuple[Tree, list[str]]:
    """`build_tree`, leaving out each model that conflicts with those before it (in mount
    path order) and saying why: one model must not keep every other one from mounting.
    `Tree.attach` changes nothing when it refuses, so one pass does it (it rebuilt the
    tree once per model after a conflict: quadratic in a layers prefix's size)."""
    tree = Tree()
    problems: list[str] = []
    for mount_dir, manifest, blob_prefix in sorted(models, key=lambda m: m[0]):
        try:
            tree.attach(mount_dir, manifest, blob_prefix)
        except TreeConflict as exc:
            problems.append(f"model {mount_dir or '/'} skipped: {exc}")
    return tree, problems


def build_tree(models: list[tuple[str, Manifest, str]]) -> Tree:
    """`models`: (mount-relative directory, manifest, object key prefix of its blobs)."""
    tree = Tree()
    for mount_dir, manifest, blob_prefix in sorted(models, key=lambda m: m[0]):
        tree.attach(mount_dir, manifest, blob_prefix)
    return tree


class _Attach:
    """The nodes one model adds to a tree, built aside and committed in one step."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.new: dict[int, Node] = {}
        self.links: list[tuple[int, bytes, int]] = []  # (parent inode, name, child inode)
        self.pending: dict[int, dict[bytes, int]] = {}  # names added to existing dirs
        self.base_entry: tuple[int, Node] | None = None
        self.next_inode = tree.next_inode
        self.nlink_extra: dict[int, int] = {}  # hard links to existing-in-plan files

    def _get(self, inode: int) -> Node:
        return self.new.get(inode) or self.tree.nodes[inode]

    def _child(self, parent: Node, name: bytes) -> int | None:
        if parent.inode in self.new:
            assert parent.children is not None
            return parent.children.get(name)
        assert parent.children is not None
        return self.pending.get(parent.inode, {}).get(name, parent.children.get(name))

    def _add(self, parent: Node, name: bytes, node: Node) -> None:
        if self._child(parent, name) is not None:
            raise TreeConflict(f"{name.decode(errors='replace')!r} in directory inode "
                               f"{parent.inode} is claimed twice")
        if parent.inode in self.new:
            assert parent.children is not None
            parent.children[name] = node.inode
        else:
            self.pending.setdefault(parent.inode, {})[name] = node.inode
        if node.inode not in self.new and node.inode not in self.tree.nodes:
            self.new[node.inode] = node

    def _inode(self) -> int:
        self.next_inode += 1
        return self.next_inode - 1

    def ensure_dir(self, path: str) -> Node:
        node = self._get(ROOT_INODE)
        for part in (p for p in path.split("/") if p):
            assert node.children is not None
            child = self._child(node, part.encode())
            if child is None:
                new = Node(self._inode(), stat.S_IFDIR | 0o755, children={}, parent=node.inode)
                self._add(node, part.encode(), new)
                node = new
            else:
                node = self._get(child)
                if node.children is None:
                    raise TreeConflict(f"{path!r} is both a file and a directory")
        return node

    def model(self, mount_dir: str, manifest: Manifest, blob_prefix: str, digest: str) -> None:
        layout = None if manifest.blob_root == "." else PackLayout(
            manifest, digest, tuple(blob_prefix + b for b in manifest.blobs))
        by_path: dict[str, int] = {}
        base = self.ensure_dir(mount_dir)
        by_path[""] = base.inode
        # Parents before children: sort by depth, then path.
        for e in sorted(manifest.entries, key=lambda e: (e.path.count("/"), e.path)):
            if e.path == "":
                if base.entry is not None:
                    raise TreeConflict(f"{mount_dir!r} is the root of two models")
                if base.inode in self.new:
                    base.entry, base.st_mode = e, e.st_mode
                    base.blob_prefix, base.blobs, base.model = blob_prefix, manifest.blobs, mount_dir
                else:  # an existing synthesized directory becomes this model's root
                    self.base_entry = (base.inode, Node(
                        base.inode, e.st_mode, entry=e, blob_prefix=blob_prefix,
                        blobs=manifest.blobs, children={}, parent=base.parent, model=mount_dir))
                continue
            parent_path = posixpath.dirname(e.path)
            parent = self._get(by_path[parent_path]) if parent_path in by_path else self.ensure_dir(
                posixpath.join(mount_dir, parent_path))
            by_path.setdefault(parent_path, parent.inode)
            if parent.children is None:
                raise TreeConflict(f"{posixpath.join(mount_dir, e.path)!r}: parent is not a directory")
            if e.type == "hardlink":
                continue  # second pass, once targets exist
            node = Node(self._inode(), e.st_mode, entry=e, blob_prefix=blob_prefix,
                        blobs=manifest.blobs, parent=parent.inode, model=mount_dir,
                        children={} if e.type == "dir" else None, layout=layout)
            self._add(parent, posixpath.basename(e.path).encode(), node)
            by_path[e.path] = node.inode
        if layout is not None and mount_dir:
            self._erofs_files(mount_dir, manifest, by_path, digest)
        for e in manifest.entries:
            if e.type == "hardlink":
                target = self._get(by_path[e.target])
                parent = self._get(by_path[posixpath.dirname(e.path)])
                self._add(parent, posixpath.basename(e.path).encode(), target)
                self.nlink_extra[target.inode] = self.nlink_extra.get(target.inode, 0) + 1

    def _erofs_files(self, mount_dir: str, manifest: Manifest, by_path: dict[str, int],
                     digest: str) -> None:
        """`<dir>/.erofs/<layer>.img` and `.blob` beside the layer `<dir>/<layer>`: what the
        snapshotter mounts as EROFS (docs/ARCHITECTURE.md, "Image layers through EROFS")."""
        image = LayerImage(manifest, mount_dir, digest)
        image.paths = by_path
        parent = self.ensure_dir(posixpath.join(posixpath.dirname(mount_dir), EROFS_DIR))
        name = posixpath.basename(mount_dir)
        for which in ("img", "blob"):
            node = Node(self._inode(), stat.S_IFREG | 0o444, parent=parent.inode,
                        model=mount_dir, virtual=(image, which))
            self._add(parent, f"{name}.{which}".encode(), node)
            if which == "blob":
                image.blob_inode = node.inode

    def commit(self, mount_dir: str, digest: str) -> dict[int, tuple[bytes, ...]]:
        tree = self.tree
        touched = {inode: tuple(names) for inode, names in self.pending.items()}
        if self.base_entry is not None:
            inode, node = self.base_entry
            node.children = tree.nodes[inode].children
            tree.nodes[inode] = node
            touched.setdefault(inode, ())
        tree.nodes.update(self.new)
        for inode, names in self.pending.items():
            children = tree.nodes[inode].children
            assert children is not None
            children.update(names)
        for inode, extra in self.nlink_extra.items():
            tree.nodes[inode].nlink += extra
        tree.next_inode = self.next_inode
        tree.models[mount_dir] = digest
        for inode in (*self.new, *touched):
            node = tree.nodes[inode]
            if node.children is not None:
                node.nlink = 2 + sum(1 for c in node.children.values() if tree.nodes[c].is_dir)
        return touched
