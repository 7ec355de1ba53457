"""The image metadata mirror's store: the manifests, indexes and configs of the images this
node pulled, and their tags, kept in the object store beside the layers (docs/FORMAT.md,
"Image metadata mirror"), so that a node can resolve and fetch an image whose layers are
all served remotely while the registry is down.

    blob_key, tag_key, TagRecord   the layout under the layers prefix ROOT (pure)
    OriginLoop                     one trio loop in a thread of its own with the origin open:
                                   blocking callers (HTTP handler threads, the recorder) run
                                   origin calls on it, bounded by a timeout
    MirrorReader                   verified reads: a blob is served only if its bytes hash to
                                   its digest; small verified blobs cached in memory (bounded)
    ImageRecorder                  on a Prepare that names an image (CRI's labels), stores its
                                   manifest, config, index and tag once, in the background:
                                   from containerd's content store, the registry only for what
                                   the content store cannot say (which digest a tag names)

Nothing here blocks a containerd call: `ImageRecorder.seen` only queues (a bounded set; a
full one drops the job, counted; the next pull submits it again).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

from p2pfs.errors import IntegrityError, ObjectNotFound, OriginUnavailable
from p2pfs.origin import Location, Origin

log = logging.getLogger("snapshotter.mirror")

T = TypeVar("T")

OCI_DIR = ".p2pfs/oci/"
MAX_BLOB = 4 << 20  # manifests, indexes and configs only (containerd's manifest limit too)
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# -- layout (pure) -------------------------------------------------------------------------

def digest_hex(digest: str) -> str | None:
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    return m.group(1) if m else None


def blob_key(root: Location, digest: str) -> str:
    hex_ = digest_hex(digest)
    if hex_ is None:
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return f"{root.prefix}{OCI_DIR}blobs/sha256/{hex_}"


def tag_key(root: Location, registry: str, repository: str, tag: str) -> str:
    """`<host>/<repository>:<tag>`, as the reference reads; a ':' never occurs in a
    repository path, so repository `a/b` tag `c` and repository `a/b/c` never collide.
    The caller validates the three parts (parse_reference)."""
    return f"{root.prefix}{OCI_DIR}tags/{registry}/{repository}:{tag}"


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: str
    media_type: str
    size: int

    def encode(self) -> bytes:
        return json.dumps({"digest": self.digest, "mediaType": self.media_type,
                           "size": self.size}, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> "TagRecord":
        """Raises ValueError for anything but a record we write."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("a tag record is a JSON object")
        digest, mt, size = doc.get("digest"), doc.get("mediaType"), doc.get("size")
        if digest_hex(digest) is None or not isinstance(mt, str) or not mt or \
                not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB:
            raise ValueError("a tag record needs digest, mediaType and size")
        return cls(digest, mt, size)


def media_type_of(data: bytes, content_type: str | None = None) -> str:
    """The media type a manifest or index names itself, else the Content-Type it was
    served with, else OCI's manifest or index type by its shape."""
    try:
        doc = json.loads(data)
    except ValueError:
        return "application/octet-stream"
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(mt, str) and mt:
        return mt
    if content_type and content_type.split(";")[0].strip():
        return content_type.split(";")[0].strip()
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the origin on a loop of its own -------------------------------------------------------

