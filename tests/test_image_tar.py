"""Pure: OCI layer tar streams -> manifest entries and zstd packs (p2pfs/image/_tar.py,
_pack.py). Tars are built here with Python's tarfile (an independent writer) or, for what
tarfile will not write, block by block."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings, strategies as st

from p2pfs.errors import LayerError
from p2pfs.image import LayerTree, Packer, StoredChunk, clean_path, read_layer
from p2pfs.image._pack import encode_index, parse_index
from p2pfs.manifest import MAX_PATH_BYTES, Entry, Manifest, check_path, chunk_digest, parse

KiB = 1024


class Layer:
    """A tar built member by member."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields) -> "Layer":
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        ti.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
        for k, v in fields.items():
            setattr(ti, k, v)
        self.tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


class Store:
    """Packs kept in memory, so tests can read contents back through the chunk refs."""

    def __init__(self, chunk_size: int = 64 * KiB, pack_size: int = 1 << 20, known=None,
                 chunk_hash: str = "blake3") -> None:
        self.packs: dict[str, bytes] = {}
        self.indexes: dict[str, list] = {}
        self.packer = Packer(self._seal, known=known, chunk_size=chunk_size, pack_size=pack_size,
                             chunk_hash=chunk_hash)

    def _seal(self, pack: str, data: bytes, rows: list) -> None:
        assert hashlib.sha256(data).hexdigest() == pack
        self.packs[pack] = data
        self.indexes[pack] = rows

    def content(self, manifest: Manifest, e: Entry) -> bytes:
        out = bytearray()
        for c in e.chunks:
            frame = self.packs[manifest.blobs[c.blob].removeprefix("blobs/")][c.offset : c.offset + c.length]
            assert zstandard.frame_content_size(frame) == c.size  # what store/_verify.py requires
            plain = zstandard.ZstdDecompressor().decompress(frame, max_output_size=c.size)
            assert chunk_digest(c.hash, plain) == c.digest
            out += plain
        return bytes(out)


def convert(data: bytes, store: Store | None = None) -> tuple[dict[str, Entry], Manifest, Store]:
    store = store or Store()
    src = io.BytesIO(data)
    entries = read_layer(src.read, store.packer.store)
    store.packer.finish()
    assert src.read() == b""  # read to the end: a caller's hash covers the whole stream
    m = Manifest(kind="layer", blob_root="..", chunk_size=store.packer.chunk_size,
                 blobs=tuple(store.packer.blobs), entries=entries,
                 chunk_hash=store.packer.chunk_hash)
    back = parse(m.encode())
    assert back.entries == m.entries
    return {e.path: e for e in back.entries}, back, store


