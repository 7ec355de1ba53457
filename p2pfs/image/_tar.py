"""An OCI layer tar stream -> the layer's tree as manifest entries. Pure and synchronous.

`read_layer(read, store)` reads an uncompressed tar through `read(n)` (at most n bytes, b""
at the end) once, front to back, never seeking, and hands each regular file's content to
`store(path, size, pieces)` as pieces of at most `PIECE` bytes; `store` returns the file's
chunk references. Memory is bounded by the tree itself: headers, PAX records and GNU long
names are capped at `MAX_SPECIAL` bytes, contents are never held here.

The parser is our own (ustar, GNU long names, PAX), not `tarfile`: tarfile reads a PAX or
long-name header of any declared size into memory and reports hostile input as a dozen
different exceptions. What containerd (Go's archive/tar) accepts, this accepts, with the
same choices: PAX global headers are ignored, header-only types carry no data.

Layer semantics (docs/FORMAT.md, "Image layers"): OCI whiteouts become what overlayfs
expects (`.wh.X` -> character device 0:0 named X, `.wh..wh..opq` -> `trusted.overlay.opaque`
= "y" on its directory), unlisted parents are synthesized, a later entry for a path
replaces the earlier one (a directory over a directory merges), and hostile input raises
LayerError: never an entry outside the tree, never another exception.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from ..errors import LayerError
from ..manifest import (MAX_ID, MAX_NAME_BYTES, MAX_OFF, MAX_PATH_BYTES, MAX_RDEV,
                        MAX_XATTR_NAME_BYTES, MAX_XATTR_VALUE_BYTES, ChunkRef, Entry)

BLOCK = 512
#: Largest PAX header or GNU long name we read (Go's archive/tar uses the same bound).
MAX_SPECIAL = 1 << 20
#: Largest piece of file content handed to `store` at once.
PIECE = 1 << 20
#: Entries in one layer: bounds the tree's memory (~1 KiB an entry). The manifest's own
#: limit (64 MiB, about 250k entries of a typical layer: 245 bytes each measured on the
#: torch install) is checked on the result.
MAX_ENTRIES = 500_000
OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_ZERO = bytes(BLOCK)

Read = Callable[[int], bytes]
Store = Callable[[str, int, Iterator[bytes]], "tuple[ChunkRef, ...]"]

_REGULAR = (b"0", b"\0", b"7")
_TYPES = {b"1": "hardlink", b"2": "symlink", b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}


class _Source:
    """The tar stream, read forwards only; knows its offset for error messages."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self.offset = 0

    def _upto(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            data = self._read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def exact(self, n: int, what: str) -> bytes:
        data = self._upto(n)
        if len(data) < n:
            raise LayerError(f"truncated tar stream: {what} ends at byte "
                             f"{self.offset + len(data)}, {n - len(data)} bytes short")
        self.offset += n
        return data

    def block(self) -> bytes | None:
        """The next header block, or None at a clean end of stream."""
        data = self._upto(BLOCK)
        if not data:
            return None
        if len(data) < BLOCK:
            raise LayerError(f"truncated tar stream: a header block at byte {self.offset} "
                             f"has {len(data)} of {BLOCK} bytes")
        self.offset += BLOCK
        return data

    def pieces(self, n: int, what: str) -> Iterator[bytes]:
        left = n
        while left:
            piece = self.exact(min(left, PIECE), what)
            left -= len(piece)
            yield piece

    def skip(self, n: int, what: str) -> None:
        for _ in self.pieces(n, what):
            pass

    def drain(self) -> None:
        while data := self._read(PIECE):
            self.offset += len(data)


def _padding(size: int) -> int:
    return -size % BLOCK


@dataclass(slots=True)
class _Header:
    name: str
    kind: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    linkname: str
    rdev: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _number(raw: bytes, what: str, at: int) -> int:
    if raw[:1] and raw[0] & 0x80:  # GNU base-256: 0x80 then the value, or 0xff and negative
        value = int.from_bytes(raw, "big")
        return value - (1 << 8 * len(raw)) if raw[0] & 0x40 else value - (0x80 << 8 * (len(raw) - 1))
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise LayerError(f"tar header at byte {at}: {what} field {bytes(raw)!r} is not octal")
    return int(text, 8)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LayerError(f"{what} {raw[:200]!r} is not UTF-8") from None


def _cstring(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _parse_header(block: bytes, at: int) -> _Header:
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    try:
        stored = _number(block[148:156], "checksum", at)
    except LayerError:
        stored = -1
    if stored != unsigned and stored != unsigned - 256 * sum(
            1 for b in block[:148] + block[156:] if b & 0x80):  # old tars summed signed chars
        raise LayerError(f"not a tar stream: bad header checksum at byte {at}")
    name = _cstring(block[0:100])
    if block[257:263] == b"ustar\0":  # POSIX: a prefix field (GNU uses those bytes otherwise)
        prefix = _cstring(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    kind = block[156:157]
    return _Header(
        name=_text(name, "entry name"),
        kind=kind,
        mode=_number(block[100:108], "mode", at),
        uid=_number(block[108:116], "uid", at),
        gid=_number(block[116:124], "gid", at),
        mtime_ns=_number(block[136:148], "mtime", at) * 10**9,
        size=_number(block[124:136], "size", at),
        linkname=_text(_cstring(block[157:257]), "link target"),
        rdev=_rdev(_number(block[329:337], "devmajor", at), _number(block[337:345], "devminor", at),
                   at) if kind in (b"3", b"4") else 0,
    )


def _rdev(major: int, minor: int, at: int) -> int:
    # FUSE carries rdev in 32 bits: 12 bits of major, 20 of minor.
    if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
        raise LayerError(f"tar header at byte {at}: device {major}:{minor} is out of range")
    rdev = os.makedev(major, minor)
    assert rdev <= MAX_RDEV
    return rdev


def _pax_records(data: bytes, at: int) -> dict[str, bytes]:
    """`<len> <key>=<value>\\n` records; values stay bytes (xattr values are binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the records
            break
        space = data.find(b" ", pos, pos + 20)
        length = data[pos:space]
        if space < 0 or not length.isdigit():
            raise LayerError(f"bad PAX header at byte {at}: record length {data[pos:pos + 20]!r}")
        end = pos + int(length)
        record = data[space + 1 : end]
        if end > len(data) or end <= space + 1 or not record.endswith(b"\n") or b"=" not in record:
            raise LayerError(f"bad PAX header at byte {at}: malformed record at {pos}")
        key, _, value = record[:-1].partition(b"=")
        out[_text(key, "PAX key")] = value
        pos = end
    return out


def _pax_time(raw: bytes, at: int) -> int:
    text = raw.decode("ascii", "replace")
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(whole) > 20:
        raise LayerError(f"bad PAX header at byte {at}: mtime {raw[:40]!r}")
    return sign * (int(whole) * 10**9 + int((frac[:9] or "0").ljust(9, "0")))


def _pax_int(raw: bytes, key: str, at: int) -> int:
    if not raw.isdigit() or len(raw) > 20:
        raise LayerError(f"bad PAX header at byte {at}: {key} {raw[:40]!r}")
    return int(raw)


def _apply_pax(h: _Header, pax: dict[str, bytes], at: int) -> None:
    for key, value in pax.items():
        if key.startswith("GNU.sparse."):
            raise LayerError(f"{h.name!r}: sparse files are not supported")
        if key.startswith("SCHILY.xattr."):
            h.xattrs[key[len("SCHILY.xattr."):]] = value
        elif not value:
            continue  # an empty value restores the header's own field
        elif key == "path":
            h.name = _text(value, "PAX path")
        elif key == "linkpath":
            h.linkname = _text(value, "PAX linkpath")
        elif key in ("size", "uid", "gid"):
            setattr(h, key, _pax_int(value, key, at))
        elif key == "mtime":
            h.mtime_ns = _pax_time(value, at)


def clean_path(name: str, what: str = "entry") -> str:
    """`name` as a normalized path inside the layer: leading "/" and "./" and repeated or
    trailing slashes dropped, ".." resolved lexically (as containerd does); one that
    climbs out of the root is refused, as are names the kernel would refuse."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise LayerError(f"{what} {name[:200]!r} escapes the layer root")
            parts.pop()
            continue
        if "\0" in part:
            raise LayerError(f"{what} {name[:200]!r} contains NUL")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise LayerError(f"{what} {name[:200]!r} has a name over {MAX_NAME_BYTES} bytes")
        parts.append(part)
    path = "/".join(parts)
    if len(path.encode()) > MAX_PATH_BYTES:
        raise LayerError(f"{what} {name[:200]!r} is over {MAX_PATH_BYTES} bytes")
    return path


class LayerTree:
    """The tree a layer's entries build, with tar's replacement rules and hard links kept
    consistent: a file that hard links point at can be replaced or removed, and one of the
    links then becomes the file (the other names keep the old inode, as on a disk)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max = max_entries
        self._entries: dict[str, Entry] = {"": Entry(path="", type="dir", mode=0o755)}
        self._children: dict[str, set[str]] = {"": set()}
        self._links: dict[str, list[str]] = {}  # file path -> hard links to it, in order
        self._opaque: set[str] = set()
        self._whiteouts: set[str] = set()

    def add(self, e: Entry) -> None:
        if e.path == "":
            if e.type != "dir":
                raise LayerError(f"the layer root is a {e.type} entry, not a directory")
            self._entries[""] = e
            return
        self._parents(e.path)
        old = self._entries.get(e.path)
        if old is not None:
            if old.type == "dir" and e.type == "dir":
                self._entries[e.path] = e  # merge: the children stay
                return
            recreated = e.path in self._whiteouts and e.type == "dir"
            self._remove(e.path)
            if recreated:  # deleted below, made again here: nothing below shows through
                self._opaque.add(e.path)
        if e.type == "hardlink":
            # After the removal, as tar extracts: `ln b a` over an existing `a` that `b`
            # links to keeps the inode, and a link to itself finds nothing.
            e = self._resolve_link(e)
        self._insert(e)

    def whiteout(self, path: str, mtime_ns: int = 0) -> None:
        """`path` deleted in the layers below: a 0:0 character device, as overlayfs writes."""
        self.add(Entry(path=path, type="char", mode=0, rdev=0, mtime_ns=mtime_ns))
        self._whiteouts.add(path)

    def opaque(self, path: str) -> None:
        """Directory `path` hides what the layers below hold in it."""
        if path:
            self._parents(path + "/x")
        self._opaque.add(path)

    def entries(self) -> tuple[Entry, ...]:
        out = []
        for path in sorted(self._entries):
            e = self._entries[path]
            if path in self._opaque:
                e = replace(e, xattrs={**e.xattrs, OPAQUE_XATTR: b"y"})
            out.append(e)
        return tuple(out)

    def _resolve_link(self, e: Entry) -> Entry:
        target = self._entries.get(e.target)
        if target is None:
            raise LayerError(f"hard link {e.path!r} points at {e.target!r}, which the layer "
                             "does not hold at that point (missing, or a link to itself)")
        if target.type == "hardlink":
            target = self._entries[target.target]
        if target.type == "dir":
            raise LayerError(f"hard link {e.path!r} points at directory {e.target!r}")
        if target.type != "file":
            # A hard link to a symlink, device or fifo: a copy of it (the tree shares
            # inodes only between regular files; type, mode and target are the same).
            return replace(target, path=e.path)
        return Entry(path=e.path, type="hardlink", target=target.path, mode=target.mode,
                     uid=target.uid, gid=target.gid, mtime_ns=target.mtime_ns)

    def _parents(self, path: str) -> None:
        missing = []
        parent = posixpath.dirname(path)
        while True:
            e = self._entries.get(parent)
            if e is not None and e.type == "dir":
                break
            if e is not None:
                if parent not in self._whiteouts:
                    raise LayerError(f"{path!r}: its parent {parent!r} is a {e.type}, "
                                     "not a directory")
                # Deleted below and recreated here as a directory: an opaque one.
                self._remove(parent)
                self._opaque.add(parent)
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for d in reversed(missing):
            self._insert(Entry(path=d, type="dir", mode=0o755))

    def _insert(self, e: Entry) -> None:
        if len(self._entries) >= self._max:
            raise LayerError(f"over {self._max} entries in one layer")
        self._entries[e.path] = e
        self._children[posixpath.dirname(e.path)].add(e.path)
        if e.type == "dir":
            self._children[e.path] = set()
        elif e.type == "hardlink":
            self._links.setdefault(e.target, []).append(e.path)

    def _remove(self, path: str) -> None:
        self._children[posixpath.dirname(path)].discard(path)
        stack = [path]
        while stack:  # a subtree, without recursion (paths nest up to ~2000 deep)
            p = stack.pop()
            e = self._entries.pop(p)
            self._whiteouts.discard(p)
            self._opaque.discard(p)
            if e.type == "dir":
                stack.extend(self._children.pop(p))
            elif e.type == "hardlink":
                self._links[e.target].remove(p)
            elif e.type == "file" and self._links.get(p):
                self._promote(e)

    def _promote(self, e: Entry) -> None:
        """File `e` goes; its first hard link becomes the file, the others point at it."""
        heir, *rest = self._links.pop(e.path)
        self._entries[heir] = replace(e, path=heir)
        for link in rest:
            self._entries[link] = replace(self._entries[link], target=heir)
        if rest:
            self._links[heir] = rest


def read_layer(read: Read, store: Store, *, max_entries: int = MAX_ENTRIES) -> tuple[Entry, ...]:
    """The entries of the layer tar `read` yields (root first, sorted by path); reads the
    stream to its end, past the end-of-archive blocks (which must be there), so a caller's
    hash covers it all."""
    src = _Source(read)
    tree = LayerTree(max_entries)
    pax: dict[str, bytes] = {}
    long_name: str | None = None
    long_link: str | None = None
    while (block := src.block()) is not None and block != _ZERO:
        at = src.offset - BLOCK
        h = _parse_header(block, at)
        if h.kind in (b"x", b"g", b"L", b"K"):
            if not 0 <= h.size <= MAX_SPECIAL:
                raise LayerError(f"tar header at byte {at}: a {h.size}-byte "
                                 f"{'PAX' if h.kind in b'xg' else 'GNU long name'} header "
                                 f"(the limit is {MAX_SPECIAL})")
            data = src.exact(h.size, "an extended header")
            src.skip(_padding(h.size), "header padding")
            if h.kind == b"x":
                pax = _pax_records(data, at)
            elif h.kind == b"g":
                _pax_records(data, at)  # checked, then ignored (as containerd does)
            elif h.kind == b"L":
                long_name = _text(_cstring(data), "GNU long name")
            else:
                long_link = _text(_cstring(data), "GNU long link name")
            continue
        if long_name is not None:
            h.name, long_name = long_name, None
        if long_link is not None:
            h.linkname, long_link = long_link, None
        _apply_pax(h, pax, at)
        pax = {}
        _member(src, tree, h, store, at)
    if block is None:
        # Required (every writer puts it there): without it a compressed stream cut short
        # at a member boundary would pass, and zstd's reader reports no truncation.
        raise LayerError(f"truncated tar stream: it ends at byte {src.offset} without the "
                         "end-of-archive blocks")
    src.drain()
    return tree.entries()


def _member(src: _Source, tree: LayerTree, h: _Header, store: Store, at: int) -> None:
    kind = h.kind
    if kind == b"\0" and h.name.endswith("/"):
        kind = b"5"  # old tars mark directories by the trailing slash only
    regular = kind in _REGULAR
    if h.size < 0 or h.size > MAX_OFF:
        raise LayerError(f"{h.name[:200]!r}: size {h.size} is out of range")
    if kind == b"V":  # a volume label: no entry
        src.skip(h.size + _padding(h.size), "a volume label")
        return
    if not regular and kind not in _TYPES:
        what = "sparse file" if kind == b"S" else f"type {kind!r}"
        raise LayerError(f"{h.name[:200]!r} at byte {at}: unsupported tar entry ({what})")
    path = clean_path(h.name)
    for name in (h.uid, h.gid):
        if not 0 <= name <= MAX_ID:
            raise LayerError(f"{path!r}: owner id {name} is out of range")
    base = posixpath.basename(path)
    if base.startswith(_WHITEOUT):
        if regular:
            src.skip(h.size + _padding(h.size), f"whiteout {path!r}")
        _whiteout(tree, path, h.mtime_ns)
        return
    meta = dict(mode=h.mode & 0o7777, uid=h.uid, gid=h.gid,
                mtime_ns=min(max(h.mtime_ns, 0), MAX_OFF), xattrs=_xattrs(path, h.xattrs))
    if regular:
        chunks = store(path, h.size, src.pieces(h.size, f"file {path!r}"))
        src.skip(_padding(h.size), "file padding")
        tree.add(Entry(path=path, type="file", size=h.size, chunks=chunks,
                       starts=_starts(chunks), **meta))
        return
    etype = _TYPES[kind]
    if etype == "symlink":
        if not h.linkname or "\0" in h.linkname or len(h.linkname.encode()) > MAX_PATH_BYTES:
            raise LayerError(f"symlink {path!r}: unusable target {h.linkname[:200]!r}")
        tree.add(Entry(path=path, type="symlink", target=h.linkname,
                       size=len(h.linkname.encode()), **meta))
    elif etype == "hardlink":
        tree.add(Entry(path=path, type="hardlink", target=clean_path(h.linkname, "hard link target"),
                       **meta))
    else:
        tree.add(Entry(path=path, type=etype, rdev=h.rdev, **meta))


def _whiteout(tree: LayerTree, path: str, mtime_ns: int) -> None:
    parent, base = posixpath.split(path)
    if base == _OPAQUE:
        tree.opaque(parent)
    elif base.startswith(_WHITEOUT + _WHITEOUT):
        return  # other AUFS metadata (.wh..wh.plnk, ...): skipped, as containerd does
    else:
        name = base[len(_WHITEOUT):]
        if name in ("", ".", ".."):
            raise LayerError(f"whiteout {path!r} names no entry")
        tree.whiteout(posixpath.join(parent, name), min(max(mtime_ns, 0), MAX_OFF))


def _xattrs(path: str, raw: dict[str, bytes]) -> dict[str, bytes]:
    for name, value in raw.items():
        if not name or "\0" in name or len(name.encode()) > MAX_XATTR_NAME_BYTES:
            raise LayerError(f"{path!r}: unusable xattr name {name[:200]!r}")
        if len(value) > MAX_XATTR_VALUE_BYTES:
            raise LayerError(f"{path!r}: xattr {name!r} is over {MAX_XATTR_VALUE_BYTES} bytes")
    return raw


def _starts(chunks: tuple[ChunkRef, ...]) -> tuple[int, ...]:
    starts, pos = [], 0
    for c in chunks:
        starts.append(pos)
        pos += c.size
    return tuple(starts)
