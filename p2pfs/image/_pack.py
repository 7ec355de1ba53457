"""Layer contents -> zstd chunks packed into content-addressed blobs, stored once.

Pure and synchronous: `Packer.store` is the `store` callback of `read_layer`. It cuts a
file into `chunk_size` pieces (a smaller file is one chunk), compresses each into its own
zstd frame (the frame header declares the content size, which the chunk store checks
before inflating), and appends the frames back to back to the pack being built. A pack is
sealed when the next frame would take it past `pack_size` and handed to `seal` with its
index; `<packhex>` is the sha256 of the pack's bytes. Chunk digests are by `chunk_hash`
(BLAKE3 unless told). A chunk whose digest is already stored (in a pack of an earlier
conversion, `known`, or of this one, digested alike) is not stored again.
Memory: one pack buffer and one chunk.

Layout under the layers prefix (docs/FORMAT.md, "Image layers"):
    blobs/<packhex>               the pack
    .p2pfs/packs/<packhex>.json   {"chunks": [[digest, offset, length, size], ...]
                                   [, "hash": "blake3"]}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import zstandard

from ..manifest import CHUNK_HASHES, MAX_CHUNK_SIZE, MAX_STORED_CHUNK, ChunkRef, hasher

#: Chosen by measurement (bench/RESULTS.md, "Image layer chunk size").
DEFAULT_CHUNK_SIZE = 256 * 1024
#: Bounds the memory of a conversion (one pack built, at most two uploading) and the
#: number of objects per layer; large enough that a PUT costs little per byte.
DEFAULT_PACK_SIZE = 16 << 20
ZSTD_LEVEL = 3
PACKS_DIR = "blobs/"
INDEX_DIR = ".p2pfs/packs/"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """Where a chunk's frame lies: `length` bytes at `offset` of pack `pack` (hex); its
    digest (the key it is known under) is by `hash`."""

    pack: str
    offset: int
    length: int
    size: int
    hash: str = "sha256"


Seal = Callable[[str, bytes, list[tuple[str, int, int, int]]], None]


def encode_index(rows: Iterable[tuple[str, int, int, int]], chunk_hash: str = "sha256") -> bytes:
    doc: dict = {"chunks": [list(r) for r in rows]}
    if chunk_hash != "sha256":
        doc["hash"] = chunk_hash
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_index(pack: str, data: bytes) -> dict[str, StoredChunk]:
    """A pack index as `{digest: StoredChunk}`; ValueError if it is not one."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("chunks"), list):
        raise ValueError("not a pack index (no 'chunks' list)")
    chunk_hash = doc.get("hash", "sha256")
    if chunk_hash not in CHUNK_HASHES:
        raise ValueError(f"unknown chunk hash {str(chunk_hash)[:20]!r}")
    out = {}
    for row in doc["chunks"]:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                and _HEX64.fullmatch(row[0])
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row[1:])):
            raise ValueError(f"bad chunk row {str(row)[:100]}")
        sha, offset, length, size = row
        if not (offset >= 0 and 0 < length <= MAX_STORED_CHUNK and 0 < size <= MAX_CHUNK_SIZE):
            raise ValueError(f"chunk row out of range {row}")
        out[sha] = StoredChunk(pack, offset, length, size, chunk_hash)
    return out


def pack_key(pack: str) -> str:
    return PACKS_DIR + pack


def index_key(pack: str) -> str:
    return INDEX_DIR + pack + ".json"


@dataclass(frozen=True, slots=True)
class PackStats:
    chunks: int  # chunk references made
    new_chunks: int
    packs: int  # packs sealed
    stored_bytes: int  # compressed bytes in new packs
    dedup_bytes: int  # plain bytes of chunks that were already stored


