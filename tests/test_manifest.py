"""Pure units: manifest format v1 (encode, parse, validate, digest)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings, strategies as st

from p2pfs.errors import ManifestError
from p2pfs.manifest import ChunkRef, Entry, Manifest, parse, with_starts

H = "ab" * 32


def small_manifest() -> Manifest:
    f = with_starts(Entry(path="d/model.bin", type="file", size=10, mode=0o640, uid=3, gid=4,
                          mtime_ns=123, xattrs={"user.k": b"\x00v"},
                          chunks=(ChunkRef(0, 0, 6, 6, "none", H), ChunkRef(0, 6, 4, 4, "none", H))))
    return Manifest(chunk_size=6, blobs=("d/model.bin", "pack"), entries=(
        Entry(path="", type="dir"), Entry(path="d", type="dir"), f,
        Entry(path="d/link", type="symlink", target="model.bin", size=9),
        Entry(path="d/hard", type="hardlink", target="d/model.bin"),
        with_starts(Entry(path="z.txt", type="file", size=5,
                          chunks=(ChunkRef(1, 100, 3, 5, "zstd", H),))),
    ), kind="layer", annotations={"source": "test"})


def test_round_trip_and_digest_are_stable():
    m = small_manifest()
    data = m.encode()
    back = parse(data)
    assert back == m
    assert back.encode() == data
    assert back.digest == m.digest and m.digest.startswith("sha256:")
    assert back.entries[2].starts == (0, 6)
    assert back.entries[2].chunk_index(5) == 0 and back.entries[2].chunk_index(6) == 1


def test_a_blake3_manifest_is_version_3_and_round_trips():
    m = small_manifest()
    b3 = dataclasses.replace(m, chunk_hash="blake3", entries=tuple(
        dataclasses.replace(e, chunks=tuple(dataclasses.replace(c, hash="blake3") for c in e.chunks))
        for e in m.entries))
    doc = json.loads(b3.encode())
    assert doc["version"] == 3 and doc["chunk_hash"] == "blake3"
    back = parse(b3.encode())
    assert back == b3 and all(c.hash == "blake3" for e in back.files() for c in e.chunks)
    assert "chunk_hash" not in json.loads(m.encode()) and m.version == 1
    layer = dataclasses.replace(b3, blob_root="..")
    assert parse(layer.encode()).version == 3  # v3 may have a blob_root too
    # A manifest built with refs of another hash than its own is not encoded.
    with pytest.raises(ValueError, match="chunk_hash"):
        dataclasses.replace(b3, chunk_hash="sha256").encode()
    for edit, message in ((lambda d: d.update(chunk_hash="md5"), "'chunk_hash' must be one of"),
                          (lambda d: d.update(version=1), "version 3 is exactly"),
                          (lambda d: d.pop("chunk_hash"), "version 3 is exactly"),
                          (lambda d: d.update(chunk_hash="sha256"), "version 3 is exactly")):
        doc = json.loads(b3.encode())
        edit(doc)
        with pytest.raises(ManifestError, match=message):
            parse(json.dumps(doc).encode())


def test_pinned_digest_is_checked():
    m = small_manifest()
    parse(m.encode(), expected_digest=m.digest)
    with pytest.raises(ManifestError, match="not the pinned"):
        parse(m.encode(), expected_digest="sha256:" + "0" * 64)


def mutate(fn):
    doc = json.loads(small_manifest().encode())
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("bad, message", [
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "top level must be an object"),
    (mutate(lambda d: d.update(version=4)), "unsupported version 4"),
    (mutate(lambda d: d.update(version=2)), "version 2 the other ones"),
    (mutate(lambda d: d.update(blob_root="..")), "version 2 the other ones"),
    (mutate(lambda d: d.update(version=2, blob_root="../..")), "'blob_root'"),
    (mutate(lambda d: d.update(format="other")), "'format'"),
    (mutate(lambda d: d.update(chunk_size=0)), "chunk_size"),
    (mutate(lambda d: d["entries"][2].update(size=11)), "cover 10 bytes but size is 11"),
    (mutate(lambda d: d["entries"][2]["chunks"][0].__setitem__(0, 7)), "names blob 7"),
    (mutate(lambda d: d["entries"][2]["chunks"][0].__setitem__(5, "xyz")), "digest must be 64"),
    (mutate(lambda d: d["entries"][2]["chunks"][0].__setitem__(4, "lz4")), "unknown compression"),
    (mutate(lambda d: d["entries"][2]["chunks"][0].__setitem__(2, 5)), "length != size"),
    (mutate(lambda d: d["entries"][2].update(path="../etc/passwd")), "not normalized"),
    (mutate(lambda d: d["entries"][2].update(path="/abs")), "must be relative"),
    (mutate(lambda d: d["entries"].append(d["entries"][1])), "duplicate path"),
    (mutate(lambda d: d["entries"][3].update(target="")), "symlink without a target"),
    (mutate(lambda d: d["entries"][4].update(target="d")), "must point at a file"),
    (mutate(lambda d: d["entries"][2].update(type="socket")), "unknown type"),
    (mutate(lambda d: d["entries"][0].update(type="file")), "root entry"),
    (mutate(lambda d: d.pop("entries")), "'entries'"),
    (mutate(lambda d: d["entries"][2].update(size="10")), "must be an integer"),
    (mutate(lambda d: d["blobs"].append("../x")), "not normalized"),
])
def test_malformed_manifests_are_rejected_with_a_reason(bad, message):
    with pytest.raises(ManifestError, match=message):
        parse(bad, source="s3://b/m")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_never_crash_the_parser(data):
    try:
        parse(data)
    except ManifestError:
        pass


names = st.text(alphabet="abcxyz09_-.", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, st.lists(st.integers(1, 1000), max_size=5), max_size=8))
def test_generated_trees_round_trip(files):
    entries = [Entry(path="", type="dir")]
    blobs = []
    for name, sizes in sorted(files.items()):
        chunks, off = [], 0
        for s in sizes:
            chunks.append(ChunkRef(len(blobs), off, s, s, "none", H))
            off += s
        entries.append(with_starts(Entry(path=name, type="file", size=off, chunks=tuple(chunks))))
        blobs.append(name)
    m = Manifest(chunk_size=1000, blobs=tuple(blobs), entries=tuple(entries))
    back = parse(m.encode())
    assert back == m
    for e in back.files():
        for off in range(0, e.size, 97):
            i = e.chunk_index(off)
            assert e.starts[i] <= off < e.starts[i] + e.chunks[i].size


# -- issue 12: values that parse as JSON but not as what the kernel or Python accepts ------
def _doc(**entry) -> dict:
    f = {"path": "f", "type": "file", "size": 4, "chunks": [[0, 0, 4, 4, "none", H]]}
    f.update(entry)
    return {"format": "p2pfs-manifest", "version": 1, "chunk_size": 4, "blobs": ["b"],
            "entries": [{"path": "", "type": "dir"}, f]}


@pytest.mark.parametrize("field,value", [
    ("uid", 1 << 40), ("gid", 1 << 32), ("uid", 2**32 - 1), ("mtime_ns", 2**63), ("rdev", 2**32),
    ("mode", 2**64), ("size", 2**63),
])
def test_integers_past_the_kernels_types_are_refused(field, value):
    """Defect 1: such values passed validation, then an OverflowError in a FUSE handler
    ended the whole mount on the first `ls`."""
    with pytest.raises(ManifestError, match=field):
        parse(json.dumps(_doc(**{field: value})).encode())


def test_the_largest_accepted_values_fit_the_kernels_attributes():
    import pyfuse3

    from p2pfs.manifest import MAX_ID, MAX_OFF, MAX_RDEV
    m = parse(json.dumps(_doc(uid=MAX_ID, gid=MAX_ID, mtime_ns=MAX_OFF, rdev=MAX_RDEV)).encode())
    e = m.entries[1]
    a = pyfuse3.EntryAttributes()
    a.st_uid, a.st_gid, a.st_rdev, a.st_mtime_ns = e.uid, e.gid, e.rdev, e.mtime_ns
    a.st_size = MAX_OFF
    a.st_blocks = (MAX_OFF + 511) // 512


@pytest.mark.parametrize("data,needle", [
    (b'{"format":"p2pfs-manifest","version":1,"chunk_size":' + b"7" * 5000 + b"}", "JSON"),
    (b"[" * 200000 + b"]" * 200000, "nested"),
    (json.dumps(_doc(path="f\ud800")).encode(), "surrogate"),
    (json.dumps(_doc(path="x" * 256)).encode(), "255"),
    (json.dumps(_doc(xattrs={"user.\udc80": "AA=="})).encode(), "surrogate"),
    (json.dumps(_doc(xattrs={"user.k": 5})).encode(), "base64"),
    (json.dumps({**_doc(), "annotations": {"a": 5}}).encode(), "annotation"),
    (json.dumps({**_doc(), "kind": {"x": 1}}).encode(), "kind"),
])
def test_hostile_documents_are_a_manifest_error_not_a_crash(data, needle):
    """Defect 4: these raised exceptions `parse` did not map, so a multi-model mount failed
    with a traceback instead of skipping the one bad model."""
    with pytest.raises(ManifestError, match=needle):
        parse(data)


@pytest.mark.parametrize("chunk,needle", [
    ([0, 0, 65000, 2**31, "zstd", H], "size"),  # a 2 GiB chunk: the zstd-bomb carrier
    ([0, 0, 2**30, 4, "zstd", H], "stored length"),
    ([0, 2**63 - 2, 4, 4, "none", H], "2\\*\\*63"),
])
def test_chunk_sizes_are_bounded_at_parse_time(chunk, needle):
    """Defect 3: an unbounded chunk size let one 4 KiB read allocate 2 GiB."""
    with pytest.raises(ManifestError, match=needle):
        parse(json.dumps(_doc(size=chunk[3], chunks=[chunk])).encode())


def test_an_ancestor_that_is_a_file_is_refused():
    doc = _doc()
    doc["entries"].append({"path": "f/x/y", "type": "dir"})
    with pytest.raises(ManifestError, match="not a directory"):
        parse(json.dumps(doc).encode())


def test_models_that_conflict_are_skipped_one_by_one():
    from p2pfs.tree import build_tree_skipping
    a = parse(json.dumps(_doc(path="b")).encode())  # model "a" holds a file "b"
    b = parse(json.dumps(_doc()).encode())  # model "a/b" needs "a/b" to be a directory
    c = parse(json.dumps(_doc()).encode())
    tree, problems = build_tree_skipping([("a", a, "a/"), ("a/b", b, "a/b/"), ("c", c, "c/")])
    assert sorted(tree.models) == ["a", "c"]
    assert len(problems) == 1 and "a/b" in problems[0]
    assert tree.lookup_path("c/f") is not None and tree.lookup_path("a/b").entry.type == "file"


def test_blob_root_parent_is_version_2_and_resolves_to_the_parent_prefix():
    m = dataclasses.replace(small_manifest(), kind="layer", blob_root="..")
    data = m.encode()
    assert json.loads(data)["version"] == 2
    back = parse(data)
    assert back.blob_root == ".." and back == m
    assert back.blob_prefix("layers/ab12/") == "layers/"
    assert back.blob_prefix("ab12/") == ""
    with pytest.raises(ManifestError, match="under a prefix"):
        back.blob_prefix("")
    assert small_manifest().version == 1 and small_manifest().blob_prefix("m/") == "m/"
