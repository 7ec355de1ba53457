"""Start-up prefetch for image layers: record which chunks a layer's first container reads
during its first seconds, store the list next to the layer's manifest, and on every later
node fetch that list in the background as soon as the layer is first touched.

    Recorder    pure: per layer, the (file, chunk) pairs read in the window after the
                layer's first read, in first-read order, bounded; takes `now`
    encode/parse_list  the stored list (docs/FORMAT.md, "Start-up prefetch lists")
    StartupPrefetch    the daemon's shell: on a layer's first access (the first lookup of
                its EROFS files, or the first open of one of its files), load its list and
                warm it (never blocking the reader), or record one and upload it when the
                window closes

Why on first access rather than on the snapshotter's Prepare: the daemon sees the first
read of every layer whoever prepared it, needs no extra call, and a container that never
starts costs nothing. The list is advisory: an entry that names no chunk of the mounted
manifest is skipped, and nothing read from it is served without the usual verification.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import trio

from .errors import ObjectNotFound, P2PFSError
from .plan import ChunkLoc
from .tree import Node, Tree

log = logging.getLogger("p2pfs.startup")

FORMAT_NAME = "p2pfs-startup"
FORMAT_VERSION = 1
#: Where a layer's list lives, next to its manifest.
LIST_KEY = ".p2pfs/startup.json"
#: Most chunks one list names (a start-up touching more is cut at this many).
MAX_CHUNKS = 65536
#: Largest list read back (a hostile one is refused before it is parsed).
MAX_LIST_BYTES = 8 << 20


@dataclass
class _Recording:
    started: float | None = None  # the layer's first read (not its first open)
    last: float = 0.0  # when the last chunk not seen before was read
    seen: set[tuple[str, int]] = field(default_factory=set)
    order: list[tuple[str, int]] = field(default_factory=list)


class Recorder:
    """The reads of each layer from its first read until its reads pause for `idle`
    seconds, and at most `window` seconds. A start-up is a burst of reads that ends; the
    first lazy start is the slowest (everything is fetched on demand), so a fixed window
    would cut it short where a pause does not. `start` (the layer's first access) only arms
    it: the snapshotter mounts a layer's EROFS, which opens its blob, while the pull is
    still running, seconds before the container reads anything."""

    def __init__(self, window: float, max_chunks: int = MAX_CHUNKS, idle: float = 2.0) -> None:
        self.window = window
        self.idle = min(idle, window)
        self.max_chunks = max_chunks
        self._open: dict[str, _Recording] = {}

    def start(self, layer: str, now: float) -> None:
        self._open.setdefault(layer, _Recording())

    def discard(self, layer: str) -> None:
        self._open.pop(layer, None)

    def active(self, layer: str) -> bool:
        return layer in self._open

    def record(self, layer: str, path: str, chunks: range, now: float) -> None:
        rec = self._open.get(layer)
        if rec is None:
            return
        if rec.started is None:
            rec.started = rec.last = now
        elif now - rec.started > self.window:
            return
        for i in chunks:
            if len(rec.order) >= self.max_chunks:
                return
            if (path, i) not in rec.seen:
                rec.seen.add((path, i))
                rec.order.append((path, i))
                rec.last = now

    def due(self, now: float) -> list[tuple[str, list[tuple[str, int]]]]:
        """Recordings whose reads paused or whose window has closed (removed)."""
        done = [layer for layer, rec in self._open.items() if rec.started is not None
                and (now - rec.started > self.window or now - rec.last > self.idle)]
        return [(layer, self._open.pop(layer).order) for layer in done]


def encode(manifest_digest: str, window: float, order: Sequence[tuple[str, int]]) -> bytes:
    """Files in first-read order, each with its chunk indexes in first-read order."""
    files: dict[str, list[int]] = {}
    for path, i in order:
        files.setdefault(path, []).append(i)
    return json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                       "manifest": manifest_digest, "window_s": window,
                       "files": [[p, idx] for p, idx in files.items()]},
                      separators=(",", ":")).encode()


def parse_list(data: bytes, tree: Tree, layer: str) -> list[ChunkLoc]:
    """The chunks a stored list names that the mounted layer really has, in order.
    Anything malformed is a P2PFSError; entries that name nothing are skipped."""
    if len(data) > MAX_LIST_BYTES:
        raise P2PFSError(f"start-up list of {layer}: {len(data)} bytes is over {MAX_LIST_BYTES}")
    try:
        doc = json.loads(data)
        ok = (isinstance(doc, dict) and doc.get("format") == FORMAT_NAME
              and doc.get("version") == FORMAT_VERSION and isinstance(doc.get("files"), list))
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise P2PFSError(f"start-up list of {layer}: not a {FORMAT_NAME} v{FORMAT_VERSION} document")
    locs: list[ChunkLoc] = []
    for item in doc["files"][:MAX_CHUNKS]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], list)):
            continue
        node = tree.lookup_path(f"{layer}/{item[0]}") if item[0] else None
        if node is None or node.entry is None or node.entry.type != "file":
            continue
        n = len(node.entry.chunks)
        idx = [i for i in item[1] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n]
        locs.extend(node.locs(idx))  # type: ignore[arg-type]
        if len(locs) >= MAX_CHUNKS:
            break
    return locs[:MAX_CHUNKS]


class StartupPrefetch:
    """The daemon's side. `layers`: mount dir -> (object key prefix of the layer, manifest
    digest) for every mounted model of kind "layer"; the daemon adds to it on refresh."""

    BATCH = 16 << 20  # uncompressed bytes per prefetch step (its chunks sorted by place in
                      # their packs, so neighbours coalesce into one GET)
    AHEAD = 8         # steps in flight
    LOOKUP_WAIT = 3.0  # longest a blob's open waits to learn whether its layer is recorded

    def __init__(self, *, origin: Any, store: Any, tree: Tree, window: float,
                 clock=trio.current_time) -> None:
        self.origin = origin
        self.store = store
        self.tree = tree
        self.layers: dict[str, tuple[str, str]] = {}
        self.recorder = Recorder(window)
        self._clock = clock
        #: Called with (layer, chunk locations, their bytes) as each prefetch step lands
        #: (the daemon pushes them into the layer's EROFS blob page cache).
        self.on_prefetched: Callable[[str, list, list], None] | None = None
        self._touched: set[str] = set()
        self._looked_up: dict[str, trio.Event] = {}  # set once a layer's list lookup is over
        self._unlisted: set[str] = set()  # layers known to have no start-up list
        self._send, self._recv = trio.open_memory_channel[str](256)
        self.stats = {"lists_loaded": 0, "lists_recorded": 0, "chunks_prefetched": 0,
                      "list_errors": 0}

    # -- called from FUSE handlers: synchronous, never blocks ----------------------------
    def touch(self, node: Node) -> None:
        layer = node.model
        if layer in self._touched or layer not in self.layers:
            return
        try:
            self._send.send_nowait(layer)
        except trio.WouldBlock:
            return  # a burst of first touches: this layer is tried again on its next read
        self._touched.add(layer)
        self._looked_up[layer] = trio.Event()
        self.recorder.start(layer, self._clock())

    async def bypass_page_cache(self, node: Node) -> bool:
        """Whether the kernel should send every read of this layer's EROFS blob to us rather
        than through the blob's page cache: while the layer's start-up reads are recorded.
        EROFS reads a file's bytes from the blob, where the files lie back to back, and the
        page cache's read-ahead on the blob would run past the end of each file into the
        next ones: the list would name files nobody opened, and every later node would
        fetch them. Without that read-ahead, what we see is what EROFS asked for (its own
        read-ahead stays within a file). Called at the blob's open, which waits (at most
        `LOOKUP_WAIT`) for the list lookup the layer's first touch started."""
        done = self._looked_up.get(node.model)
        if done is None:
            return False
        with trio.move_on_after(self.LOOKUP_WAIT):
            await done.wait()
        return done.is_set() and self.recorder.active(node.model)

    def guess_ahead(self, node: Node) -> bool:
        """Whether reads of this node's layer should fetch their pack neighbours too: only
        once its list lookup said there is none (a list is the precise read-ahead, and
        neighbours on top of it only cost bytes); every model that is not a layer, yes."""
        return node.model not in self.layers or node.model in self._unlisted

    def recording(self, node: Node) -> bool:
        """Whether this node's layer is having its start-up reads recorded: bytes the
        kernel did not ask for must then not be pushed into its page cache, or the reads
        they spare would be missing from the list (and every later node's prefetch)."""
        return self.recorder.active(node.model)

    def record(self, node: Node, chunks: range) -> None:
        if node.model in self.layers and node.entry is not None:
            self.recorder.record(node.model, node.entry.path, chunks, self._clock())

    # -- the service ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop)
            task_status.started()
            async for layer in self._recv:
                nursery.start_soon(self._first_access, layer)

    async def _first_access(self, layer: str) -> None:
        try:
            data = await self._look_up(layer)
        finally:  # decided: a blob's open waiting on it goes on (bypass_page_cache)
            self._looked_up.setdefault(layer, trio.Event()).set()
        if data is not None:
            await self._load(layer, data)

    async def _look_up(self, layer: str) -> bytes | None:
        """The layer's stored list, or None (then its start-up reads are being recorded,
        unless the list could not be read: we never overwrite one)."""
        prefix, _ = self.layers[layer]
        key = prefix + LIST_KEY
        try:
            with trio.fail_after(10):
                size = (await self.origin.head(key)).size
                if size > MAX_LIST_BYTES:  # refused before it is downloaded
                    raise P2PFSError(f"{key}: {size} bytes is over the {MAX_LIST_BYTES}-byte limit")
                data = await self.origin.get_range(key, 0, size) if size else b""
        except ObjectNotFound:
            self._unlisted.add(layer)
            log.info("layer %s: no start-up list yet; recording its start-up reads", layer)
            return None
        except (P2PFSError, trio.TooSlowError) as exc:
            self.stats["list_errors"] += 1
            self._unlisted.add(layer)
            self.recorder.discard(layer)  # do not overwrite a list we could not read
            log.warning("layer %s: start-up list unreadable (%s); starting without it", layer, exc)
            return None
        self.recorder.discard(layer)
        return bytes(data)

    async def _load(self, layer: str, data: bytes) -> None:
        try:
            locs = parse_list(data, self.tree, layer)
        except P2PFSError as exc:
            self.stats["list_errors"] += 1
            self._unlisted.add(layer)
            log.warning("%s; starting without it", exc)
            return
        self.stats["lists_loaded"] += 1
        self.stats["chunks_prefetched"] += len(locs)
        log.info("layer %s: prefetching its start-up list (%d chunks)", layer, len(locs))
        t0 = self._clock()
        try:
            await self._prefetch(locs, layer)
        except P2PFSError as exc:  # readers fetch what they need themselves
            log.warning("layer %s: start-up prefetch stopped: %s", layer, exc)
            return
        log.info("layer %s: start-up list prefetched (%d chunks, %.1f MB) in %.2f s", layer,
                 len(locs), sum(loc.ref.size for loc in locs) / 1e6, self._clock() - t0)

    async def _prefetch(self, locs: list[ChunkLoc], layer: str = "") -> None:
        """Into memory, in list order, `BATCH` bytes per step and `AHEAD` steps at once (so
        nothing waits long enough in a queue to hit the read timeout), as far as half the
        memory tier holds; the rest of a longer list onto disk (`warm`)."""
        budget = self.store.readahead_limit
        in_memory: list[ChunkLoc] = []
        for loc in locs:
            if budget < loc.ref.size:
                break
            budget -= loc.ref.size
            in_memory.append(loc)
        batches: list[list[ChunkLoc]] = [[]]
        filled = 0
        for loc in in_memory:
            if batches[-1] and filled + loc.ref.size > self.BATCH:
                batches.append([])
                filled = 0
            batches[-1].append(loc)
            filled += loc.ref.size
        ahead = trio.Semaphore(self.AHEAD)

        async def one(batch: list[ChunkLoc]) -> None:
            batch = sorted(batch, key=lambda loc: (loc.key, loc.ref.offset))
            try:  # `used` 0: prefetching serves no reader, so no bytes count as served
                chunks = await self.store.get(batch, used=[0] * len(batch))
                if self.on_prefetched is not None:
                    self.on_prefetched(layer, batch, chunks)
            finally:
                ahead.release()

        async with trio.open_nursery() as nursery:
            for batch in batches:
                if batch:
                    await ahead.acquire()
                    nursery.start_soon(one, batch)
        if len(in_memory) < len(locs):
            await self.store.warm(locs[len(in_memory):])

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(min(1.0, max(0.05, self.recorder.window / 4)))
            for layer, order in self.recorder.due(self._clock()):
                if order:
                    await self._upload(layer, order)

    async def _upload(self, layer: str, order: list[tuple[str, int]]) -> None:
        prefix, digest = self.layers[layer]
        try:
            with trio.fail_after(30):
                await self.origin.put(prefix + LIST_KEY, encode(digest, self.recorder.window, order))
        except (P2PFSError, trio.TooSlowError) as exc:
            self.stats["list_errors"] += 1
            log.warning("layer %s: could not store its start-up list (%s); later nodes start "
                        "without it", layer, exc)
            return
        self.stats["lists_recorded"] += 1
        log.info("layer %s: stored its start-up list (%d chunks read in the first %gs)",
                 layer, len(order), self.recorder.window)


def layer_prefixes(loc_prefix: str, models: Sequence[tuple[str, Any, str]]) -> dict[str, tuple[str, str]]:
    """mount dir -> (the layer's own key prefix, manifest digest) for the layer models."""
    out = {}
    for d, m, _ in models:
        if m.kind == "layer" and d:
            out[d] = (loc_prefix + d + "/", m.digest)
    return out

