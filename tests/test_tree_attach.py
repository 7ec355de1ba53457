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
