"""Whole images: resolve a reference on its registry, convert every layer that is not
converted yet (`convert_layer`, at most `concurrency` at a time), then write the image
record `ROOT/.p2pfs/images/<manifest hex>.json` (docs/FORMAT.md, "Image records").

The registry client blocks, so it runs in worker threads; a layer's blob is opened by
`convert_layer` in its own thread through the `open_blob` callable handed to it. A layer
whose stream breaks (`RegistryUnavailable`) is converted again from the start, up to
`attempts` times; one that fails for good cancels the others and its error is raised as
itself (not wrapped in an exception group). The record is written last, once every layer's
manifest exists, so a record always names complete layers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio

from ..errors import P2PFSError, RegistryUnavailable
from ..origin import Location, Origin
from ._convert import LayerResult, convert_layer
from ._oci import Descriptor, ImageManifest, Platform, Reference, parse_reference, unique_layers
from ._registry import Registry

log = logging.getLogger("p2pfs.image")

IMAGES_DIR = ".p2pfs/images/"
RECORD_VERSION = 1

ProgressFn = Callable[[int], Any]


def record_key(root: Location, manifest_digest: str) -> str:
    return f"{root.prefix}{IMAGES_DIR}{manifest_digest.split(':', 1)[1]}.json"


@dataclass(frozen=True, slots=True)
class ImageLayer:
    digest: str
    size: int            # of the blob, as the registry serves it
    media_type: str
    result: LayerResult  # existed=True: its layer manifest was there already (skipped)

    @property
    def converted(self) -> bool:
        return not self.result.existed

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "media_type": self.media_type,
                "status": "converted" if self.converted else "skipped", "result": self.result.to_json()}


@dataclass(frozen=True, slots=True)
class ImageResult:
    ref: str
    manifest_digest: str
    index_digest: str | None
    platform: str | None
    layers: tuple[ImageLayer, ...]  # unique blobs, bottom first
    record: str                     # the image record's key
    seconds: float

    @property
    def converted(self) -> int:
        return sum(1 for x in self.layers if x.converted)

    @property
    def skipped(self) -> int:
        return len(self.layers) - self.converted

    @property
    def blob_bytes(self) -> int:
        return sum(x.size for x in self.layers)

    @property
    def stored_bytes(self) -> int:
        return sum(x.result.stored_bytes for x in self.layers)

    @property
    def dedup_bytes(self) -> int:
        return sum(x.result.dedup_bytes for x in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "manifest_digest": self.manifest_digest,
                "index_digest": self.index_digest, "platform": self.platform,
                "layers": [x.to_json() for x in self.layers], "converted": self.converted,
                "skipped": self.skipped, "blob_bytes": self.blob_bytes,
                "stored_bytes": self.stored_bytes, "dedup_bytes": self.dedup_bytes,
                "record": self.record, "seconds": round(self.seconds, 3)}


def encode_record(image: ImageManifest) -> bytes:
    """The image record: content-determined (no times), so every node writes the same bytes."""
    diff_ids = image.diff_ids or (None,) * len(image.layers)
    doc = {"version": RECORD_VERSION, "reference": str(image.ref), "manifest_digest": image.digest,
           "media_type": image.media_type, "index_digest": image.index_digest,
           "platform": str(image.platform) if image.platform else None,
           "config_digest": image.config.digest,
           "layers": [{"digest": d.digest, "size": d.size, "media_type": d.media_type, "diff_id": diff}
                      for d, diff in zip(image.layers, diff_ids)]}
    return json.dumps(doc, indent=1).encode() + b"\n"


async def convert_image(origin: Origin, root: Location, ref: Reference | str | ImageManifest, *,
                        registry: Registry | None = None, plain_http: bool = False,
                        platform: Platform | str | None = None, progress: ProgressFn | None = None,
                        concurrency: int = 2, attempts: int = 2,
                        chunk_hash: str = "blake3") -> ImageResult:
    """Convert every layer of image `ref` under `root` (skipping converted ones) and write
    its image record. `ref` may be an image already resolved (`Registry.resolve`: the CLI
    sizes its progress bar first). `progress(n)` gets blob bytes as they are read (a
    skipped layer's size at once), on the trio thread; a retried layer takes back what it
    had reported."""
    if concurrency < 1 or attempts < 1:
        raise ValueError("concurrency and attempts must be at least 1")
    t0 = time.monotonic()
    registry = registry or Registry(plain_http=plain_http)
    if isinstance(ref, ImageManifest):
        image, ref = ref, ref.ref
    else:
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        if isinstance(platform, str):
            platform = Platform.parse(platform)
        image = await trio.to_thread.run_sync(registry.resolve, ref, platform)
    layers = unique_layers(image.layers)
    done: dict[str, ImageLayer] = {}
    failures: list[P2PFSError] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one(desc: Descriptor, cancel: trio.CancelScope) -> None:
        async with limiter:
            try:
                done[desc.digest] = await _layer(origin, root, registry, ref, desc, progress, attempts,
                                                 chunk_hash)
            except P2PFSError as exc:
                failures.append(exc)
                cancel.cancel()

    async with trio.open_nursery() as nursery:
        for desc in layers:
            nursery.start_soon(one, desc, nursery.cancel_scope)
    if failures:
        raise failures[0]
    _check_diff_ids(image, done)
    key = record_key(root, image.digest)
    await origin.put(key, encode_record(image))
    return ImageResult(str(ref), image.digest, image.index_digest,
                       str(image.platform) if image.platform else None,
                       tuple(done[d.digest] for d in layers), key, time.monotonic() - t0)


async def _layer(origin: Origin, root: Location, registry: Registry, ref: Reference,
                 desc: Descriptor, progress: ProgressFn | None, attempts: int,
                 chunk_hash: str = "blake3") -> ImageLayer:
    for attempt in range(1, attempts + 1):
        reported = 0

        def report(n: int) -> None:
            nonlocal reported
            reported += n
            if progress:
                progress(n)
        try:
            # With expected_digest, a layer whose manifest exists is answered from it
            # (existed=True) without opening the blob.
            result = await convert_layer(
                origin, root, lambda: registry.open_blob(ref, desc.digest, size=desc.size),
                media_type=desc.media_type, expected_digest=desc.digest, progress=report,
                chunk_hash=chunk_hash)
        except RegistryUnavailable as exc:
            if progress and reported:
                progress(-reported)
            if attempt == attempts:
                raise
            log.warning("layer %s: %s; converting it again (attempt %d of %d)",
                        desc.digest, exc, attempt + 1, attempts)
            continue
        if result.existed and progress:
            progress(desc.size - reported)
        return ImageLayer(desc.digest, desc.size, desc.media_type, result)
    raise AssertionError("unreachable")


def _check_diff_ids(image: ImageManifest, done: dict[str, ImageLayer]) -> None:
    """A config whose diff id differs from the tar we converted is the image's inconsistency
    (containerd would refuse to unpack it): say so; the layer itself is what the blob holds."""
    for desc, diff in zip(image.layers, image.diff_ids):
        got = done[desc.digest].result
        if got.diff_id and got.diff_id != diff:
            log.warning("%s: layer %s has diff id %s, the image config says %s",
                        image.ref, desc.digest, got.diff_id, diff)