def test_every_entry_type_and_its_metadata():
    big = random.Random(1).randbytes(200 * KiB + 7)
    data = (Layer()
            .add("./", tarfile.DIRTYPE, mode=0o755, mtime=1_700_000_000)
            .add("usr/", tarfile.DIRTYPE, mode=0o750, uid=1, gid=2)
            .add("usr/bin/su", data=b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0)
            .add("usr/bin/wall", data=b"wall", mode=0o2755, gid=5)
            .add("tmp/", tarfile.DIRTYPE, mode=0o1777)
            .add("empty/", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000)
            .add("big.bin", data=big, mode=0o600, uid=4_000_000_000, mtime=1_600_000_000)
            .add("zero", data=b"")
            .add("usr/bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox", mode=0o777)
            .add("usr/bin/su2", tarfile.LNKTYPE, linkname="usr/bin/su")
            .add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
            .add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=300, mode=0o660, gid=6)
            .add("run/fifo", tarfile.FIFOTYPE, mode=0o620)
            .add("caps", data=b"x", pax_headers={"SCHILY.xattr.security.capability": "\x01\x00",
                                                 "SCHILY.xattr.user.note": "hé",
                                                 "mtime": "1700000000.123456789"})
            .bytes())
    es, m, store = convert(data)
    assert es[""].type == "dir" and es[""].mtime_ns == 1_700_000_000 * 10**9
    assert (es["usr"].mode, es["usr"].uid, es["usr"].gid) == (0o750, 1, 2)
    assert es["usr/bin"].type == "dir" and es["usr/bin"].mode == 0o755  # synthesized
    assert es["usr/bin/su"].mode == 0o4755 and es["usr/bin/su"].st_mode & 0o4000
    assert es["usr/bin/wall"].mode == 0o2755 and es["usr/bin/wall"].gid == 5
    assert es["tmp"].mode == 0o1777
    assert es["empty"].type == "dir" and (es["empty"].uid, es["empty"].gid) == (1000, 1000)
    assert store.content(m, es["big.bin"]) == big and es["big.bin"].size == len(big)
    assert len(es["big.bin"].chunks) == 4  # 64 KiB chunks: 3 full and the rest
    assert es["big.bin"].uid == 4_000_000_000 and es["big.bin"].mtime_ns == 1_600_000_000 * 10**9
    assert es["zero"].size == 0 and es["zero"].chunks == ()
    assert (es["usr/bin/sh"].type, es["usr/bin/sh"].target) == ("symlink", "/bin/busybox")
    assert (es["usr/bin/su2"].type, es["usr/bin/su2"].target) == ("hardlink", "usr/bin/su")
    assert (es["dev/null"].type, es["dev/null"].rdev, es["dev/null"].mode) == ("char", os.makedev(1, 3), 0o666)
    assert (es["dev/sda"].type, es["dev/sda"].rdev) == ("block", os.makedev(8, 300))
    assert es["run/fifo"].type == "fifo" and es["run/fifo"].mode == 0o620
    assert dict(es["caps"].xattrs) == {"security.capability": b"\x01\x00", "user.note": "hé".encode()}
    assert es["caps"].mtime_ns == 1_700_000_000_123_456_789
    assert list(es) == sorted(es)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_format(fmt):
    deep = "/".join(["d" * 90] * 2) + "/f.txt"  # over 100 bytes: prefix, PAX path or GNU 'L'
    ustar = fmt == tarfile.USTAR_FORMAT  # names up to 255 bytes, link targets up to 100
    target = "t" * 99 if ustar else "/" + "t" * 200
    linked = "short" if ustar else deep
    es, m, store = convert(Layer(fmt).add(deep, data=b"deep").add("short", data=b"s")
                           .add("ln", tarfile.SYMTYPE, linkname=target)
                           .add("hard", tarfile.LNKTYPE, linkname=linked).bytes())
    assert store.content(m, es[deep]) == b"deep"
    assert es["ln"].target == target
    assert es["hard"].target == linked


def test_whiteouts_and_opaque_dirs_as_overlayfs_expects():
    es, _, _ = convert(Layer()
                       .add("etc/", tarfile.DIRTYPE)
                       .add("etc/.wh.passwd")
                       .add("var/lib/.wh..wh..opq")  # its directory is not listed: synthesized
                       .add("opt/", tarfile.DIRTYPE, mode=0o711)
                       .add("opt/.wh..wh..opq")
                       .add("opt/keep", data=b"k")
                       .add("x/.wh..wh.plnk", tarfile.DIRTYPE)  # other AUFS metadata: skipped
                       .bytes())
    wh = es["etc/passwd"]
    assert (wh.type, wh.rdev, wh.mode) == ("char", 0, 0)
    assert "etc/.wh.passwd" not in es and not any(".wh." in p for p in es)
    assert es["var/lib"].type == "dir" and es["var/lib"].xattrs == {"trusted.overlay.opaque": b"y"}
    assert "trusted.overlay.opaque" not in es["var"].xattrs
    assert es["opt"].mode == 0o711 and es["opt"].xattrs["trusted.overlay.opaque"] == b"y"
    assert es["opt/keep"].type == "file"  # the layer's own entries stay in an opaque dir


def test_whiteout_then_same_layer_dir_is_an_opaque_dir():
    # `.wh.d` removes the lower `d`, then this layer makes a new `d`: nothing below shows.
    es, _, _ = convert(Layer().add(".wh.d").add("d/", tarfile.DIRTYPE).add(".wh.e").add("e/f", data=b"")
                       .bytes())
    assert es["d"].type == "dir" and es["d"].xattrs == {"trusted.overlay.opaque": b"y"}
    assert es["e"].type == "dir" and es["e"].xattrs == {"trusted.overlay.opaque": b"y"}
    assert es["e/f"].type == "file"


