"""Checking chunks against their manifest digests. Pure and CPU-bound: run in a thread."""

from __future__ import annotations

import hashlib

import xxhash
import zstandard

from ..errors import IntegrityError
from ..plan import ChunkLoc

Buffer = bytes | bytearray | memoryview


def _inflate(loc: ChunkLoc, stored: Buffer, source: str) -> bytes:
    ref = loc.ref
    try:
        # zstd allocates what the frame header declares and ignores max_output_size
        # then: a 65 KB frame may declare 2 GiB. Check the declaration first, so memory
        # per chunk is bounded by the manifest's (bounded) size.
        declared = zstandard.frame_content_size(stored)
        if declared not in (-1, ref.size):
            raise IntegrityError(f"{loc.key}@{ref.offset}: zstd frame declares {declared} "
                                 f"bytes, the manifest {ref.size}", source=source)
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=ref.size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{loc.key}@{ref.offset}: bad zstd frame ({exc})",
                             source=source) from None


def check_plain(loc: ChunkLoc, data: Buffer, source: str = "origin") -> None:
    """Raise IntegrityError unless `data` is the chunk's plain content."""
    ref = loc.ref
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        where = "the store returned bad data, or the object changed since it was indexed " \
                "(re-run `p2pfs index`)" if source == "origin" else f"sent by {source}"
        raise IntegrityError(f"{loc.key}@{ref.offset}+{ref.length}: sha256 mismatch ({where})",
                             source=source)


def place_verified(loc: ChunkLoc, stored: Buffer, dest: memoryview, source: str = "origin") -> str:
    """Put the plain, checked bytes of a chunk stored as `stored` into `dest` (which may be
    `stored` itself: a raw chunk received in place) and return their xxh3, the name the
    disk cache files them under. Nothing unchecked is left in `dest` on success; on an
    IntegrityError `dest` holds garbage that nobody may read."""
    if loc.ref.compression == "zstd":
        plain = _inflate(loc, stored, source)
        check_plain(loc, plain, source)
        dest[:] = plain
    else:
        if stored is not dest:
            dest[:] = stored
        check_plain(loc, dest, source)
    return xxhash.xxh3_64_hexdigest(dest)
