"""An EROFS metadata image of a layer, with the file data on a second device (the blob).

The kernel serves an EROFS mount's metadata (lookup, getattr, getxattr, readdir, readlink)
from its own caches after the first read of each block, so a layer mounted this way costs
no FUSE round trip per metadata request; only data reads reach p2pfs, as reads of the
layer's *blob*: one virtual file per layer holding every regular file's bytes, each at a
4 KiB-aligned offset, in pack (tar) order. Why, and the measurements: docs/ARCHITECTURE.md,
"Image layers through EROFS". The on-disk format written here is the kernel's
(Documentation/filesystems/erofs.rst, fs/erofs/erofs_fs.h); the subset used and the layout
are in docs/FORMAT.md, "EROFS metadata image".

`build(manifest)` is pure and deterministic: the same manifest gives the same image and
the same blob layout, so the daemon (which serves the blob) and whoever mounts need no
other agreement than the manifest.

The subset: one primary device (this image: superblock, a device table of one extra
device, extended inodes with inline xattrs, directories and symlink targets in plain
blocks) and one extra device (the blob), which every non-empty regular file maps to as a
single chunk-indexed extent. Nothing is compressed: the blob's bytes are what the files
hold (p2pfs verifies and inflates chunks before it serves them).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import os
import posixpath
import struct
from dataclasses import dataclass, field

from .errors import P2PFSError
from .manifest import Entry, Manifest

BLOCK = 4096
_BLKBITS = 12
_MAGIC = 0xE0F5E1E2
_SB_OFFSET = 1024
_SLOT = 128                 # one device slot
_DEVT_SLOTOFF = (_SB_OFFSET + 128) // _SLOT   # the device table right after the superblock
_META_BLKADDR = 1           # inodes start at block 1 (nid 0 is the root)
_INCOMPAT_CHUNKED_FILE = 0x4
_INCOMPAT_DEVICE_TABLE = 0x8
_EXTENDED = 1
_FLAT_PLAIN, _CHUNK_BASED = 0, 4
_CHUNK_INDEXES = 0x20
_INODE = 64                 # an extended inode
_NULL = 0xFFFFFFFF
#: The largest image built (it is kept in the daemon's memory): a layer that needs more
#: (over ~16,000 directories or symlinks) is served through FUSE.
MAX_IMAGE = 64 << 20
_INODE_FMT = struct.Struct("<HHHHQIIIIqII16x")   # erofs_inode_extended
_CHUNK_INDEX_FMT = struct.Struct("<HHI")           # erofs_inode_chunk_index
_DIRENT_FMT = struct.Struct("<QHBB")               # erofs_dirent
_FT = {"file": 1, "dir": 2, "char": 3, "block": 4, "fifo": 5, "symlink": 7}
#: xattr name prefixes EROFS can index (the kernel's EROFS_XATTR_INDEX_*), longest first
_XATTR_PREFIXES = (("system.posix_acl_default", 3), ("system.posix_acl_access", 2),
                   ("security.", 6), ("trusted.", 4), ("user.", 1))


class ErofsUnsupported(P2PFSError):
    """The layer has something this EROFS subset cannot express (it is served through FUSE)."""


@dataclass(frozen=True)
class Extent:
    """Where one regular file's bytes sit in the blob."""

    offset: int   # in the blob, a multiple of BLOCK
    size: int
    path: str     # the entry that serves these bytes (the first of identical files)


@dataclass(frozen=True)
class Image:
    meta: bytes
    #: Extents in blob order (by offset); gaps between them read as zeros.
    extents: tuple[Extent, ...] = ()
    blob_size: int = 0
    _starts: tuple[int, ...] = field(default=(), repr=False)

    def covering(self, offset: int, size: int) -> list[tuple[Extent, int, int]]:
        """(extent, file offset, length) for the extents that hold blob bytes
        [offset, offset + size), in order; what is not listed reads as zeros."""
        out = []
        end = min(offset + size, self.blob_size)
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while i < len(self.extents) and self.extents[i].offset < end:
            x = self.extents[i]
            lo, hi = max(offset, x.offset), min(end, x.offset + x.size)
            if lo < hi:
                out.append((x, lo - x.offset, hi - lo))
            i += 1
        return out