def test_later_entries_replace_earlier_ones():
    es, m, store = convert(Layer()
                           .add("f", data=b"old")
                           .add("f", data=b"new", mode=0o600)
                           .add("d/", tarfile.DIRTYPE, mode=0o700)
                           .add("d/child", data=b"c")
                           .add("d/", tarfile.DIRTYPE, mode=0o755, uid=7)  # merges
                           .add("gone/sub/x", data=b"x")
                           .add("gone", data=b"now a file")  # the subtree goes
                           .add("s", tarfile.SYMTYPE, linkname="a")
                           .add("s/", tarfile.DIRTYPE)  # a symlink replaced by a directory
                           .add("wh", data=b"here")
                           .add(".wh.wh")  # whiteout after the entry: later wins
                           .bytes())
    assert store.content(m, es["f"]) == b"new" and es["f"].mode == 0o600
    assert es["d"].uid == 7 and es["d"].mode == 0o755 and "d/child" in es
    assert es["gone"].type == "file" and not any(p.startswith("gone/") for p in es)
    assert es["s"].type == "dir"
    assert es["wh"].type == "char"


def test_hard_links_follow_their_file_through_replacement():
    es, m, store = convert(Layer()
                           .add("a", data=b"first", mode=0o640, uid=3)
                           .add("b", tarfile.LNKTYPE, linkname="a")
                           .add("c", tarfile.LNKTYPE, linkname="b")  # a link to a link: to the file
                           .add("a", data=b"second")  # b and c keep the old inode
                           .add("d", tarfile.LNKTYPE, linkname="c")
                           .bytes())
    assert store.content(m, es["a"]) == b"second"
    assert es["b"].type == "file" and store.content(m, es["b"]) == b"first"
    assert (es["b"].mode, es["b"].uid) == (0o640, 3)
    assert es["c"].target == "b" and es["d"].target == "b"


def test_hard_link_over_its_own_name_keeps_the_inode():
    # `ln b a` where b -> a: tar removes a, then links it to b's inode (the old a).
    es, m, store = convert(Layer().add("a", data=b"A").add("b", tarfile.LNKTYPE, linkname="a")
                           .add("a", tarfile.LNKTYPE, linkname="b").bytes())
    assert es["b"].type == "file" and store.content(m, es["b"]) == b"A"
    assert (es["a"].type, es["a"].target) == ("hardlink", "b")


def test_removing_a_directory_promotes_links_outside_it():
    es, m, store = convert(Layer().add("d/f", data=b"F").add("l", tarfile.LNKTYPE, linkname="d/f")
                           .add("d/g", tarfile.LNKTYPE, linkname="d/f")
                           .add("d", data=b"").bytes())
    assert es["l"].type == "file" and store.content(m, es["l"]) == b"F"
    assert not any(p.startswith("d/") for p in es)


def test_hard_link_to_a_symlink_or_device_is_a_copy():
    es, _, _ = convert(Layer().add("s", tarfile.SYMTYPE, linkname="t", mode=0o777)
                       .add("s2", tarfile.LNKTYPE, linkname="s")
                       .add("null", tarfile.CHRTYPE, devmajor=1, devminor=3)
                       .add("null2", tarfile.LNKTYPE, linkname="null").bytes())
    assert (es["s2"].type, es["s2"].target) == ("symlink", "t")
    assert (es["null2"].type, es["null2"].rdev) == ("char", os.makedev(1, 3))


def test_paths_are_normalized_inside_the_tree():
    es, _, _ = convert(Layer().add("/abs/file", data=b"")
                       .add("./dot//slash/./x", data=b"").add("a/b/../c", data=b"").bytes())
    assert {"abs/file", "dot/slash/x", "a/c"} <= set(es)
    assert clean_path("/") == "" and clean_path("./a/") == "a"


@pytest.mark.parametrize("layer,message", [
    (lambda: Layer().add("../etc/passwd", data=b"x"), "escapes"),
    (lambda: Layer().add("a/../../x", data=b"x"), "escapes"),
    (lambda: Layer().add("x" * 256, data=b""), "over 255"),
    (lambda: Layer().add("/".join(["d" * 200] * 21), data=b""), f"over {MAX_PATH_BYTES}"),
    (lambda: Layer().add("f", data=b"x").add("f/g", data=b""), "not a directory"),
    (lambda: Layer().add("s", tarfile.SYMTYPE, linkname="/etc").add("s/passwd", data=b""),
     "not a directory"),
    (lambda: Layer().add("l", tarfile.LNKTYPE, linkname="missing"), "does not hold"),
    (lambda: Layer().add("a", data=b"").add("a", tarfile.LNKTYPE, linkname="a"), "does not hold"),
    (lambda: Layer().add("l", tarfile.LNKTYPE, linkname="../../x"), "escapes"),
    (lambda: Layer().add("d/", tarfile.DIRTYPE).add("l", tarfile.LNKTYPE, linkname="d"), "directory"),
    (lambda: Layer().add("s", tarfile.SYMTYPE, linkname=""), "symlink"),
    (lambda: Layer().add("x", data=b"", pax_headers={"SCHILY.xattr.user.big": "v" * 70000}), "over 65536"),
    (lambda: Layer().add("dev", tarfile.CHRTYPE, devmajor=5000, devminor=1), "out of range"),
    (lambda: Layer().add(".", data=b"root as a file"), "root"),
    (lambda: Layer().add("d/.wh.", data=b""), "names no entry"),
])
def test_hostile_members_are_refused_clearly(layer, message):
    with pytest.raises(LayerError, match=message):
        convert(layer().bytes())


