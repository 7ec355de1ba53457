"""`publish` (upload a directory and index it) and `index` (index objects in place).

Model files are indexed in place: each object is its own blob and its chunks are raw
ranges of it, so a bucket stays usable by every other tool. The manifest is written last,
so a model appears only once all of its data is in the store.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from pathlib import Path
from typing import Callable

import trio

from .errors import ConfigError, ObjectNotFound
from .manifest import (MANIFEST_KEY, ChunkRef, Entry, Manifest, check_path, chunk_digest, parse,
                       with_starts)
from .origin import Location, Origin

log = logging.getLogger("p2pfs.publish")
Progress = Callable[[int], None]


def hash_chunks(data: bytes | memoryview, chunk_size: int, chunk_hash: str = "sha256") -> list[str]:
    view = memoryview(data)
    return [chunk_digest(chunk_hash, view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)]


def _file_chunks(path: Path, chunk_size: int, chunk_hash: str) -> list[str]:
    out = []
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk_size):
            out.append(chunk_digest(chunk_hash, block))
    return out


def _chunk_refs(blob: int, size: int, chunk_size: int, digests: list[str],
                chunk_hash: str) -> tuple[ChunkRef, ...]:
    refs = []
    for i, d in enumerate(digests):
        off = i * chunk_size
        n = min(chunk_size, size - off)
        refs.append(ChunkRef(blob, off, n, n, "none", d, chunk_hash))
    return tuple(refs)


def _dirs_for(paths: list[str]) -> list[str]:
    dirs = {""}
    for p in paths:
        d = posixpath.dirname(p)
        while d not in dirs:
            dirs.add(d)
            d = posixpath.dirname(d)
    return sorted(dirs)


async def publish(origin: Origin, src: Path, loc: Location, *, chunk_size: int,
                  chunk_hash: str = "blake3", progress: Progress | None = None,
                  concurrency: int = 4) -> Manifest:
    """Upload every file under `src` to `loc` and write its manifest (chunk digests by
    `chunk_hash`: "blake3" makes a v3 manifest, "sha256" one older daemons read too)."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"{src} is not a directory")
    files: list[tuple[str, Path, os.stat_result]] = []
    others: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath, name)
            rel = p.relative_to(src).as_posix()
            if rel.startswith(".p2pfs/") or rel == ".p2pfs":
                continue
            check_path(rel)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                others.append(Entry(path=rel, type="symlink", target=os.readlink(p),
                                    mode=0o777, mtime_ns=st.st_mtime_ns))
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, p, st))
    digests: dict[str, list[str]] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(rel: str, path: Path) -> None:
        async with limiter:
            async with trio.open_nursery() as n:
                n.start_soon(origin.upload_file, loc.prefix + rel, path, progress)
                digests[rel] = await trio.to_thread.run_sync(_file_chunks, path, chunk_size,
                                                             chunk_hash)

    async with trio.open_nursery() as nursery:
        for rel, path, _ in files:
            nursery.start_soon(one, rel, path)
    blobs = tuple(rel for rel, _, _ in files)
    entries = [Entry(path=d, type="dir", mode=0o755) for d in _dirs_for([r for r, _, _ in files] + [e.path for e in others])]
    for i, (rel, _, st) in enumerate(files):
        entries.append(with_starts(Entry(
            path=rel, type="file", mode=st.st_mode & 0o777, size=st.st_size, mtime_ns=st.st_mtime_ns,
            chunks=_chunk_refs(i, st.st_size, chunk_size, digests[rel], chunk_hash))))
    entries.extend(others)
    manifest = Manifest(chunk_size=chunk_size, blobs=blobs, entries=tuple(entries),
                        chunk_hash=chunk_hash)
    await _put_manifest(origin, loc, manifest)
    return manifest


async def index(origin: Origin, loc: Location, *, chunk_size: int, chunk_hash: str = "blake3",
                request_size: int = 16 << 20, concurrency: int = 16,
                progress: Progress | None = None) -> Manifest:
    """Index the objects already under `loc` in place (reads them once, writes nothing but
    the manifest)."""
    objs = [o for o in await origin.list(loc.prefix)
            if not o.key[len(loc.prefix):].startswith(".p2pfs/") and not o.key.endswith("/")]
    if not objs:
        raise ObjectNotFound(f"{loc}: no objects to index")
    request_size = max(chunk_size, request_size // chunk_size * chunk_size)
    limiter = trio.CapacityLimiter(concurrency)
    digests: dict[str, dict[int, list[str]]] = {o.key: {} for o in objs}
    rels = []
    for o in objs:
        rel = o.key[len(loc.prefix):]
        try:
            check_path(rel)
        except Exception:
            log.warning("skipping %s: not a usable path", o.key)
            continue
        rels.append((rel, o))

    async def piece(key: str, off: int, n: int) -> None:
        async with limiter:
            data = await origin.get_range(key, off, n)
        digests[key][off] = await trio.to_thread.run_sync(hash_chunks, data, chunk_size,
                                                          chunk_hash)
        if progress:
            progress(n)

    async with trio.open_nursery() as nursery:
        for _, o in rels:
            for off in range(0, o.size, request_size):
                nursery.start_soon(piece, o.key, off, min(request_size, o.size - off))
    paths = {rel for rel, _ in rels}
    entries = [Entry(path=d, type="dir", mode=0o755) for d in _dirs_for(list(paths))]
    blobs = []
    for rel, o in rels:
        if any(rel.startswith(p + "/") for p in paths if p != rel):
            log.warning("skipping %s: its name is also a directory", o.key)
            continue
        ds = [d for off in sorted(digests[o.key]) for d in digests[o.key][off]]
        entries.append(with_starts(Entry(path=rel, type="file", mode=0o644, size=o.size,
                                         chunks=_chunk_refs(len(blobs), o.size, chunk_size, ds,
                                                            chunk_hash))))
        blobs.append(rel)
    manifest = Manifest(chunk_size=chunk_size, blobs=tuple(blobs), entries=tuple(entries),
                        chunk_hash=chunk_hash)
    await _put_manifest(origin, loc, manifest)
    return manifest


async def _put_manifest(origin: Origin, loc: Location, manifest: Manifest) -> None:
    data = manifest.encode()
    parse(data, source="new manifest")  # never write what we could not read back
    await origin.put(loc.prefix + MANIFEST_KEY, data)