class OriginLoop:
    """A trio loop (with trio-asyncio for S3) on its own thread, holding one open origin.
    `call(fn, *args)` runs `await fn(origin, *args)` there from any other thread, under
    `timeout`. Calls reach the loop through a channel and run as children of the task that
    opened the asyncio loop: trio-asyncio finds its loop in that task's context, which a
    task started by `trio.from_thread` does not have."""

    def __init__(self, root: Location, s3: Any = None, *, timeout: float = 30.0) -> None:
        self.root, self.s3, self.timeout = root, s3, timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: Any = None
        self._send: Any = None
        self._t0 = 0.0  # when the loop's thread began opening the store
        self._thread = threading.Thread(target=self._main, name="oci-origin", daemon=True)

    def start(self, *, wait: bool = True) -> "OriginLoop":
        """Open the origin on the loop's thread; without `wait`, calls wait for it instead
        (the snapshotter's socket must not wait on the object store)."""
        self._thread.start()
        if wait:
            self._wait_open()
        return self

    def state(self) -> str:
        """"opening", "open" or "failed: <why>" (the snapshotter's status reports it: until
        it is open, a pull's metadata jobs wait for it, and this process's start-up work
        competes with the node's first container for the CPU)."""
        if not self._ready.is_set():
            return "opening"
        return f"failed: {self._error}" if self._error is not None else "open"

    def _wait_open(self) -> None:
        if not self._ready.wait(self.timeout):
            raise OriginUnavailable(f"{self.root}: the object store did not open in {self.timeout}s")
        if self._error is not None:
            raise OriginUnavailable(f"{self.root}: the object store did not open: {self._error}")

    def _main(self) -> None:
        import trio

        self._t0 = time.monotonic()
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._ready.is_set():
                self._error = _leaf(exc)
                log.warning("object store %s did not open: %s (pulls work; the image metadata "
                            "mirror does not until the snapshotter restarts)", self.root, self._error)
                self._ready.set()
            else:
                log.error("the mirror's object store loop stopped: %s", exc)

    async def _serve(self) -> None:
        import trio
        import trio_asyncio

        from p2pfs.origin import open_origin

        async with trio_asyncio.open_loop():
            async with open_origin(self.root, self.s3) as origin:
                send, recv = trio.open_memory_channel[tuple](0)
                async with trio.open_nursery() as nursery, recv:
                    self._send = send
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    log.info("object store %s open (%.2f s after start)", self.root,
                             time.monotonic() - self._t0)
                    async for fn, args, result in recv:
                        nursery.start_soon(self._one, origin, fn, args, result)

    async def _one(self, origin: Origin, fn: Callable[..., Awaitable[Any]], args: tuple,
                   result: concurrent.futures.Future) -> None:
        import trio

        try:
            with trio.fail_after(self.timeout):
                result.set_result(await fn(origin, *args))
        except trio.TooSlowError:
            result.set_exception(OriginUnavailable(f"{self.root}: no answer in {self.timeout}s"))
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
            result.set_exception(exc)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        import trio

        self._wait_open()
        result: concurrent.futures.Future = concurrent.futures.Future()
        try:
            trio.from_thread.run(self._send.send, (fn, args, result), trio_token=self._token)
        except (trio.RunFinishedError, trio.ClosedResourceError):
            raise OriginUnavailable(f"{self.root}: the object store loop has stopped") from None
        return result.result(self.timeout + 5)

    def close(self) -> None:
        import trio

        if self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._send.close, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)


async def _get_bounded(origin: Origin, key: str) -> bytes | None:
    """The object at `key` if it is at most MAX_BLOB bytes; None if there is none."""
    try:
        info = await origin.head(key)
        if info.size > MAX_BLOB:
            raise IntegrityError(f"{key}: {info.size} bytes stored, more than any manifest or config")
        return await origin.get(key)
    except ObjectNotFound:
        return None


async def _exists(origin: Origin, key: str) -> bool:
    try:
        await origin.head(key)
    except ObjectNotFound:
        return False
    return True


async def _put(origin: Origin, key: str, data: bytes) -> None:
    await origin.put(key, data)


# -- reads -----------------------------------------------------------------------------------

