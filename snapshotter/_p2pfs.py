"""Remote layers served by the p2pfs layers mount, and convert on first pull.

    P2pfsLayers         `DirRemoteLayers` plus: a layer not on the mount yet is looked up
                        once in the object store (the daemon's `refresh` op: one HEAD and
                        one GET), so a layer converted by any node since the mount is used
                        at once; a committed layer that was pulled normally is handed to
                        the converter.
    FirstPullConverter  bounded background conversion of normally pulled layers: from
                        containerd's content store (the blob is on this node already), else
                        from the registry; under a lease in the object store so that one node
                        converts while the others pull normally; then the layer is attached
                        to the mount, and from then on every node starts it lazily.

Nothing here blocks a containerd call for long: lookups are bounded by `refresh_timeout`
and remembered for `miss_ttl`, conversion runs on its own threads, and a full queue drops
the job (counted; the next pull of that layer submits it again).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ._layerfs import LAYER_DIGEST_LABELS, DirRemoteLayers

log = logging.getLogger("snapshotter.p2pfs")

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
IMAGE_REF_LABELS = ("containerd.io/snapshot/cri.image-ref",
                    "containerd.io/snapshot/remote/stargz.reference")


def layer_hex(labels: Mapping[str, str]) -> str | None:
    for key in LAYER_DIGEST_LABELS:
        m = _DIGEST.fullmatch(labels.get(key, ""))
        if m:
            return m.group(1)
    return None


class FirstPullConverter:
    """Converts layers in the background, `concurrency` at a time, at most `max_pending`
    waiting. `status()` (and the snapshotter's metrics) show what it does."""

    def __init__(self, layers_url: str, *, content_dir: Path | None, s3: Any = None,
                 plain_http_registries: Sequence[str] = (), concurrency: int = 1,
                 max_pending: int = 64, lease_ttl: float = 600.0,
                 on_converted: Callable[[str], None] = lambda hex_: None) -> None:
        from p2pfs.image._lock import new_owner
        from p2pfs.origin import parse_url

        self.root = parse_url(layers_url)
        self.layers_url = layers_url
        self.content_dir = content_dir
        self.s3 = s3
        self.plain_http = tuple(plain_http_registries)
        self.max_pending = max_pending
        self.lease_ttl = lease_ttl
        self.on_converted = on_converted
        self.owner = new_owner()
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="convert")
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._running: set[str] = set()
        self.counts = {"converted": 0, "existed": 0, "locked_elsewhere": 0, "failed": 0,
                       "dropped": 0, "bytes_stored": 0}
        self.last_error = ""

    def submit(self, hex_: str, image_ref: str | None) -> bool:
        with self._lock:
            if hex_ in self._queued or hex_ in self._running:
                return False
            if len(self._queued) >= self.max_pending:
                self.counts["dropped"] += 1
                log.warning("layer %s: conversion queue full (%d); not converted this time",
                            hex_[:12], self.max_pending)
                return False
            self._queued.add(hex_)
        self._pool.submit(self._run, hex_, image_ref)
        log.info("layer %s: pulled normally; converting it in the background", hex_[:12])
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"queued": len(self._queued), "running": len(self._running), **self.counts,
                    "last_error": self.last_error}

    def close(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    # -- one job, on a worker thread ------------------------------------------------------
    def _run(self, hex_: str, image_ref: str | None) -> None:
        import trio
        import trio_asyncio

        with self._lock:
            self._queued.discard(hex_)
            self._running.add(hex_)
        t0 = time.monotonic()
        try:
            async def main() -> str:
                async with trio_asyncio.open_loop():
                    return await self._convert(hex_, image_ref)

            outcome = trio.run(main)
        except Exception as exc:  # noqa: BLE001 - one layer's failure must not stop the others
            with self._lock:
                self.counts["failed"] += 1
                self.last_error = f"{hex_[:12]}: {exc}"
            log.error("layer %s: background conversion failed: %s (it keeps being pulled "
                      "normally)", hex_[:12], exc)
            return
        finally:
            with self._lock:
                self._running.discard(hex_)
        with self._lock:
            self.counts[outcome] += 1
        if outcome == "converted":
            log.info("layer %s: converted in %.1fs; nodes now start it lazily", hex_[:12],
                     time.monotonic() - t0)
            try:
                self.on_converted(hex_)
            except Exception as exc:  # noqa: BLE001 - the layer is published; attaching is an optimization
                log.warning("layer %s: converted, but the mount did not attach it: %s", hex_[:12], exc)

    async def _convert(self, hex_: str, image_ref: str | None) -> str:
        from p2pfs.image import convert_layer, layer_exists
        from p2pfs.image._lock import acquire, release, renew
        from p2pfs.origin import open_origin

        import trio

        async with open_origin(self.root, self.s3) as origin:
            if await layer_exists(origin, self.root, hex_):
                return "existed"
            if not await acquire(origin, self.root, hex_, self.owner, ttl=self.lease_ttl):
                log.info("layer %s: another node is converting it", hex_[:12])
                return "locked_elsewhere"
            try:
                async with trio.open_nursery() as nursery:
                    async def keep_lease() -> None:
                        while True:
                            await trio.sleep(self.lease_ttl / 3)
                            await renew(origin, self.root, hex_, self.owner, ttl=self.lease_ttl)

                    nursery.start_soon(keep_lease)
                    result = await convert_layer(origin, self.root, self._opener(hex_, image_ref),
                                                 expected_digest=f"sha256:{hex_}")
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await release(origin, self.root, hex_, self.owner)
        with self._lock:
            self.counts["bytes_stored"] += result.stored_bytes
        return "existed" if result.existed else "converted"

    def _opener(self, hex_: str, image_ref: str | None) -> Callable[[], Any]:
        """The blob from containerd's content store when it is there, else the registry."""
        local = self.content_dir / hex_ if self.content_dir else None
        if local is not None and local.is_file():
            return lambda: open(local, "rb")
        if not image_ref:
            raise FileNotFoundError(f"layer {hex_[:12]}: not in the content store and no image "
                                    "reference to fetch it from the registry")

        def from_registry():
            from p2pfs.image import Registry, parse_reference

            ref = parse_reference(image_ref)
            return Registry(plain_http=ref.registry in self.plain_http).open_blob(ref, f"sha256:{hex_}")

        return from_registry


class P2pfsLayers(DirRemoteLayers):
    """Remote layers on the p2pfs layers mount at `mount`."""

    def __init__(self, mount: str | Path, *, converter: FirstPullConverter | None = None,
                 timeout: float = 2.0, refresh_timeout: float = 3.0, miss_ttl: float = 30.0,
                 max_hung: int = 4, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(mount, timeout=timeout, max_hung=max_hung)
        self.converter = converter
        self.refresh_timeout = refresh_timeout
        self.miss_ttl = miss_ttl
        self._clock = clock
        self._misses: dict[str, float] = {}
        self._lock = threading.Lock()
        self.refreshes = 0
        self.images: Any = None  # an _ocistore.ImageRecorder: the image's metadata for the mirror

    def lookup(self, labels: Mapping[str, str]) -> str | None:
        if self.images is not None:
            self.images.seen(labels)  # queues at most; never blocks the Prepare
        found = super().lookup(labels)
        hex_ = layer_hex(labels)
        if found is not None or hex_ is None:
            return found
        now = self._clock()
        with self._lock:
            if now - self._misses.get(hex_, -1e18) < self.miss_ttl:
                return None
        self.attach(hex_)  # it may also have been attached by a refresh running meanwhile
        found = super().lookup(labels)
        if found is not None:
            return found
        with self._lock:
            self._misses[hex_] = now
            if len(self._misses) > 4096:  # bound the memory: forget the oldest half
                for k in sorted(self._misses, key=self._misses.__getitem__)[:2048]:
                    del self._misses[k]
        return None

    def attach(self, hex_: str) -> bool:
        """Ask the daemon to attach layer `hex_` if it is in the object store now."""
        from p2pfs.control import refresh
        from p2pfs.errors import P2PFSError

        self.refreshes += 1
        try:
            reply = refresh(self.mount, [hex_], timeout=self.refresh_timeout)
        except (P2PFSError, OSError) as exc:
            log.warning("layer %s: could not ask the p2pfs daemon at %s (%s); pulling it "
                        "normally", hex_[:12], self.mount, exc)
            return False
        return hex_ in reply.get("added", [])

    def committed(self, name: str, labels: Mapping[str, str], upper_dir: str) -> None:
        hex_ = layer_hex(labels)
        if hex_ is None or self.converter is None:
            return
        with self._lock:
            self._misses.pop(hex_, None)  # converted soon: look again on the next pull
        ref = next((labels[k] for k in IMAGE_REF_LABELS if labels.get(k)), None)
        self.converter.submit(hex_, ref)


def content_store_dir(containerd_root: Path) -> Path:
    """Where containerd 1.6/1.7/2.x keep blobs (`<root>/io.containerd.content.v1.content`)."""
    return containerd_root / "io.containerd.content.v1.content" / "blobs" / "sha256"



class ConverterMetrics:
    """Prometheus collector of what the first-pull converter does."""

    def __init__(self, converter: FirstPullConverter) -> None:
        self.converter = converter

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.converter.status()
        jobs = CounterMetricFamily("p2pfs_snapshotter_conversions", "First-pull conversions by outcome",
                                   labels=["outcome"])
        for outcome in ("converted", "existed", "locked_elsewhere", "failed", "dropped"):
            jobs.add_metric([outcome], st[outcome])
        yield jobs
        yield CounterMetricFamily("p2pfs_snapshotter_converted_bytes",
                                  "Pack bytes stored by first-pull conversions", value=st["bytes_stored"])
        g = GaugeMetricFamily("p2pfs_snapshotter_conversions_pending", "Conversions queued or running",
                              labels=["state"])
        g.add_metric(["queued"], st["queued"])
        g.add_metric(["running"], st["running"])
        yield g
