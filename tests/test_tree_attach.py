"""Pure units: attaching models to a live namespace (layers appear without remounting)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings, strategies as st

from p2pfs.manifest import ChunkRef, Entry, Manifest, with_starts
from p2pfs.tree import ROOT_INODE, Tree, TreeConflict, build_tree


def manifest(*paths: str, hardlink: tuple[str, str] | None = None) -> Manifest:
    entries = [Entry(path="", type="dir", mode=0o755)]
    for p in paths:
        if p.endswith("/"):
            entries.append(Entry(path=p.rstrip("/"), type="dir", mode=0o700))
        else:
            entries.append(with_starts(Entry(path=p, type="file", size=3, chunks=(
                ChunkRef(0, 0, 3, 3, "none", "a" * 64),))))
    if hardlink:
        entries.append(Entry(path=hardlink[0], type="hardlink", target=hardlink[1]))
    return Manifest(chunk_size=4, blobs=("b",), entries=tuple(entries))


def listing(tree: Tree, node=None, prefix="") -> dict[str, tuple[int, int]]:
    """path -> (st_mode, nlink) for every name reachable from the root."""
    node = node or tree.nodes[ROOT_INODE]
    out = {}
    for name, inode in sorted(node.children.items()):
        child = tree.nodes[inode]
        path = prefix + name.decode()
        out[path] = (child.st_mode, child.nlink)
        if child.children is not None:
            out.update(listing(tree, child, path + "/"))
    return out


def test_attach_keeps_existing_inodes_and_reports_touched_dirs():
    tree = build_tree([("aa", manifest("x", "d/", "d/y"), "p/aa/")])
    before = {p: tree.lookup_path(p).inode for p in ("aa", "aa/x", "aa/d", "aa/d/y")}
    touched = tree.attach("bb", manifest("z"), "p/")
    assert touched == {ROOT_INODE: (b"bb",)}
    assert {p: tree.lookup_path(p).inode for p in before} == before
    z = tree.lookup_path("bb/z")
    assert z is not None and z.blob_prefix == "p/" and z.inode > max(before.values())
    assert tree.models.keys() == {"aa", "bb"}
    assert tree.nodes[ROOT_INODE].nlink == 4  # ".", "..", aa, bb


def test_conflicting_attach_changes_nothing():
    tree = build_tree([("aa", manifest("x", "d/"), "p/")])
    snapshot = copy.deepcopy((tree.nodes, tree.models, tree.next_inode))
    for mount_dir, m in [("aa", manifest("q")), ("aa/x", manifest("q")), ("aa/d", manifest("q"))]:
        with pytest.raises(TreeConflict):
            tree.attach(mount_dir, m, "p/")
        assert (tree.nodes, tree.models, tree.next_inode) == snapshot


def test_hard_links_share_an_inode_after_attach():
    tree = Tree()
    tree.attach("l1", manifest("f", "d/", hardlink=("d/g", "f")), "p/")
    f, g = tree.lookup_path("l1/f"), tree.lookup_path("l1/d/g")
    assert f is g and f.nlink == 2


def test_a_synthesized_empty_directory_may_become_a_model_root():
    tree = Tree()
    tree.attach("a/b", manifest("x"), "p/")
    tree.attach("a", manifest("y"), "p/")  # "a" existed only as a synthesized parent
    assert tree.lookup_path("a").entry is not None
    assert tree.lookup_path("a/b/x") is not None and tree.lookup_path("a/y") is not None


_names = st.text("abc", min_size=1, max_size=2)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(_names, min_size=1, max_size=2).map("/".join),
                          st.lists(_names, max_size=3, unique=True)), max_size=5))
def test_attaching_one_by_one_equals_building_at_once(models):
    ms = [(d, manifest(*files), "p/") for d, files in models]
    try:
        whole = build_tree(ms)
    except TreeConflict:
        whole = None
    tree = Tree()
    try:
        for m in sorted(ms, key=lambda m: m[0]):
            tree.attach(*m)
    except TreeConflict:
        assert whole is None
        return
    assert whole is not None and listing(tree) == listing(whole)
    inodes = [n.inode for n in tree.nodes.values()]
    assert len(set(inodes)) == len(inodes) and max(inodes) < tree.next_inode


def _layer(files: dict[str, list[tuple[int, int]]], pack: str = "blobs/p") -> Manifest:
    """A layer whose files' chunks sit at (offset, length) in one pack."""
    entries = [Entry(path="", type="dir")]
    for name, spans in files.items():
        refs = tuple(ChunkRef(0, off, n, n, "none", f"{off:064x}") for off, n in spans)
        entries.append(with_starts(Entry(path=name, type="file", size=sum(n for _, n in spans),
                                         chunks=refs)))
    return Manifest(chunk_size=4, blobs=(pack,), entries=tuple(entries), kind="layer", blob_root="..")