@dataclass(slots=True)
class _Ino:
    entry: Entry
    nid: int = 0
    nlink: int = 1
    children: dict[bytes, "_Ino"] | None = None
    parent: "_Ino | None" = None
    xattr_body: bytes = b""
    blkaddr: int = _NULL     # plain data (dirs, symlinks) in the image, or the blob extent
    nblocks: int = 0
    extent: Extent | None = None

    @property
    def record_size(self) -> int:
        size = _INODE + len(self.xattr_body)
        if self.extent is not None:
            size = _align(size, 8) + 8
        return _align(size, 32)


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _xattr_body(xattrs) -> bytes:
    if not xattrs:
        return b""
    body = bytearray()
    for name in sorted(xattrs):
        value = bytes(xattrs[name])
        for prefix, index in _XATTR_PREFIXES:
            if name.startswith(prefix):
                suffix = name[len(prefix):].encode()
                break
        else:
            raise ErofsUnsupported(f"xattr {name!r} has no EROFS name index")
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise ErofsUnsupported(f"xattr {name!r} is too long for EROFS")
        ent = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
        body += ent + b"\0" * (_align(len(ent), 4) - len(ent))
    # header: h_name_filter (0: no bloom filter), h_shared_count 0, 7 reserved
    return bytes(12) + bytes(body)


def _dir_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Sorted names packed into blocks: each block holds its dirents, then their names."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        if used + 12 + len(name) > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += 12 + len(name)
    return blocks


