"""Pure units: manifest format v1 (encode, parse, validate, digest)."""

from __future__ import annotations

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
    (mutate(lambda d: d.update(version=2)), "unsupported version 2"),
    (mutate(lambda d: d.update(format="other")), "'format'"),
    (mutate(lambda d: d.update(chunk_size=0)), "chunk_size"),
    (mutate(lambda d: d["entries"][2].update(size=11)), "cover 10 bytes but size is 11"),
    (mutate(lambda d: d["entries"][2]["chunks"][0].__setitem__(0, 7)), "names blob 7"),
    (mutate(lambda d: d["entries"][2]["chunks"][0].__setitem__(5, "xyz")), "sha256"),
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