class MirrorReader:
    """Verified reads of the mirror's blobs and tags; verified blobs cached (LRU, bounded)."""

    def __init__(self, loop: OriginLoop, *, cache_bytes: int = 64 << 20) -> None:
        self.loop = loop
        self.root = loop.root
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "corrupt": 0}

    def tag(self, registry: str, repository: str, tag: str) -> TagRecord | None:
        """The record for a tag (never cached: a tag moves), None if there is none."""
        key = tag_key(self.root, registry, repository, tag)
        data = self.loop.call(_get_bounded, key)
        if data is None:
            return None
        try:
            return TagRecord.parse(data)
        except ValueError as exc:
            raise IntegrityError(f"{key}: not a tag record ({exc})") from None

    def blob(self, digest: str) -> bytes | None:
        """A stored blob, verified against `digest`; None if none is stored. Raises
        IntegrityError (and serves nothing) if the stored bytes differ."""
        with self._lock:
            data = self._cache.get(digest)
            if data is not None:
                self._cache.move_to_end(digest)
                self.counts["hits"] += 1
                return data
            self.counts["misses"] += 1
        key = blob_key(self.root, digest)
        data = self.loop.call(_get_bounded, key)
        if data is None:
            return None
        if sha256(data) != digest:
            with self._lock:
                self.counts["corrupt"] += 1
            raise IntegrityError(f"{key}: the stored bytes hash to {sha256(data)}, not {digest}")
        with self._lock:
            if digest not in self._cache and len(data) <= self.cache_bytes:
                self._cache[digest] = data
                self._cached += len(data)
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data


# -- writes: recording the images this node pulls ------------------------------------------