def build(manifest: Manifest, *, uuid: bytes | None = None) -> Image:
    """The EROFS image of a layer manifest and its blob layout (pure)."""
    by_path: dict[str, _Ino] = {}
    hardlinks = []
    for e in sorted(manifest.entries, key=lambda e: (e.path.count("/"), e.path)):
        if e.type == "hardlink":
            hardlinks.append(e)
            continue
        if e.type not in _FT:
            raise ErofsUnsupported(f"entry type {e.type!r}")
        by_path[e.path] = _Ino(e, children={} if e.type == "dir" else None)
    if "" not in by_path or by_path[""].children is None:
        by_path[""] = _Ino(Entry(path="", type="dir", mode=0o755), children={})

    def parent_of(d: str, path: str) -> _Ino:
        if d not in by_path:  # a tar may omit a parent directory: synthesize it
            by_path[d] = _Ino(Entry(path=d, type="dir", mode=0o755), children={})
            link(d, by_path[d])
        p = by_path[d]
        if p.children is None:
            raise ErofsUnsupported(f"{path!r}: parent is not a directory")
        return p

    def link(path: str, ino: _Ino) -> None:
        d, _, base = path.rpartition("/")  # manifest paths are normalized (check_path)
        name = base.encode()
        if not name or len(name) > 255:
            raise ErofsUnsupported(f"name {path!r} is empty or too long")
        p = parent_of(d, path)
        if name in p.children:  # type: ignore[operator]
            raise ErofsUnsupported(f"{path!r} appears twice")
        p.children[name] = ino  # type: ignore[index]
        if ino.children is not None:
            ino.parent = p

    for path, ino in list(by_path.items()):
        if path:
            link(path, ino)
    for e in hardlinks:
        target = by_path.get(e.target)
        if target is None or target.children is not None:
            raise ErofsUnsupported(f"hard link {e.path!r} to {e.target!r}")
        link(e.path, target)
        target.nlink += 1

    # Inodes breadth first from the root (a directory's children together), each once.
    order: list[_Ino] = []
    seen: set[int] = set()
    queue = [by_path[""]]
    by_path[""].parent = by_path[""]
    while queue:
        nxt = []
        for ino in queue:
            if id(ino) in seen:
                continue
            seen.add(id(ino))
            order.append(ino)
            if ino.children is not None:
                nxt.extend(ino.children[n] for n in sorted(ino.children))
        queue = nxt

    # The blob: regular files in pack order (the order a start reads them), identical
    # contents once.
    files = [i for i in order if i.entry.type == "file" and i.entry.size > 0]
    files.sort(key=lambda i: (i.entry.chunks[0].blob, i.entry.chunks[0].offset, i.entry.path)
               if i.entry.chunks else (-1, 0, i.entry.path))
    extents: list[Extent] = []
    same: dict[tuple, Extent] = {}
    pos = 0
    for ino in files:
        e = ino.entry
        key = (e.size, tuple(c.digest for c in e.chunks)) if e.chunks else None
        x = same.get(key) if key is not None else None
        if x is None:
            x = Extent(pos, e.size, e.path)
            extents.append(x)
            pos = _align(pos + e.size, BLOCK)
            if key is not None:
                same[key] = x
        ino.extent = x
    if pos // BLOCK > 0xFFFFFFFF:
        raise ErofsUnsupported("layer data over 16 TiB")

    # nids: records 32-byte aligned; one that would cross a block starts the next block.
    off = 0
    for ino in order:
        ino.xattr_body = _xattr_body(ino.entry.xattrs)
        size = ino.record_size
        if off // BLOCK != (off + size - 1) // BLOCK and size <= BLOCK:
            off = _align(off, BLOCK)
        ino.nid = off // 32
        off += size
    if order[0].nid != 0:
        raise AssertionError("the root must be nid 0")
    data_blk = _META_BLKADDR + _align(off, BLOCK) // BLOCK

    # Plain data after the inodes: directory blocks, symlink targets.
    dir_names: dict[int, list[list[bytes]]] = {}
    for ino in order:
        if ino.children is not None:
            blocks = _dir_blocks(sorted([b".", b"..", *ino.children]))
            dir_names[id(ino)] = blocks
            ino.blkaddr, ino.nblocks = data_blk, len(blocks)
        elif ino.entry.type == "symlink":
            target = ino.entry.target.encode()
            if not target or len(target) > BLOCK:
                raise ErofsUnsupported(f"symlink {ino.entry.path!r}: target length {len(target)}")
            ino.blkaddr, ino.nblocks = data_blk, 1
        data_blk += ino.nblocks
    total_blocks = data_blk
    if total_blocks * BLOCK > MAX_IMAGE:
        raise ErofsUnsupported(f"its EROFS image would take {total_blocks * BLOCK >> 20} MiB "
                               f"(more than {MAX_IMAGE >> 20} MiB)")

    img = bytearray(total_blocks * BLOCK)
    meta0 = _META_BLKADDR * BLOCK
    for ino in order:
        e = ino.entry
        if ino.children is not None:
            subdirs = sum(1 for c in ino.children.values() if c.children is not None)
            nlink = 2 + subdirs
            blocks = dir_names[id(ino)]
            size = (len(blocks) - 1) * BLOCK + _dir_block_used(blocks[-1])
            for i, names in enumerate(blocks):
                _write_dir_block(img, (ino.blkaddr + i) * BLOCK, names, ino)
            layout, iu = _FLAT_PLAIN, ino.blkaddr
        elif e.type == "symlink":
            target = e.target.encode()
            img[ino.blkaddr * BLOCK: ino.blkaddr * BLOCK + len(target)] = target
            nlink, size, layout, iu = ino.nlink, len(target), _FLAT_PLAIN, ino.blkaddr
        elif e.type == "file" and ino.extent is not None:
            nlink, size = ino.nlink, e.size
            bits = max(0, (size - 1).bit_length() - _BLKBITS)   # one chunk covers the file
            layout, iu = _CHUNK_BASED, _CHUNK_INDEXES | bits
        else:  # empty files, devices (rdev in i_u), fifos
            nlink, size, layout = ino.nlink, 0, _FLAT_PLAIN
            iu = e.rdev if e.type in ("char", "block") else 0
        sec, nsec = divmod(e.mtime_ns, 1_000_000_000)
        icount = len(ino.xattr_body) // 4 - 2 if ino.xattr_body else 0
        at = meta0 + ino.nid * 32
        _INODE_FMT.pack_into(
            img, at, _EXTENDED | layout << 1, icount, e.st_mode & 0xFFFF, 0,
            size, iu, ino.nid & 0xFFFFFFFF, e.uid, e.gid, sec, nsec, nlink)
        at += _INODE
        img[at:at + len(ino.xattr_body)] = ino.xattr_body
        at += len(ino.xattr_body)
        if layout == _CHUNK_BASED:
            assert ino.extent is not None
            at = meta0 + _align(at - meta0, 8)
            # chunk index: advise 0, device 1 (the blob), start block
            _CHUNK_INDEX_FMT.pack_into(img, at, 0, 1, ino.extent.offset // BLOCK)

    blob_blocks = _align(pos, BLOCK) // BLOCK
    if uuid is None:
        uuid = hashlib.sha256(manifest.encode()).digest()[:16]
    sb = struct.pack(
        "<IIIBBHQQIIII16s16sIHHH", _MAGIC, 0, 0, _BLKBITS, 0, 0, len(order),
        0, 0, total_blocks, _META_BLKADDR, 0, uuid, b"p2pfs-layer",
        _INCOMPAT_CHUNKED_FILE | _INCOMPAT_DEVICE_TABLE, 0, 1, _DEVT_SLOTOFF)
    img[_SB_OFFSET:_SB_OFFSET + len(sb)] = sb
    slot = struct.pack("<64sII56x", b"p2pfs-blob", blob_blocks, 0)
    img[_DEVT_SLOTOFF * _SLOT:_DEVT_SLOTOFF * _SLOT + _SLOT] = slot
    return Image(bytes(img), tuple(extents), blob_blocks * BLOCK,
                 tuple(x.offset for x in extents))


def _dir_block_used(names: list[bytes]) -> int:
    return 12 * len(names) + sum(len(n) for n in names)


def _write_dir_block(img: bytearray, at: int, names: list[bytes], ino: _Ino) -> None:
    assert ino.children is not None and ino.parent is not None
    nameoff = 12 * len(names)
    for i, name in enumerate(names):
        child = ino if name == b"." else ino.parent if name == b".." else ino.children[name]
        ft = _FT[child.entry.type] if child.children is None else _FT["dir"]
        _DIRENT_FMT.pack_into(img, at + 12 * i, child.nid, nameoff, ft, 0)
        img[at + nameoff:at + nameoff + len(name)] = name
        nameoff += len(name)



# --------------------------------------------------------------------------- mounting

_MS_RDONLY, _MNT_DETACH = 1, 2


def _libc():
    return ctypes.CDLL(None, use_errno=True)


_BDI = "/sys/class/bdi"


def mount(image: str, blob: str, target: str, *, read_ahead_kb: int = 0) -> None:
    """Mount the EROFS `image` read-only at `target`, its file data on `blob` (both
    regular files: the kernel's file-backed mode, Linux 6.12+; no loop devices).

    With `read_ahead_kb`, the new mount's read-ahead is set to it (the kernel's default is
    128 KiB: a mapped library then faults in 128 KiB per blob read). A file-backed EROFS
    mount gets a backing device named `erofs-N` that nothing links to the mount, so the
    new one is the name that appeared across the mount: callers serialize their mounts
    (ErofsLowers does), and a mount by someone else at the same instant leaves both at the
    default (a smaller read-ahead, nothing worse)."""
    before = _erofs_bdis() if read_ahead_kb else set()
    opts = f"device={blob}".encode()
    if _libc().mount(os.fsencode(image), os.fsencode(target), b"erofs", _MS_RDONLY, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t erofs {image} (device {blob}) on {target}: "
                           f"{os.strerror(err)}")
    if read_ahead_kb:
        new = _erofs_bdis() - before
        if len(new) == 1:
            try:
                with open(os.path.join(_BDI, new.pop(), "read_ahead_kb"), "w") as f:
                    f.write(str(read_ahead_kb))
            except OSError:
                pass  # best effort, as for the FUSE mount's


def _erofs_bdis() -> set[str]:
    try:
        return {n for n in os.listdir(_BDI) if n.startswith("erofs-")}
    except OSError:
        return set()


def unmount(target: str) -> None:
    """Detach the mount at `target` (lazily: containers using it keep it until they end);
    nothing mounted there is not an error."""
    if _libc().umount2(os.fsencode(target), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def supported() -> bool:
    """Whether this kernel has EROFS and is 6.12 or later (file-backed mounts)."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    if (major, minor) < (6, 12):
        return False
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "erofs" for line in f if line.strip())
    except OSError:
        return False