def header(name: bytes = b"f", kind: bytes = b"0", size: bytes | int = 0, *, linkname: bytes = b"",
           mode: bytes = b"0000644", magic: bytes = b"ustar\x0000", **raw: bytes) -> bytes:
    """One ustar header block with a valid checksum; fields given raw where tests need it."""
    b = bytearray(512)
    b[0:len(name)] = name[:100]
    b[100:108] = mode.ljust(8, b"\0")
    b[108:116] = raw.get("uid", b"0000000\0")
    b[116:124] = raw.get("gid", b"0000000\0")
    b[124:136] = size if isinstance(size, bytes) else b"%011o\0" % size
    b[136:148] = raw.get("mtime", b"00000000000\0")
    b[156:157] = kind
    b[157:157 + len(linkname)] = linkname[:100]
    b[257:265] = magic
    b[329:337] = raw.get("devmajor", b"0000000\0")
    b[337:345] = raw.get("devminor", b"0000000\0")
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def pax(records: dict[str, bytes] | bytes) -> bytes:
    if isinstance(records, dict):
        body = b""
        for k, v in records.items():
            rec = b" " + k.encode() + b"=" + v + b"\n"
            n = len(rec) + 1
            while len(str(n)) + len(rec) != n:
                n += 1
            body += str(n).encode() + rec
    else:
        body = records
    return header(b"PaxHeader", b"x", len(body)) + body + bytes(-len(body) % 512)


def test_hand_made_headers_tarfile_would_not_write():
    body = b"hello"
    data = (header(b"base256", size=b"\x80" + bytes(10) + bytes([len(body)])) + body + bytes(507)
            + header(b"neg-mtime", mtime=b"\xff" * 12)  # base-256 negative: clamped to 0
            + header(b"olddir/", kind=b"\0", magic=bytes(8))  # v7: a dir by its slash
            + header(b"vol", kind=b"V")  # a volume label: no entry
            + bytes(1024) + b"trailing bytes after the end are read and ignored")
    es, m, store = convert(data)
    assert store.content(m, es["base256"]) == body
    assert es["neg-mtime"].mtime_ns == 0
    assert es["olddir"].type == "dir" and "vol" not in es


@pytest.mark.parametrize("data,message", [
    (b"", "end-of-archive"),
    (header(), "end-of-archive"),  # cut at a member boundary (a compressed stream cut short)
    (header() [:300], "truncated"),
    (header(size=10) + b"short", "truncated"),
    (header(size=b"77777777777\0"), "truncated"),  # 8 GiB declared, nothing follows
    (b"\x01" * 512, "checksum"),
    (header(size=b"12x4\0\0\0\0\0\0\0\0"), "checksum|not octal"),
    (header(b"s", kind=b"S"), "sparse"),
    (header(b"w", kind=b"Z"), "unsupported"),
    (header(b"PaxHeader", b"x", size=b"\x80" + bytes(5) + (1 << 40).to_bytes(6, "big")), "PAX"),
    (pax(b"999 path=x\n") + header(b"f"), "bad PAX"),
    (pax(b"abc path=x\n") + header(b"f"), "bad PAX"),
    (pax({"mtime": b"soon"}) + header(b"f"), "mtime"),
    (pax({"GNU.sparse.map": b"0,1"}) + header(b"f"), "sparse"),
    (pax({"path": b"\xff\xfe"}) + header(b"f"), "UTF-8"),
    (header(b"\xc3\x28"), "UTF-8"),
    (pax({"uid": b"99999999999"}) + header(b"f"), "out of range"),
    (pax({"size": b"12k"}) + header(b"f"), "bad PAX"),
    (pax({"path": b"a\0b"}) + header(b"f"), "NUL"),
    (pax({"SCHILY.xattr.": b"v"}) + header(b"f"), "xattr name"),
])
def test_hostile_streams_are_refused_clearly(data, message):
    with pytest.raises(LayerError, match=message):
        convert(data)


