"""Pure units: recording a layer's start-up reads and reading a stored list back."""

from __future__ import annotations

import json

import pytest

from p2pfs.errors import P2PFSError
from p2pfs.manifest import ChunkRef, Entry, Manifest, with_starts
from p2pfs.startup import Recorder, encode, parse_list
from p2pfs.tree import build_tree


def test_records_first_reads_in_order_within_the_window_only():
    r = Recorder(window=5.0, max_chunks=4, idle=5.0)
    r.record("L", "a", range(0, 1), now=0.0)  # before the layer's first access: ignored
    r.start("L", now=10.0)
    assert r.due(now=30.0) == []  # opened, never read: the window has not started
    r.start("L", now=31.0)  # a second start does not move anything
    r.record("L", "bin/python", range(0, 2), now=40.5)  # the window starts at the first read
    r.record("L", "lib/x.so", range(3, 4), now=41.0)
    r.record("L", "bin/python", range(1, 2), now=42.0)  # seen: not repeated
    r.record("L", "late", range(0, 1), now=45.6)  # after the window
    assert r.due(now=45.4) == []
    assert r.due(now=45.6) == [("L", [("bin/python", 0), ("bin/python", 1), ("lib/x.so", 3)])]
    assert r.due(now=46.0) == []


def test_recording_is_bounded():
    r = Recorder(window=5.0, max_chunks=3)
    r.start("L", now=0.0)
    r.record("L", "f", range(0, 10), now=1.0)
    assert r.due(now=6.0) == [("L", [("f", 0), ("f", 1), ("f", 2)])]


def _tree():
    refs = tuple(ChunkRef(0, i * 4, 4, 4, "none", f"{i:064x}") for i in range(3))
    m = Manifest(chunk_size=4, blobs=("blobs/p",), kind="layer", blob_root="..", entries=(
        Entry(path="", type="dir"),
        with_starts(Entry(path="f", type="file", size=12, chunks=refs)),
        Entry(path="s", type="symlink", target="f")))
    return build_tree([("abc", m, "layers/")]), m


def test_a_stored_list_round_trips_to_the_chunks_the_layer_has():
    tree, m = _tree()
    data = encode(m.digest, 10.0, [("f", 2), ("f", 0)])
    locs = parse_list(data, tree, "abc")
    assert [loc.digest for loc in locs] == [f"{2:064x}", f"{0:064x}"]
    assert all(loc.key == "layers/blobs/p" for loc in locs)


def test_entries_naming_nothing_are_skipped():
    tree, m = _tree()
    doc = {"format": "p2pfs-startup", "version": 1, "files": [
        ["f", [7, -1, True, "0", 1]], ["missing", [0]], ["s", [0]], ["", [0]], "junk", ["f"]]}
    locs = parse_list(json.dumps(doc).encode(), tree, "abc")
    assert [loc.digest for loc in locs] == [f"{1:064x}"]


@pytest.mark.parametrize("data", [b"", b"[]", b'{"format":"x"}', b"\xff",
                                  b'{"format":"p2pfs-startup","version":2,"files":[]}'])
def test_malformed_lists_are_errors(data):
    tree, _ = _tree()
    with pytest.raises(P2PFSError, match="start-up list"):
        parse_list(data, tree, "abc")


def test_a_pause_in_reads_ends_the_recording_before_the_window():
    r = Recorder(window=60.0, idle=2.0)
    r.start("L", now=0.0)
    r.record("L", "a", range(0, 1), now=0.5)
    r.record("L", "b", range(0, 1), now=2.0)
    r.record("L", "a", range(0, 1), now=3.9)  # a chunk seen before does not extend it
    assert r.due(now=3.9) == []
    assert r.due(now=4.1) == [("L", [("a", 0), ("b", 0)])]


async def test_an_oversized_stored_list_is_refused_before_it_is_downloaded(tmp_path):
    from p2pfs.origin import LocalDirOrigin
    from p2pfs.startup import LIST_KEY, MAX_LIST_BYTES, StartupPrefetch

    tree, m = _tree()
    origin = LocalDirOrigin(tmp_path)
    (tmp_path / "layers/abc/.p2pfs").mkdir(parents=True)
    (tmp_path / "layers/abc" / LIST_KEY).write_bytes(b" " * (MAX_LIST_BYTES + 1))
    fetched = []
    get_range = origin.get_range

    async def counting_get_range(*args, **kw):
        fetched.append(args)
        return await get_range(*args, **kw)

    origin.get_range = counting_get_range
    sp = StartupPrefetch(origin=origin, store=None, tree=tree, window=5.0)
    sp.layers["abc"] = ("layers/abc/", m.digest)
    await sp._first_access("abc")
    assert sp.stats["list_errors"] == 1 and sp.stats["lists_loaded"] == 0 and not fetched
    assert sp.guess_ahead(tree.lookup_path("abc/f"))  # no list: pack read-ahead applies


async def test_a_blob_open_bypasses_the_page_cache_only_while_its_layer_is_recorded(tmp_path):
    """The blob's open waits for the layer's list lookup, at most LOOKUP_WAIT: no list means
    the layer is recorded (True), a list or a store that does not answer means not (False)."""
    import trio

    from p2pfs.origin import LocalDirOrigin
    from p2pfs.startup import LIST_KEY, StartupPrefetch

    class Stalled(LocalDirOrigin):
        async def head(self, key):
            await trio.sleep_forever()

    class NoStore:  # a listed layer's prefetch goes here: nothing to keep
        readahead_limit = 0

        async def warm(self, locs):
            pass

    async def bypass(origin) -> tuple[bool, float]:
        tree, m = _tree()
        sp = StartupPrefetch(origin=origin, store=NoStore(), tree=tree, window=5.0)
        sp.LOOKUP_WAIT = 0.3
        sp.layers["abc"] = ("layers/abc/", m.digest)
        node = tree.lookup_path("abc/f")
        async with trio.open_nursery() as nursery:
            await nursery.start(sp.run)
            assert await sp.bypass_page_cache(node) is False  # never touched: no lookup
            sp.touch(node)
            t0 = trio.current_time()
            out = await sp.bypass_page_cache(node)
            took = trio.current_time() - t0
            nursery.cancel_scope.cancel()
        return out, took

    assert (await bypass(LocalDirOrigin(tmp_path)))[0] is True  # no list: recorded
    out, took = await bypass(Stalled(tmp_path))
    assert out is False and 0.25 < took < 2
    (tmp_path / "layers/abc/.p2pfs").mkdir(parents=True)
    tree, m = _tree()
    (tmp_path / "layers/abc" / LIST_KEY).write_bytes(encode(m.digest, 5.0, [("f", 0)]))
    assert (await bypass(LocalDirOrigin(tmp_path)))[0] is False  # a list: prefetched instead