def test_pack_neighbours_are_the_next_chunks_of_the_pack_across_files_and_layers():
    tree = Tree()
    tree.attach("l1", _layer({"a": [(0, 10), (10, 10)], "b": [(20, 5)], "c": [(40, 10)]}), "r/")
    tree.attach("l2", _layer({"d": [(25, 15)]}), "r/")  # a later layer filled the gap
    a0 = tree.lookup_path("l1/a").locs(range(0, 1))[0]
    got = [(n.ref.offset, n.ref.length) for n in tree.pack_neighbours(a0, 30)]
    assert got == [(10, 10), (20, 5), (25, 15)]  # stored bytes after a0 up to 10 + 30
    assert all(n.key == "r/blobs/p" for n in tree.pack_neighbours(a0, 30))
    c = tree.lookup_path("l1/c").locs(range(0, 1))[0]
    assert tree.pack_neighbours(c, 100) == []


def test_models_indexed_in_place_have_no_pack_neighbours():
    tree = build_tree([("m", manifest("x", "y"), "p/m/")])
    x = tree.lookup_path("m/x").locs(range(0, 1))[0]
    assert tree.pack_neighbours(x, 1 << 20) == []


# -- where a layer's chunks go on local disk ------------------------------------------------
B = 4096  # the disk cache's block


def _spots(tree: Tree, path: str):
    node = tree.lookup_path(path)
    return [loc.spot for loc in node.locs(range(len(node.entry.chunks)))]


def test_a_layers_files_share_one_data_file_per_pack_in_pack_order():
    m = _layer({"z": [(30, 7)], "a": [(0, 10), (10, 10)], "b": [(20, 5)]})
    tree = Tree()
    tree.attach("l1", m, "r/")
    spots = {p: _spots(tree, f"l1/{p}") for p in ("a", "b", "z")}
    files = {s.file for ss in spots.values() for s in ss}
    assert len(files) == 1  # three files, one pack: one data file
    # In stored-offset order whatever the order of the entries, each on a block boundary.
    assert [(s.at, s.fsize) for s in spots["a"] + spots["b"] + spots["z"]] == [
        (0, 3 * B + 7), (B, 3 * B + 7), (2 * B, 3 * B + 7), (3 * B, 3 * B + 7)]
    # A pure function of the manifest: the same layer mounted again, or with other
    # layers around it, puts every chunk at the same spot (the cache's index records them).
    again = Tree()
    again.attach("other", _layer({"x": [(0, 3)]}, pack="blobs/p"), "r/")
    again.attach("l1", m, "r/")
    assert {p: _spots(again, f"l1/{p}") for p in spots} == spots


def test_two_layers_sharing_a_pack_get_their_own_data_files_and_two_packs_two():
    tree = Tree()
    tree.attach("l1", _layer({"a": [(0, 10)]}), "r/")
    tree.attach("l2", _layer({"a": [(0, 10)], "b": [(40, 6)]}), "r/")
    tree.attach("l3", _layer({"c": [(0, 8)]}, pack="blobs/q"), "r/")
    s1, s2, s3 = (_spots(tree, p)[0] for p in ("l1/a", "l2/a", "l3/c"))
    assert len({s1.file, s2.file, s3.file}) == 3
    assert (s1.at, s1.fsize, s2.at, s2.fsize) == (0, 10, 0, B + 6)
    assert _spots(tree, "l2/b")[0] == type(s2)(s2.file, B, B + 6)


def test_a_hostile_layer_with_two_refs_at_one_offset_gets_no_overlapping_spots():
    refs = (ChunkRef(0, 0, 5, 5, "none", "1" * 64), ChunkRef(0, 0, 5, 9, "none", "2" * 64))
    m = Manifest(chunk_size=16, blobs=("blobs/p",), kind="layer", blob_root="..", entries=(
        Entry(path="", type="dir"),
        with_starts(Entry(path="a", type="file", size=5, chunks=refs[:1])),
        with_starts(Entry(path="b", type="file", size=9, chunks=refs[1:]))))
    tree = Tree()
    tree.attach("l", m, "r/")
    (a,), (b,) = _spots(tree, "l/a"), _spots(tree, "l/b")
    ranges = sorted([(a.at, a.at + 5), (b.at, b.at + 9)])
    assert ranges[0][1] <= ranges[1][0] and a.fsize == b.fsize == ranges[1][1]


def test_a_models_files_keep_a_data_file_each():
    tree = build_tree([("m", manifest("x", "y"), "p/m/")])
    (x,), (y,) = _spots(tree, "m/x"), _spots(tree, "m/y")
    assert x.file == tree.lookup_path("m/x").file_id and (x.at, x.fsize) == (0, 3)
    assert y.file == x.file  # same bytes, same chunk list: one local copy