def test_pax_records_override_the_header():
    data = pax({"path": b"real/name", "linkpath": b"", "size": b"3", "uid": b"77",
                "SCHILY.xattr.trusted.overlay.opaque": b"y"}) + header(b"trunc", size=0) + b"abc" + bytes(509) \
        + bytes(1024)
    es, m, store = convert(data)
    e = es["real/name"]
    assert store.content(m, e) == b"abc" and e.uid == 77
    assert e.xattrs == {"trusted.overlay.opaque": b"y"}


def test_chunks_dedup_within_a_layer_and_against_known_packs():
    same = random.Random(2).randbytes(150 * KiB)
    es, m, store = convert(Layer().add("a", data=same).add("b", data=same).add("c", data=b"small").bytes())
    assert es["a"].chunks == es["b"].chunks  # the same frames, stored once
    st1 = store.packer.statistics()
    assert st1.dedup_bytes == len(same) and st1.new_chunks == 4
    assert store.packer.chunk_hash == "blake3" and m.version == 3  # the default
    known = {sha: StoredChunk(pack, off, length, size, "blake3")
             for pack, rows in store.indexes.items() for sha, off, length, size in rows}
    store2 = Store(known=known)
    es2, m2, _ = convert(Layer().add("copy", data=same).add("new", data=b"fresh").bytes(), store2)
    st2 = store2.packer.statistics()
    assert st2.dedup_bytes == len(same) and st2.new_chunks == 1
    assert store.content(m2, es2["copy"]) == same  # read from the first layer's pack
    assert {m2.blobs[c.blob] for c in es2["copy"].chunks} == {m.blobs[es["a"].chunks[0].blob]}
    # Chunks known under another hash are not reused: their digests name other bytes' hash.
    other = {sha: StoredChunk(c.pack, c.offset, c.length, c.size, "sha256") for sha, c in known.items()}
    store3 = Store(known=other)
    convert(Layer().add("copy", data=same).bytes(), store3)
    assert store3.packer.statistics().dedup_bytes == 0


def test_a_sha256_conversion_makes_a_v2_manifest_and_index():
    data = random.Random(6).randbytes(300 * KiB)
    store = Store(chunk_hash="sha256")
    es, m, _ = convert(Layer().add("f", data=data).bytes(), store)
    assert m.version == 2 and m.chunk_hash == "sha256"
    assert [c.digest for c in es["f"].chunks] == [
        hashlib.sha256(data[i:i + store.packer.chunk_size]).hexdigest()
        for i in range(0, len(data), store.packer.chunk_size)]
    assert store.content(m, es["f"]) == data
    rows = [("ab" * 32, 0, 10, 10)]
    assert json.loads(encode_index(rows, "blake3"))["hash"] == "blake3"
    assert parse_index("p", encode_index(rows, "blake3"))["ab" * 32].hash == "blake3"
    assert "hash" not in json.loads(encode_index(rows))
    with pytest.raises(ValueError, match="unknown chunk hash"):
        parse_index("p", b'{"chunks": [], "hash": "md5"}')


def test_chunks_straddle_the_pieces_read():
    data = random.Random(4).randbytes(2 * (1 << 20) + 12345)  # pieces of 1 MiB, chunks of 100000
    store = Store(chunk_size=100_000)
    es, m, _ = convert(Layer().add("f", data=data).bytes(), store)
    assert [c.size for c in es["f"].chunks] == [100_000] * 21 + [len(data) - 2_100_000]
    assert store.content(m, es["f"]) == data


def test_packs_are_bounded_and_indexed():
    data = random.Random(3).randbytes(40 * 64 * KiB)  # incompressible
    store = Store(pack_size=256 * KiB)
    es, m, _ = convert(Layer().add("f", data=data).bytes(), store)
    assert len(store.packs) >= 10
    assert all(len(p) <= 256 * KiB for p in store.packs.values())
    assert store.content(m, es["f"]) == data
    for pack, rows in store.indexes.items():
        assert parse_index(pack, encode_index(rows)) == {
            sha: StoredChunk(pack, o, n, s) for sha, o, n, s in rows}
        blob = store.packs[pack]
        assert sum(n for _, _, n, _ in rows) == len(blob)
    with pytest.raises(ValueError):
        parse_index("p", b'{"chunks": [["nothex", 0, 1, 1]]}')