class Packer:
    """Chunks, compresses, packs and dedups file contents; see the module docstring.

    `blobs` is the manifest's blob list: `ChunkRef.blob` indexes it. Slots for the pack
    being built are filled when it is sealed, so `blobs` is complete after `finish()`."""

    def __init__(self, seal: Seal, *, known: Mapping[str, StoredChunk] | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, pack_size: int = DEFAULT_PACK_SIZE,
                 level: int = ZSTD_LEVEL, chunk_hash: str = "blake3") -> None:
        self.chunk_hash = chunk_hash
        self._digest = hasher(chunk_hash)  # ValueError for an unknown hash
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}]")
        if pack_size < 1:
            raise ValueError("pack_size must be positive")
        self.chunk_size, self.pack_size = chunk_size, pack_size
        self._seal = seal
        self._known = known or {}
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.blobs: list[str] = []
        self._slot_of: dict[str, int] = {}  # pack hex -> index in blobs
        self._here: dict[str, tuple[int, int, int, int]] = {}  # sha -> (slot, offset, length, size)
        self._pack = bytearray()
        self._pack_hash = hashlib.sha256()
        self._rows: list[tuple[str, int, int, int]] = []
        self._slot = -1  # slot of the pack being built, -1 when none
        self._chunks = self._new = self._packs = self._stored = self._dedup = 0

    def store(self, path: str, size: int, pieces: Iterator[bytes]) -> tuple[ChunkRef, ...]:
        """The chunk references of one file's content (`size` bytes from `pieces`)."""
        refs = []
        buf = bytearray()
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if not buf and len(view) >= self.chunk_size:
                    refs.append(self._chunk(view[: self.chunk_size]))
                    view = view[self.chunk_size:]
                    continue
                take = min(len(view), self.chunk_size - len(buf))
                buf += view[:take]
                view = view[take:]
                if len(buf) == self.chunk_size:
                    refs.append(self._chunk(buf))
                    buf = bytearray()
        if buf:
            refs.append(self._chunk(buf))
        if sum(r.size for r in refs) != size:
            raise ValueError(f"{path!r}: got {sum(r.size for r in refs)} bytes, expected {size}")
        return tuple(refs)

    def finish(self) -> None:
        """Seal the last pack (call once, after the last `store`)."""
        if self._pack:
            self._seal_pack()

    def statistics(self) -> PackStats:
        return PackStats(chunks=self._chunks, new_chunks=self._new, packs=self._packs,
                         stored_bytes=self._stored, dedup_bytes=self._dedup)

    def _chunk(self, data: bytes | bytearray | memoryview) -> ChunkRef:
        self._chunks += 1
        sha = self._digest(data).hexdigest()
        size = len(data)
        algo = self.chunk_hash
        here = self._here.get(sha)
        if here is not None:
            self._dedup += size
            slot, offset, length, _ = here
            return ChunkRef(slot, offset, length, size, "zstd", sha, algo)
        old = self._known.get(sha)
        if old is not None and old.size == size and old.hash == algo:
            self._dedup += size
            return ChunkRef(self._slot_for(old.pack), old.offset, old.length, size, "zstd", sha,
                            algo)
        frame = self._zstd.compress(data)
        if self._pack and len(self._pack) + len(frame) > self.pack_size:
            self._seal_pack()
        if self._slot < 0:
            self._slot = len(self.blobs)
            self.blobs.append("")
        offset = len(self._pack)
        self._pack += frame
        self._pack_hash.update(frame)
        self._rows.append((sha, offset, len(frame), size))
        self._here[sha] = (self._slot, offset, len(frame), size)
        self._new += 1
        self._stored += len(frame)
        return ChunkRef(self._slot, offset, len(frame), size, "zstd", sha, algo)

    def _slot_for(self, pack: str) -> int:
        slot = self._slot_of.get(pack)
        if slot is None:
            slot = self._slot_of[pack] = len(self.blobs)
            self.blobs.append(pack_key(pack))
        return slot

    def _seal_pack(self) -> None:
        pack = self._pack_hash.hexdigest()
        self.blobs[self._slot] = pack_key(pack)
        self._slot_of.setdefault(pack, self._slot)
        data, rows = bytes(self._pack), self._rows
        self._pack, self._rows, self._slot = bytearray(), [], -1
        self._pack_hash = hashlib.sha256()
        self._packs += 1
        self._seal(pack, data, rows)
