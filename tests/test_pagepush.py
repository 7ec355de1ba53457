"""PagePusher and LayerImage.positions: what is pushed into a blob's page cache is exactly
the blob's bytes, in whole pages, and a full queue drops instead of waiting."""

from __future__ import annotations

import hashlib
import random
from collections import deque

import trio

from p2pfs import erofs
from p2pfs.manifest import ChunkRef, Entry, Manifest
from p2pfs.pagepush import PagePusher
from p2pfs.plan import ChunkLoc
from p2pfs.tree import LayerImage

RNG = random.Random(5)
CHUNK = 8192


def file_entry(path: str, data: bytes, blob: int, at: int) -> tuple[Entry, list[tuple[ChunkRef, bytes]]]:
    chunks, starts = [], []
    for i in range(0, len(data), CHUNK):
        part = data[i:i + CHUNK]
        chunks.append(ChunkRef(blob=blob, offset=at + i, length=len(part), size=len(part),
                               compression="none", digest=hashlib.sha256(part).hexdigest()))
        starts.append(i)
    e = Entry(path=path, type="file", size=len(data), chunks=tuple(chunks), starts=tuple(starts))
    return e, [(c, data[s:s + c.size]) for c, s in zip(chunks, starts)]


def layer() -> tuple[LayerImage, dict[str, bytes], list[tuple[ChunkRef, bytes]]]:
    files = {"a": RNG.randbytes(3 * CHUNK + 100), "b": RNG.randbytes(50), "c/d": RNG.randbytes(CHUNK),
             "c/e": RNG.randbytes(2 * CHUNK + 4095)}
    entries, refs, at = [Entry(path="", type="dir"), Entry(path="c", type="dir")], [], 0
    for path, data in files.items():
        e, r = file_entry(path, data, 0, at)
        at += len(data)
        entries.append(e)
        refs += r
    m = Manifest(chunk_size=CHUNK, blobs=("p",), entries=tuple(entries), kind="layer", blob_root="..")
    img = LayerImage(m, "L")
    img.build()
    img.blob_inode, img.opened = 7, True
    return img, files, refs


def blob_bytes(img: LayerImage, files: dict[str, bytes]) -> bytes:
    out = bytearray(img.image.blob_size)
    for x in img.image.extents:
        out[x.offset:x.offset + x.size] = files[x.path]
    return bytes(out)


def test_pushed_pages_are_the_blobs_bytes():
    img, files, refs = layer()
    expect = blob_bytes(img, files)
    stored: list[tuple[int, int, bytes]] = []

    async def main():
        pusher = PagePusher(store=None, notify=lambda ino, off, data: stored.append((ino, off, bytes(data))))
        async with trio.open_nursery() as n:
            await n.start(pusher.run)
            pusher.offer(img, [ChunkLoc("p", c) for c, _ in refs], [d for _, d in refs])
            while pusher._queue or pusher._pending:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
        return pusher

    pusher = trio.run(main)
    assert stored and pusher.stats["errors"] == 0
    for ino, off, data in stored:
        assert ino == 7 and off % erofs.BLOCK == 0 and len(data) % erofs.BLOCK == 0
        assert off + len(data) <= len(expect)
        assert data == expect[off:off + len(data)]
    # Every chunk that starts on a page and ends on one (or at its file's end) is pushed,
    # pieces that meet end to end in one store (the files sit back to back in the blob).
    assert len(img.positions()) == len(refs)
    assert sum(len(d) for _, _, d in stored) == len(expect)
    assert len(stored) < len(refs) and len(stored) == pusher.stats["pushes"]


def test_runs_join_neighbours_up_to_the_limit_and_push_a_chunk_once():
    from p2pfs.pagepush import _runs

    img, files, refs = layer()
    locs = [ChunkLoc("p", c) for c, _ in refs]
    datas = [d for _, d in refs]
    runs = _runs(img.positions(), locs + locs[:2], datas + datas[:2], max_run=2 * CHUNK)
    assert all(len(buf) <= 2 * CHUNK for _, buf in runs)
    offsets = [off for off, _ in runs]
    assert offsets == sorted(set(offsets))
    assert sum(len(buf) for _, buf in runs) == img.image.blob_size