def test_the_tree_bounds_entries():
    tree = LayerTree(max_entries=3)
    tree.add(Entry(path="a", type="dir"))
    tree.add(Entry(path="b", type="fifo"))
    with pytest.raises(LayerError, match="over 3 entries"):
        tree.add(Entry(path="c", type="fifo"))


# -- fuzz: hostile tars -------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "..", ".", "", "/", ".wh.a", ".wh..wh..opq", ".wh..wh.x",
                         ".wh.", "x" * 255, "y" * 256, "é", "d/"])
PATHS = st.lists(NAMES, min_size=1, max_size=5).map("/".join)
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
MEMBERS = st.lists(st.tuples(PATHS, KINDS, PATHS, st.integers(0, 3 * KiB),
                             st.integers(0, 2**32), st.integers(0, 5000)), max_size=12)


def check_result(data: bytes) -> None:
    """Either LayerError, or a manifest that parses with every path inside the tree."""
    try:
        es, m, store = convert(data)
    except LayerError:
        return
    for p, e in es.items():
        check_path(p)
        assert not p.startswith("/") and ".." not in p.split("/")
        if e.type == "file":
            assert len(store.content(m, e)) == e.size
        if e.type == "hardlink":
            assert es[e.target].type == "file"


def build(members) -> bytes:
    layer = Layer(tarfile.PAX_FORMAT)
    for name, kind, link, size, ident, dev in members:
        fields = {"uid": ident, "gid": ident}
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            fields["linkname"] = link
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            fields.update(devmajor=dev, devminor=dev)
        layer.add(name, kind, bytes(size) if kind == tarfile.REGTYPE else b"", **fields)
    return layer.bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MEMBERS, st.data())
def test_fuzz_hostile_tars(members, data):
    raw = build(members)
    check_result(raw)
    cut = data.draw(st.integers(0, len(raw)))
    check_result(raw[:cut])  # truncated anywhere
    if raw:
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4))
        mutated = bytearray(raw)
        for pos, value in flips:
            mutated[pos] = value
        check_result(bytes(mutated))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
@example(bytes(512) + b"x")
def test_fuzz_random_bytes(raw):
    check_result(raw)


FIELDS = st.sampled_from(["uid", "gid", "mtime", "devmajor", "devminor"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=100), st.sampled_from(b"0123456789xgLKSVZ\0"),
                          st.one_of(st.integers(0, 2000), st.binary(min_size=12, max_size=12)),
                          st.dictionaries(FIELDS, st.binary(min_size=8, max_size=8)),
                          st.binary(max_size=600)), max_size=6))
def test_fuzz_hand_made_headers(members):
    """Headers with valid checksums and arbitrary fields: numbers in any encoding, every type
    flag, PAX and long-name bodies of random bytes."""
    raw = b""
    for name, kind, size, fields, body in members:
        if isinstance(size, int) and kind in b"xgLK0":
            body = body[:size].ljust(size, b"\0")
        raw += header(name, bytes([kind]), size, linkname=name, **fields)
        if isinstance(size, int):
            raw += body + bytes(-len(body) % 512)
    check_result(raw)


def test_memory_stays_bounded_for_a_big_file():
    """64 MiB of content streamed through: never held whole (one piece, one chunk, one pack)."""
    import tracemalloc

    size = 64 << 20
    piece = random.Random(5).randbytes(1 << 20)

    def stream():
        yield header(b"big", size=size)
        for i in range(size >> 18):  # every 256 KiB chunk distinct: packs fill up
            yield i.to_bytes(8, "big") + piece[8 : 256 * KiB]
        yield bytes(1024)

    parts = stream()
    pending = b""

    def read(n: int) -> bytes:
        nonlocal pending
        if not pending:
            pending = next(parts, b"")
        out, pending = pending[:n], pending[n:]
        return out

    sealed = []
    packer = Packer(lambda pack, data, rows: sealed.append(len(data)), chunk_size=256 * KiB,
                    pack_size=4 << 20)
    tracemalloc.start()
    try:
        entries = read_layer(read, packer.store)
        packer.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert entries[-1].size == size and sum(sealed) > 60 << 20
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"
