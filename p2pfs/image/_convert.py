"""Converting one layer blob and publishing it under a layers prefix ROOT.

`convert_layer` reads the blob once, in a worker thread: the raw bytes are hashed (the
layer's digest), inflated (gzip, zstd or plain), hashed again (the diff id), parsed
(`_tar`) and chunked into packs (`_pack`). Packs go to the store from the trio side
through an unbuffered channel, so at most two are in memory (one built, one uploading);
each pack's index follows its pack, and the layer's manifest is written last, only when the
digest is the expected one: a layer appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
import zlib
from dataclasses import asdict, dataclass
from typing import BinaryIO, Callable

import trio
import zstandard

from ..errors import LayerError, ManifestError, ObjectNotFound
from ..manifest import MANIFEST_KEY, Manifest, parse
from ..origin import Location, Origin
from ._pack import (DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, INDEX_DIR, Packer, StoredChunk,
                    encode_index, index_key, pack_key, parse_index)
from ._tar import read_layer

log = logging.getLogger("p2pfs.image")
Progress = Callable[[int], None]

READ_SIZE = 1 << 20
MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
_CODEC_MEDIA = {"plain": MEDIA_TAR, "gzip": MEDIA_TAR + "+gzip", "zstd": MEDIA_TAR + "+zstd"}
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
ANN_DIGEST = "org.p2pfs.layer.digest"
ANN_DIFF_ID = "org.p2pfs.layer.diff-id"
ANN_MEDIA_TYPE = "org.p2pfs.layer.media-type"
ANN_SIZE = "org.p2pfs.layer.compressed-size"


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerResult:
    digest: str  # "sha256:<hex>" of the blob: the layer's directory is <hex>
    manifest_digest: str
    diff_id: str  # sha256 of the uncompressed tar
    entries: int
    files: int
    bytes_in: int  # uncompressed tar bytes read (0 when the layer existed)
    blob_bytes: int
    stored_bytes: int  # compressed bytes of the new packs uploaded
    dedup_bytes: int  # file content already stored, not uploaded again
    seconds: float
    existed: bool = False  # the layer was already converted: nothing was read or written

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_json(self) -> dict:
        return asdict(self)


def manifest_key(root: Location, hex_: str) -> str:
    return f"{root.prefix}{hex_}/{MANIFEST_KEY}"


async def layer_exists(origin: Origin, root: Location, hex_: str) -> bool:
    """Whether layer `<hex>` has its manifest under `root` (so it is complete)."""
    try:
        await origin.head(manifest_key(root, hex_))
    except ObjectNotFound:
        return False
    return True


def codec_of(media_type: str) -> str:
    """"gzip", "zstd" or "plain" for an OCI or Docker layer media type."""
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith(".tar"):
        return "plain"
    raise LayerError(f"unsupported layer media type {media_type!r} (tar, tar+gzip, tar+zstd)")


async def convert_layer(origin: Origin, root: Location, open_blob: Callable[[], BinaryIO], *,
                        media_type: str | None = None, expected_digest: str | None = None,
                        progress: Progress | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        pack_size: int = DEFAULT_PACK_SIZE,
                        chunk_hash: str = "blake3") -> LayerResult:
    """Convert the layer blob `open_blob()` returns and publish it under `root`.

    `progress(n)` is called with the blob bytes read. With `expected_digest`, a layer
    already converted is answered from its manifest without reading the blob, and a blob
    of another digest raises LayerError and publishes no manifest (packs it stored stay,
    harmless: content addressed, and later conversions may use them)."""
    t0 = time.monotonic()
    want = None
    if expected_digest is not None:
        m = _DIGEST.fullmatch(expected_digest)
        if not m:
            raise LayerError(f"expected digest {expected_digest!r} is not sha256:<64 hex digits>")
        want = m.group(1)
        done = await _existing(origin, root, want, t0)
        if done is not None:
            return done
    codec = codec_of(media_type) if media_type is not None else None
    known = await load_known(origin, root)
    send, recv = trio.open_memory_channel(0)  # unbuffered: one pack uploading, one being built

    def seal(pack: str, data: bytes, rows: list) -> None:
        trio.from_thread.run(send.send, (pack, data, rows))

    packer = Packer(seal, known=known, chunk_size=chunk_size, pack_size=pack_size,
                    chunk_hash=chunk_hash)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_upload_packs, origin, root, recv, chunk_hash)
            async with send:
                job = await trio.to_thread.run_sync(_read_blob, open_blob, codec, packer,
                                                    _from_thread(progress))
    except BaseExceptionGroup as group:
        raise _single(group) from None
    hex_ = job.digest.removeprefix("sha256:")
    if want is not None and hex_ != want:
        raise LayerError(f"layer blob digest is {job.digest}, expected {expected_digest}: "
                         "not published")
    manifest = Manifest(
        kind="layer", blob_root="..", chunk_size=packer.chunk_size, blobs=tuple(packer.blobs),
        entries=job.entries, chunk_hash=chunk_hash,
        annotations={ANN_DIGEST: job.digest, ANN_DIFF_ID: job.diff_id,
                     ANN_MEDIA_TYPE: media_type or _CODEC_MEDIA[job.codec],
                     ANN_SIZE: str(job.blob_bytes)})
    data = manifest.encode()
    try:
        parse(data, source="new layer manifest")  # never publish what we could not read back
    except ManifestError as exc:
        raise LayerError(f"layer {job.digest}: {exc}") from None
    existed = await layer_exists(origin, root, hex_)
    if existed:
        log.info("layer %s was converted meanwhile; its manifest is kept", job.digest)
    else:
        await origin.put(manifest_key(root, hex_), data)
    stats = packer.statistics()
    return LayerResult(
        digest=job.digest, manifest_digest=manifest.digest, diff_id=job.diff_id,
        entries=len(job.entries), files=sum(1 for _ in manifest.files()),
        bytes_in=job.tar_bytes, blob_bytes=job.blob_bytes, stored_bytes=stats.stored_bytes,
        dedup_bytes=stats.dedup_bytes, seconds=round(time.monotonic() - t0, 3), existed=existed)


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one error a nursery of this module wrapped (the uploader or the worker)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _existing(origin: Origin, root: Location, hex_: str, t0: float) -> LayerResult | None:
    try:
        data = await origin.get(manifest_key(root, hex_))
    except ObjectNotFound:
        return None
    try:
        m = parse(data, source=manifest_key(root, hex_))
    except ManifestError as exc:
        raise LayerError(f"layer sha256:{hex_} has a manifest that does not parse ({exc}); "
                         "delete it to convert again") from None
    ann = m.annotations
    size = ann.get(ANN_SIZE, "")
    return LayerResult(
        digest="sha256:" + hex_, manifest_digest=m.digest, diff_id=ann.get(ANN_DIFF_ID, ""),
        entries=len(m.entries), files=sum(1 for _ in m.files()), bytes_in=0,
        blob_bytes=int(size) if size.isdigit() else 0,
        stored_bytes=0, dedup_bytes=0, seconds=round(time.monotonic() - t0, 3), existed=True)


async def load_known(origin: Origin, root: Location, *, concurrency: int = 16) -> dict[str, StoredChunk]:
    """Every chunk the pack indexes under `root` list: what a conversion need not store.
    An index that does not parse is skipped (its chunks are then stored again)."""
    objs = [o for o in await origin.list(root.prefix + INDEX_DIR) if o.key.endswith(".json")]
    known: dict[str, StoredChunk] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(key: str) -> None:
        pack = key[len(root.prefix + INDEX_DIR):-len(".json")]
        async with limiter:
            data = await origin.get(key)
        try:
            known.update(parse_index(pack, data))
        except ValueError as exc:
            log.warning("skipping pack index %s: %s", key, exc)

    async with trio.open_nursery() as nursery:
        for o in objs:
            nursery.start_soon(one, o.key)
    return known


async def _upload_packs(origin: Origin, root: Location, recv: trio.MemoryReceiveChannel,
                        chunk_hash: str) -> None:
    async with recv:
        async for pack, data, rows in recv:
            await origin.put(root.prefix + pack_key(pack), data)
            await origin.put(root.prefix + index_key(pack), encode_index(rows, chunk_hash))


def _from_thread(progress: Progress | None) -> Progress | None:
    if progress is None:
        return None
    return lambda n: trio.from_thread.run_sync(progress, n)


@dataclass(frozen=True, slots=True)
class _Job:
    digest: str
    diff_id: str
    codec: str
    entries: tuple
    blob_bytes: int
    tar_bytes: int


class _Hashed:
    """A stream read through sha256, counting; `peek` keeps bytes for the next read."""

    def __init__(self, read: Callable[[int], bytes], progress: Progress | None = None) -> None:
        self._read, self._progress = read, progress
        self._hash = hashlib.sha256()
        self._ahead = b""
        self.count = 0

    def peek(self, n: int) -> bytes:
        while len(self._ahead) < n and (more := self._read(n - len(self._ahead))):
            self._ahead += more
        return self._ahead[:n]

    def read(self, n: int = READ_SIZE) -> bytes:
        if self._ahead:
            data, self._ahead = self._ahead[:n], self._ahead[n:]
        else:
            data = self._read(n)
        if data:
            self._hash.update(data)
            self.count += len(data)
            if self._progress:
                self._progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _Gunzip:
    """gzip (one or more members) inflated in bounded pieces."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in = b""
        self._done = False

    def read(self, n: int) -> bytes:
        while not self._done:
            if not self._in:
                self._in = self._read(READ_SIZE)
                if not self._in:
                    raise LayerError("truncated gzip stream")
            try:
                out = self._z.decompress(self._in, n)
            except zlib.error as exc:
                raise LayerError(f"bad gzip data: {exc}") from None
            self._in = self._z.unconsumed_tail
            if self._z.eof:
                rest = self._z.unused_data + self._in
                if len(rest) < 2:
                    rest += self._read(2)
                if rest.startswith(_GZIP_MAGIC):
                    self._z, self._in = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
                else:  # the end (trailing bytes, if any, are hashed but not read as tar)
                    self._done = True
            if out:
                return out
        return b""


class _Unzstd:
    def __init__(self, raw: _Hashed) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_SIZE,
                                                                  read_across_frames=True)

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise LayerError(f"bad zstd data: {exc}") from None


def _read_blob(open_blob: Callable[[], BinaryIO], codec: str | None, packer: Packer,
               progress: Progress | None) -> _Job:
    """The worker thread: everything blocking or CPU-bound of one conversion."""
    with contextlib.closing(open_blob()) as f:
        raw = _Hashed(f.read, progress)
        if codec is None:
            head = raw.peek(4)
            codec = "gzip" if head.startswith(_GZIP_MAGIC) else "zstd" if head == _ZSTD_MAGIC \
                else "plain"
        inflated = raw if codec == "plain" else _Gunzip(raw.read) if codec == "gzip" \
            else _Unzstd(raw)
        tar = raw if codec == "plain" else _Hashed(inflated.read)
        entries = read_layer(tar.read, packer.store)
        packer.finish()
        raw.drain()
    return _Job(digest=raw.digest, diff_id=tar.digest, codec=codec, entries=entries,
                blob_bytes=raw.count, tar_bytes=tar.count)