def test_a_full_queue_drops_and_unknown_chunks_are_ignored():
    img, files, refs = layer()
    pusher = PagePusher(store=None, max_pending=CHUNK, notify=lambda *a: None)
    locs = [ChunkLoc("p", c) for c, _ in refs]
    pusher.offer(img, locs[:1], [refs[0][1]])
    pusher.offer(img, locs[1:2], [refs[1][1]])  # over max_pending: dropped
    assert pusher.stats["dropped"] == 1 and len(pusher._queue) == 1
    other = ChunkRef(blob=0, offset=0, length=1, size=1, compression="none", digest="0" * 64)
    pusher.offer(img, [ChunkLoc("p", other)], [b"x"])
    assert len(pusher._queue) == 1
    img.opened = False  # the kernel has not opened the blob: parked until it does
    pusher.offer(img, locs[2:3], [refs[2][1]])
    assert len(pusher._queue) == 1
    img.direct = True  # opened past its page cache: nothing to push into, nothing parked
    pusher.offer(img, locs[3:4], [refs[3][1]])
    assert [len(v[1]) for v in pusher._parked.values()] == [1]


def test_offers_before_the_blob_is_open_are_pushed_when_it_opens():
    """A start-up list is prefetched while the layer's image is still being built: what
    lands before the kernel opens the blob waits (bounded) and is pushed at the open,
    fetched again through the store."""
    img, files, refs = layer()
    img.opened = False
    by_digest = {c.digest: d for c, d in refs}
    fetched: list[int] = []

    class Store:
        async def get(self, locs, used):
            fetched.append(len(locs))
            return [by_digest[loc.digest] for loc in locs]

    stored: list[tuple[int, int, bytes]] = []
    pusher = PagePusher(store=Store(), max_pending=3 * CHUNK,
                        notify=lambda ino, off, data: stored.append((ino, off, bytes(data))))
    locs = [ChunkLoc("p", c) for c, _ in refs]
    pusher.offer(img, locs[:3], [d for _, d in refs[:3]])
    pusher.offer(img, locs[3:], [d for _, d in refs[3:]])  # over the bound: dropped
    assert pusher._queue == deque() and pusher.stats["dropped"] == len(locs) - 3

    async def main():
        async with trio.open_nursery() as n:
            await n.start(pusher.run)
            img.opened = True
            pusher.opened(img)
            while pusher._queue or pusher._pending:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()

    trio.run(main)
    assert sum(fetched) == 3 and pusher._parked == {} and pusher._parked_bytes == 0
    blob = blob_bytes(img, files)
    pos = img.positions()
    want = {off for c, _ in refs[:3] for off, _ in pos[c.digest]}
    assert {off for _, off, _ in stored} <= want | {o for o in range(0, len(blob), 4096)}
    for _, off, data in stored:
        assert data == blob[off:off + len(data)]
    assert sum(len(d) for _, _, d in stored) >= sum(c.size for c, _ in refs[:3])


def test_layer_image_is_the_pure_build_with_the_digest_given_not_recomputed():
    """LayerImage passes its manifest digest as the image's UUID rather than encoding the
    manifest again (0.3 s for a 16,000-entry layer); the image is byte for byte what
    `erofs.build` makes on its own."""
    img, _, _ = layer()
    assert img.image.meta == erofs.build(img.manifest).meta
    sb_uuid = img.image.meta[1024 + 48:1024 + 64]  # the superblock's uuid field
    assert sb_uuid == bytes.fromhex(img.manifest.digest.removeprefix("sha256:"))[:16]
    stale = LayerImage(img.manifest, "L", "sha256:" + "ab" * 32)
    stale.build()
    assert stale.image.meta[1024 + 48:1024 + 64] == b"\xab" * 16


def test_parking_gives_its_bound_back_for_layers_that_are_never_opened():
    """A layer whose image could not be built is never mounted as EROFS: it parks nothing.
    One whose mount never came keeps its parked share only for PARK_TTL."""
    img, files, refs = layer()
    img.opened = False
    locs = [ChunkLoc("p", c) for c, _ in refs]
    pusher = PagePusher(store=None, max_pending=3 * CHUNK, notify=lambda *a: None)
    failed, _, _ = layer()
    failed.image, failed.error, failed.opened = None, "its EROFS image would take too much", False
    pusher.offer(failed, locs[:1])
    assert pusher._parked == {} and pusher._parked_bytes == 0
    pusher.offer(img, locs[:3])
    other, _, _ = layer()
    other.opened = False
    pusher.offer(other, locs[:1])  # the bound is taken by img's parked chunks
    assert pusher.stats["dropped"] == 1 and id(other) not in pusher._parked
    pusher.PARK_TTL = 0.0
    pusher._parked[id(img)] = (*pusher._parked[id(img)][:2], 0.0)  # img's mount never came
    pusher.offer(other, locs[:1])
    assert list(pusher._parked) == [id(other)]
    assert pusher._parked_bytes == locs[0].ref.size
