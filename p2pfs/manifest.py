"""Manifest format v1-v3: a file tree plus, per regular file, its ordered chunk references.

Pure code: bytes in, validated objects out, and back. The on-disk/on-wire layout is
documented in docs/FORMAT.md; keep the two in step.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import posixpath
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import blake3

from .errors import ManifestError

FORMAT_NAME = "p2pfs-manifest"
FORMAT_VERSION = 1
#: Version 2 is version 1 plus `blob_root` (blob keys relative to a prefix other than the
#: manifest's own): a v1 reader must refuse it rather than look for blobs in the wrong place.
#: Version 3 adds `chunk_hash` (chunk digests by BLAKE3): a v1/v2 reader must refuse it
#: rather than check BLAKE3 digests as sha256 and fail every read.
FORMAT_VERSIONS = (1, 2, 3)
#: How chunk digests are taken (`ChunkRef.hash`); one per manifest. "sha256" is what v1 and
#: v2 manifests hold; "blake3" is 2-2.5x cheaper per byte here (bench/RESULTS.md).
CHUNK_HASHES = ("sha256", "blake3")
#: Where blob keys are relative to: "." the manifest's prefix (models), ".." its parent
#: (image layers: packs shared by every layer under one layers prefix).
BLOB_ROOTS = (".", "..")
#: Where a manifest lives, relative to the prefix it describes.
MANIFEST_KEY = ".p2pfs/manifest.json"
#: A manifest bigger than this is refused before it is downloaded (its size comes from the
#: listing or a HEAD) and before parsing. 64 MiB holds ~500k chunk refs (4 PB of weights
#: at 8 MiB chunks) or an image layer of ~300k files. Parsing costs about 3x its size in
#: memory (measured: 43 MiB of chunk refs, +122 MiB peak RSS, 2.7 s), so the bound is also
#: the daemon's worst case per manifest (~200 MiB, transient).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: Largest chunk (uncompressed) a manifest may name. Every buffer the daemon allocates for
#: one chunk is bounded by this, whatever a manifest says; `p2pfs publish` uses 8 MiB.
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: Largest stored (compressed) chunk: zstd's worst-case expansion is far below 1/64.
MAX_STORED_CHUNK = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE // 64
#: Ranges the kernel and Python's C types accept (pyfuse3 raises OverflowError past them,
#: inside a FUSE handler): uid_t/gid_t are 32 bits (2**32-1 means "none"), off_t and the
#: nanosecond timestamps are signed 64 bits, FUSE carries rdev in 32 bits.
MAX_ID = 2**32 - 2
MAX_OFF = 2**63 - 1
MAX_RDEV = 2**32 - 1
#: Linux limits: NAME_MAX, PATH_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
MAX_XATTR_NAME_BYTES = 255
MAX_XATTR_VALUE_BYTES = 65536

Buffer = bytes | bytearray | memoryview

ENTRY_TYPES = ("file", "dir", "symlink", "hardlink", "char", "block", "fifo")
COMPRESSIONS = ("none", "zstd")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """`size` bytes of file content, stored as `length` bytes at `offset` of blob `blob`;
    `digest` (64 lowercase hex) is the `hash` of those bytes, uncompressed: the chunk's
    identity in every cache."""

    blob: int
    offset: int
    length: int
    size: int
    compression: str
    digest: str
    hash: str = "sha256"


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    path: str  # "" is the root
    type: str
    mode: int = 0o644  # permission bits only; the type comes from `type`
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""  # symlink target, or the path a hard link points to
    rdev: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    chunks: tuple[ChunkRef, ...] = ()
    # Start offset of each chunk within the file, derived (not serialized).
    starts: tuple[int, ...] = ()

    @property
    def st_mode(self) -> int:
        return _TYPE_BITS[self.type] | (self.mode & 0o7777)

    def chunk_index(self, offset: int) -> int:
        """Index of the chunk holding byte `offset` (0 <= offset < size)."""
        return bisect.bisect_right(self.starts, offset) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    chunk_size: int
    blobs: tuple[str, ...]
    entries: tuple[Entry, ...]
    kind: str = "model"
    annotations: Mapping[str, str] = field(default_factory=dict)
    blob_root: str = "."
    chunk_hash: str = "sha256"

    @property
    def version(self) -> int:
        if self.chunk_hash != "sha256":
            return 3
        return 1 if self.blob_root == "." else 2

    def blob_prefix(self, prefix: str) -> str:
        """The object key prefix this manifest's blob keys are relative to, for a manifest
        stored under `prefix` ("" or ending in "/")."""
        if self.blob_root == ".":
            return prefix
        if not prefix:
            raise ManifestError("a manifest with blob_root '..' must be under a prefix")
        parent = posixpath.dirname(prefix.rstrip("/"))
        return parent + "/" if parent else ""

    def encode(self) -> bytes:
        """Canonical bytes: what is stored and what the digest is taken over."""
        return _canonical(_to_json(self))

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.encode()).hexdigest()

    def files(self) -> Iterable[Entry]:
        return (e for e in self.entries if e.type == "file")

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files())


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _to_json(m: Manifest) -> dict[str, Any]:
    entries = []
    for e in m.entries:
        d: dict[str, Any] = {"path": e.path, "type": e.type, "mode": e.mode}
        if e.uid:
            d["uid"] = e.uid
        if e.gid:
            d["gid"] = e.gid
        if e.mtime_ns:
            d["mtime_ns"] = e.mtime_ns
        if e.type == "file":
            if any(c.hash != m.chunk_hash for c in e.chunks):
                raise ValueError(f"{e.path!r}: chunk digests not by the manifest's chunk_hash "
                                 f"{m.chunk_hash!r}")
            d["size"] = e.size
            d["chunks"] = [
                [c.blob, c.offset, c.length, c.size, c.compression, c.digest] for c in e.chunks
            ]
        if e.target:
            d["target"] = e.target
        if e.rdev:
            d["rdev"] = e.rdev
        if e.xattrs:
            d["xattrs"] = {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()}
        entries.append(d)
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": m.version,
        "kind": m.kind,
        "chunk_size": m.chunk_size,
        "blobs": list(m.blobs),
        "entries": entries,
        "annotations": dict(m.annotations),
    }
    if m.blob_root != ".":
        doc["blob_root"] = m.blob_root
    if m.chunk_hash != "sha256":
        doc["chunk_hash"] = m.chunk_hash
    return doc


def hasher(chunk_hash: str) -> Callable[[Buffer], Any]:
    """The constructor of a `chunk_hash` hash object (`.update`, `.hexdigest`); both release
    the GIL while hashing a large buffer."""
    if chunk_hash == "sha256":
        return hashlib.sha256
    if chunk_hash == "blake3":
        return blake3.blake3
    raise ValueError(f"unknown chunk hash {chunk_hash!r} (one of {CHUNK_HASHES})")


def chunk_digest(chunk_hash: str, data: Buffer) -> str:
    """The digest a chunk ref holds for plain bytes `data`."""
    return hasher(chunk_hash)(data).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse(data: bytes, *, expected_digest: str | None = None, source: str = "manifest") -> Manifest:
    """Validate and parse manifest bytes. Raises ManifestError naming what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: {len(data)} bytes is over the {MAX_MANIFEST_BYTES} limit")
    if expected_digest is not None and digest_of(data) != expected_digest:
        raise ManifestError(f"{source}: digest {digest_of(data)} is not the pinned {expected_digest}")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ManifestError(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers over 4300 digits
        raise ManifestError(f"{source}: not valid JSON ({_short(exc)})") from None
    try:
        return _from_json(doc)
    except ManifestError as exc:
        raise ManifestError(f"{source}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, RecursionError) as exc:
        raise ManifestError(f"{source}: malformed ({type(exc).__name__}: {_short(exc)})") from None


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(msg)


def _int(d: Mapping[str, Any], key: str, default: int | None = None, *, minimum: int = 0,
         maximum: int = MAX_OFF) -> int:
    v = d.get(key, default)
    _need(isinstance(v, int) and not isinstance(v, bool), f"{key!r} must be an integer, got {_brief(v)}")
    _need(minimum <= v <= maximum, f"{key!r} must be in [{minimum}, {maximum}], got {_brief(v)}")
    return v


def _brief(v: Any) -> str:
    """repr of a value for an error message, cut short (an integer may have 4000 digits)."""
    try:
        text = repr(v)
    except ValueError:  # int too large to print
        return f"an integer of over {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= 200 else text[:200] + "..."


def _utf8(text: str, what: str, limit: int) -> bytes:
    """`text` as the UTF-8 bytes the kernel will see; lone surrogates and over-long names
    are refused here rather than failing later in a FUSE handler."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{what} {_brief(text)} is not valid Unicode (lone surrogate)") from None
    _need(len(raw) <= limit, f"{what} {_brief(text)} is over {limit} bytes")
    return raw


def check_path(path: str, what: str = "path") -> str:
    _need(isinstance(path, str), f"{what} must be a string")
    if path == "":
        return path
    _utf8(path, what, MAX_PATH_BYTES)
    _need(not path.startswith("/") and "\0" not in path, f"{what} {_brief(path)} must be relative")
    parts = path.split("/")
    _need(all(p not in ("", ".", "..") for p in parts), f"{what} {_brief(path)} is not normalized")
    _need(all(len(p.encode()) <= MAX_NAME_BYTES for p in parts),
          f"{what} {_brief(path)} has a name over {MAX_NAME_BYTES} bytes")
    return path


def _from_json(doc: Any) -> Manifest:
    _need(isinstance(doc, dict), "top level must be an object")
    _need(doc.get("format") == FORMAT_NAME, f"'format' must be {FORMAT_NAME!r}")
    version = doc.get("version")
    _need(version in FORMAT_VERSIONS and not isinstance(version, bool),
          f"unsupported version {_brief(version)} (this p2pfs reads {', '.join(map(str, FORMAT_VERSIONS))})")
    blob_root = doc.get("blob_root", ".")
    _need(blob_root in BLOB_ROOTS, f"'blob_root' must be one of {BLOB_ROOTS}, got {_brief(blob_root)}")
    chunk_hash = doc.get("chunk_hash", "sha256")
    _need(chunk_hash in CHUNK_HASHES,
          f"'chunk_hash' must be one of {CHUNK_HASHES}, got {_brief(chunk_hash)}")
    _need(version == (3 if chunk_hash != "sha256" else 1 if blob_root == "." else 2),
          f"version {version} with blob_root {blob_root!r} and chunk_hash {chunk_hash!r}: "
          "version 3 is exactly the manifests whose chunk_hash is not sha256, version 2 the "
          "other ones whose blob_root is not '.'")
    chunk_size = _int(doc, "chunk_size", minimum=1, maximum=MAX_CHUNK_SIZE)
    blobs = doc.get("blobs", [])
    _need(isinstance(blobs, list), "'blobs' must be a list")
    for b in blobs:
        check_path(b, "blob key")
        _need(b != "", "blob key must not be empty")
    raw_entries = doc.get("entries")
    _need(isinstance(raw_entries, list), "'entries' must be a list")
    annotations = doc.get("annotations", {})
    _need(isinstance(annotations, dict), "'annotations' must be an object")
    for k, v in annotations.items():
        _need(isinstance(v, str), f"annotation {_brief(k)} must be a string")
        _utf8(k, "annotation key", MAX_PATH_BYTES)
        _utf8(v, f"annotation {_brief(k)}", MAX_XATTR_VALUE_BYTES)
    kind = doc.get("kind", "model")
    _need(isinstance(kind, str) and bool(re.fullmatch(r"[a-z][a-z0-9-]{0,31}", kind)),
          f"'kind' must be a short lowercase name, got {_brief(kind)}")

    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for raw in raw_entries:
        _need(isinstance(raw, dict), "each entry must be an object")
        e = _entry(raw, len(blobs), chunk_hash)
        _need(e.path not in seen, f"duplicate path {_brief(e.path)}")
        seen[e.path] = e.type
        entries.append(e)
    for e in entries:
        # The nearest listed ancestor must be a directory (unlisted ones are synthesized).
        parent = posixpath.dirname(e.path) if e.path else None
        while parent is not None and parent not in seen:
            parent = posixpath.dirname(parent) if parent else None
        if parent is not None:
            _need(seen[parent] == "dir", f"parent of {_brief(e.path)} is not a directory")
        if e.type == "hardlink":
            _need(seen.get(e.target) == "file", f"hard link {_brief(e.path)} must point at a file")
    return Manifest(
        chunk_size=chunk_size,
        blobs=tuple(blobs),
        entries=tuple(entries),
        kind=kind,
        annotations=dict(annotations),
        blob_root=blob_root,
        chunk_hash=chunk_hash,
    )


def _entry(raw: Mapping[str, Any], nblobs: int, chunk_hash: str = "sha256") -> Entry:
    path = check_path(raw.get("path"), "entry path")
    etype = raw.get("type")
    _need(etype in ENTRY_TYPES, f"{_brief(path)}: unknown type {_brief(etype)}")
    xattrs_raw = raw.get("xattrs", {})
    _need(isinstance(xattrs_raw, dict), f"{_brief(path)}: 'xattrs' must be an object")
    xattrs = {}
    for k, v in xattrs_raw.items():
        _need(k != "" and "\0" not in k, f"{_brief(path)}: empty xattr name or NUL in it")
        _utf8(k, f"{_brief(path)}: xattr name", MAX_XATTR_NAME_BYTES)
        _need(isinstance(v, str), f"{_brief(path)}: xattr {_brief(k)} must be a base64 string")
        xattrs[k] = base64.b64decode(v, validate=True)
        _need(len(xattrs[k]) <= MAX_XATTR_VALUE_BYTES,
              f"{_brief(path)}: xattr {_brief(k)} is over {MAX_XATTR_VALUE_BYTES} bytes")
    target = raw.get("target", "")
    _need(isinstance(target, str), f"{_brief(path)}: 'target' must be a string")
    if etype == "symlink":
        _need(target != "", f"{_brief(path)}: symlink without a target")
        _need("\0" not in target, f"{_brief(path)}: NUL in symlink target")
        _utf8(target, f"{_brief(path)}: symlink target", MAX_PATH_BYTES)
    if etype == "hardlink":
        check_path(target, f"{_brief(path)}: hard link target")
    _need(path != "" or etype == "dir", "the root entry must be a directory")
    chunks: tuple[ChunkRef, ...] = ()
    starts: tuple[int, ...] = ()
    size = 0
    if etype == "file":
        size = _int(raw, "size", maximum=MAX_OFF)
        chunks, starts = _chunks(path, raw.get("chunks", []), size, nblobs, chunk_hash)
    elif etype == "symlink":
        size = len(target.encode())
    return Entry(
        path=path,
        type=etype,
        mode=_int(raw, "mode", 0o755 if etype == "dir" else 0o644) & 0o7777,
        uid=_int(raw, "uid", 0, maximum=MAX_ID),
        gid=_int(raw, "gid", 0, maximum=MAX_ID),
        mtime_ns=_int(raw, "mtime_ns", 0, maximum=MAX_OFF),
        size=size,
        target=target,
        rdev=_int(raw, "rdev", 0, maximum=MAX_RDEV),
        xattrs=xattrs,
        chunks=chunks,
        starts=starts,
    )


def _chunks(path: str, raw: Any, size: int, nblobs: int,
            chunk_hash: str) -> tuple[tuple[ChunkRef, ...], tuple[int, ...]]:
    _need(isinstance(raw, list), f"{_brief(path)}: 'chunks' must be a list")
    refs, starts, pos = [], [], 0
    for i, c in enumerate(raw):
        _need(isinstance(c, list) and len(c) == 6, f"{_brief(path)}: chunk {i} must be a 6-item list")
        blob, offset, length, csize, comp, digest = c
        for name, v in (("blob", blob), ("offset", offset), ("length", length), ("size", csize)):
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  f"{_brief(path)}: chunk {i} {name} must be a non-negative integer")
        _need(blob < nblobs, f"{_brief(path)}: chunk {i} names blob {_brief(blob)} of {nblobs}")
        _need(0 < csize <= MAX_CHUNK_SIZE, f"{_brief(path)}: chunk {i} size must be in [1, {MAX_CHUNK_SIZE}]")
        _need(0 < length <= MAX_STORED_CHUNK,
              f"{_brief(path)}: chunk {i} stored length must be in [1, {MAX_STORED_CHUNK}]")
        _need(offset + length <= MAX_OFF, f"{_brief(path)}: chunk {i} ends past 2**63")
        _need(comp in COMPRESSIONS, f"{_brief(path)}: chunk {i} has unknown compression {_brief(comp)}")
        _need(comp != "none" or length == csize, f"{_brief(path)}: raw chunk {i} length != size")
        _need(isinstance(digest, str) and bool(_HEX64.match(digest)),
              f"{_brief(path)}: chunk {i} digest must be 64 lowercase hex digits")
        refs.append(ChunkRef(blob, offset, length, csize, comp, digest, chunk_hash))
        starts.append(pos)
        pos += csize
    _need(pos == size, f"{_brief(path)}: chunks cover {pos} bytes but size is {size}")
    return tuple(refs), tuple(starts)


def with_starts(entry: Entry) -> Entry:
    """Return `entry` with `starts` derived from its chunks (for entries built in code)."""
    starts, pos = [], 0
    for c in entry.chunks:
        starts.append(pos)
        pos += c.size
    return Entry(**{**{f: getattr(entry, f) for f in Entry.__dataclass_fields__}, "starts": tuple(starts)})