def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: the one that says why."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class ImageRecorder:
    """Stores, once per (image reference, manifest digest), what a node needs to resolve
    and fetch that image without the registry. One worker thread: the jobs are a few small
    reads and writes, and must not wait behind a layer conversion."""

    def __init__(self, loop: OriginLoop, *, content_dir: Path | None,
                 plain_http_registries: Sequence[str] = (), max_pending: int = 16,
                 retry_after: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.root = loop.root
        self.content_dir = content_dir
        self.plain_http = tuple(plain_http_registries)
        self.max_pending = max_pending
        self.retry_after = retry_after
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oci-record")
        self._lock = threading.Lock()
        self._pending: set[tuple[str, str]] = set()
        self._done: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> when (failures: retry later)
        self.counts = {"stored": 0, "existed": 0, "failed": 0, "dropped": 0}
        self.last_error = ""

    def seen(self, labels: Mapping[str, str]) -> bool:
        """A Prepare's labels; queues the image they name unless recorded (or failing) lately."""
        ref, manifest = labels.get(IMAGE_REF_LABEL), labels.get(MANIFEST_DIGEST_LABEL, "")
        if not ref or digest_hex(manifest) is None:
            return False
        job = (ref, manifest)
        now = self._clock()
        with self._lock:
            if job in self._pending or now < self._done.get(job, -1.0):
                return False
            if len(self._pending) >= self.max_pending:
                self.counts["dropped"] += 1
                return False
            self._pending.add(job)
        self._pool.submit(self._run, ref, manifest)
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"pending": len(self._pending), **self.counts, "last_error": self.last_error}

    def wait_idle(self, timeout: float) -> bool:
        """Tests and shutdown: whether every queued job finished within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, ref: str, manifest: str) -> None:
        job = (ref, manifest)
        try:
            outcome = self.record(ref, manifest)
            until = float("inf")
        except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
            outcome, until = "failed", self._clock() + self.retry_after
            with self._lock:
                self.last_error = f"{ref}: {exc}"
            log.warning("image %s: its metadata was not stored for the mirror: %s (tried again "
                        "on a pull after %gs)", ref, exc, self.retry_after)
        with self._lock:
            self.counts[outcome] += 1
            self._pending.discard(job)
            self._done[job] = until
            while len(self._done) > 4096:
                self._done.popitem(last=False)

    def record(self, ref_text: str, manifest: str) -> str:
        """Store `ref_text`'s metadata for platform manifest `manifest`: "stored" or "existed"."""
        from p2pfs.image import parse_reference

        ref = parse_reference(ref_text)
        if ref.tag and not ref.digest and self._tag_current(ref, manifest):
            return "existed"
        mdata = self._small_blob(ref, manifest)
        config, size = _config_of(mdata, manifest)
        # Written in this order: a stored manifest means its config is stored too; and
        # before the registry is asked about the tag, so a pull by digest works regardless.
        blobs = {config: self._small_blob(ref, config, size=size), manifest: mdata}
        if ref.digest and ref.digest != manifest:  # pinned to an index
            blobs[ref.digest] = self._small_blob(ref, ref.digest)
        self._put_blobs(blobs)
        top: TagRecord | None = None
        if ref.tag and not ref.digest:
            data, ctype = self._registry(ref.registry).manifest(ref, ref.tag)
            digest = sha256(data)
            if digest != manifest and manifest not in _index_entries(data):
                log.info("image %s: the tag now names %s, not the pulled %s; its tag is not "
                         "recorded", ref_text, digest, manifest)
            else:
                self._put_blobs({digest: data})
                top = TagRecord(digest, media_type_of(data, ctype), len(data))
                self.loop.call(_put, tag_key(self.root, ref.registry, ref.repository, ref.tag),
                               top.encode())  # last: the tag names only what is stored
        log.info("image %s: manifest, config%s stored for the mirror", ref_text,
                 " and tag" if top else "")
        return "stored"

    def _put_blobs(self, blobs: Mapping[str, bytes]) -> None:
        for digest, data in blobs.items():
            key = blob_key(self.root, digest)
            if not self.loop.call(_exists, key):
                self.loop.call(_put, key, data)

    def _tag_current(self, ref: Any, manifest: str) -> bool:
        """Whether the stored tag already names `manifest` (directly or through a stored
        index) and the manifest is stored."""
        data = self.loop.call(_get_bounded, tag_key(self.root, ref.registry, ref.repository, ref.tag))
        try:
            record = TagRecord.parse(data) if data else None
        except ValueError:
            return False
        if record is None:
            return False
        if record.digest != manifest:
            index = self.loop.call(_get_bounded, blob_key(self.root, record.digest))
            if index is None or sha256(index) != record.digest or manifest not in _index_entries(index):
                return False
        return self.loop.call(_exists, blob_key(self.root, manifest))

    def _small_blob(self, ref: Any, digest: str, *, size: int | None = None) -> bytes:
        """A manifest or index, or (with its descriptor's `size`) a config: from containerd's
        content store, else the registry; verified either way."""
        hex_ = digest_hex(digest)
        path = self.content_dir / hex_ if self.content_dir is not None and hex_ else None
        data = None
        if path is not None and path.is_file():
            with open(path, "rb") as f:
                data = f.read(MAX_BLOB + 1)
        if data is None or sha256(data) != digest:
            registry = self._registry(ref.registry)
            if size is None:
                data = registry.manifest(ref, digest)[0]
            else:
                from p2pfs.image import Descriptor

                data = registry.read_blob(ref, Descriptor("application/octet-stream", digest, size), MAX_BLOB)
        if len(data) > MAX_BLOB or sha256(data) != digest:
            raise IntegrityError(f"{digest}: more than {MAX_BLOB} bytes, or bytes that differ")
        return data

    def _registry(self, host: str) -> Any:
        from p2pfs.image import Registry

        return Registry(plain_http=host in self.plain_http, timeout=10.0, retries=1)


def _config_of(manifest: bytes, digest: str) -> tuple[str, int]:
    """The config descriptor's digest and size."""
    try:
        doc = json.loads(manifest)
        config, size = doc["config"]["digest"], doc["config"]["size"]
    except (ValueError, TypeError, KeyError):
        raise IntegrityError(f"{digest}: not an image manifest with a config") from None
    if digest_hex(config) is None or not isinstance(size, int) or not 0 <= size <= MAX_BLOB:
        raise IntegrityError(f"{digest}: its config descriptor ({config!r}, {size!r} bytes) is "
                             f"not a sha256 digest of at most {MAX_BLOB} bytes")
    return config, size


def _index_entries(data: bytes) -> set[str]:
    """The manifest digests an index lists (empty for anything else)."""
    try:
        doc = json.loads(data)
        return {m["digest"] for m in doc.get("manifests", []) if isinstance(m, dict)
                and isinstance(m.get("digest"), str)}
    except (ValueError, TypeError, AttributeError):
        return set()
