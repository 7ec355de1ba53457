"""Hostile manifests, in process: thousands of generated ones plus the corpus.

The contract: `parse` returns a Manifest or raises ManifestError, never anything else; and
a manifest it accepts is one the daemon can serve: it encodes and parses back to itself
(the manifest cache stores it so), builds a tree alone and beside others, and every FUSE
handler that needs no kernel (getattr, lookup, opendir, readlink, open, listxattr,
getxattr, statfs) answers every node with values inside the kernel's types. A chunk it
accepts fits a memory budget (CHUNK_BOUND)."""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
from typing import Any

import pyfuse3
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from p2pfs import manifest as manifest_mod
from p2pfs.config import FetchConfig
from p2pfs.errors import ManifestError
from p2pfs.fs import Operations
from p2pfs.manifest import Manifest, parse
from p2pfs.metrics import Metrics
from p2pfs.tree import build_tree

from .conftest import CORPUS, FIGURES

MiB = 1 << 20
#: No chunk bigger than this can be served within a memory budget; the format's own
#: bound (manifest.MAX_CHUNK_SIZE) may be tighter.
CHUNK_BOUND = min(getattr(manifest_mod, "MAX_CHUNK_SIZE", 256 * MiB), 256 * MiB)
STORED_BOUND = CHUNK_BOUND + CHUNK_BOUND // 64 + 4096
# Kernel types: uid_t/gid_t 32 bits ((uid_t)-1 means "no change"), off_t and timespec
# nanoseconds signed 64, FUSE's attr.rdev 32 bits; NAME_MAX, PATH_MAX, XATTR_*_MAX.
MAX_ID, MAX_OFF, MAX_RDEV = 2**32 - 2, 2**63 - 1, 2**32 - 1
NAME_MAX, PATH_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX = 255, 4095, 255, 65536

INDEX: dict[str, dict[str, Any]] = json.loads((CORPUS / "INDEX.json").read_text())


def _xfail(defects: list[int], where: str) -> list:
    """No marks: every defect a corpus case exposed (recorded in corpus/INDEX.json) is fixed."""
    return []


# -- the invariants ------------------------------------------------------------------------
_OPS: Operations | None = None


def _ops(tree) -> Operations:
    """One Operations for the whole module (its metrics may register with prometheus),
    pointed at each tree in turn."""
    global _OPS
    if _OPS is None:
        _OPS = Operations(tree, None, fetch=FetchConfig(), metrics=Metrics(), attr_timeout=1.0,
                          control_path="/run/p2pfs-test.sock")
    _OPS.tree = tree
    return _OPS


def _call(coro) -> Any:
    """Run a handler that should not need to wait for anything (no event loop here)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("a metadata handler awaited something")


def _check_attr(a: pyfuse3.EntryAttributes, what: str) -> None:
    assert 0 <= a.st_uid <= MAX_ID and 0 <= a.st_gid <= MAX_ID, f"{what}: uid/gid {a.st_uid}/{a.st_gid}"
    assert 0 <= a.st_size <= MAX_OFF, f"{what}: size {a.st_size}"
    assert 0 <= a.st_blocks <= MAX_OFF, f"{what}: blocks {a.st_blocks}"
    for t in (a.st_mtime_ns, a.st_ctime_ns, a.st_atime_ns):
        assert 0 <= t <= MAX_OFF, f"{what}: time {t}"
    assert 0 <= a.st_rdev <= MAX_RDEV, f"{what}: rdev {a.st_rdev}"
    assert 1 <= a.st_nlink < 2**32, f"{what}: nlink {a.st_nlink}"
    assert stat.S_IFMT(a.st_mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                                      stat.S_IFBLK, stat.S_IFIFO), f"{what}: mode {a.st_mode:o}"


def check_accepted(m: Manifest) -> None:
    """What every manifest `parse` accepts must allow (see the module docstring)."""
    assert isinstance(m, Manifest)
    data = m.encode()
    assert parse(data, expected_digest=m.digest) == m, "the canonical encoding does not parse back"
    assert 0 < m.chunk_size <= CHUNK_BOUND, f"chunk_size {m.chunk_size}"
    for e in m.files():
        assert sum(c.size for c in e.chunks) == e.size
        for c in e.chunks:
            assert 0 < c.size <= CHUNK_BOUND, f"{e.path!r}: a chunk of {c.size} bytes"
            assert 0 < c.length <= STORED_BOUND, f"{e.path!r}: a stored chunk of {c.length} bytes"
            assert 0 <= c.blob < len(m.blobs)
    build_tree([("x/y", m, "x/y/"), ("z", m, "z/")])  # beside another model
    tree = build_tree([("", m, "")])
    ops = _ops(tree)
    st_fs = _call(ops.statfs(None))
    assert 0 <= st_fs.f_blocks < 2**64 and 0 <= st_fs.f_files < 2**64
    for inode, node in list(tree.nodes.items()):
        what = f"inode {inode} ({node.entry.path if node.entry else 'synthesized'!r})"
        _check_attr(_call(ops.getattr(inode, None)), what)
        names = _call(ops.listxattr(inode, None))
        for name in names:
            assert 0 < len(name) <= XATTR_NAME_MAX, f"{what}: xattr name of {len(name)} bytes"
            assert len(_call(ops.getxattr(inode, name, None))) <= XATTR_SIZE_MAX
        if node.children is not None:
            assert _call(ops.opendir(inode, None)) == inode
            for name in (b".", b"..", *node.children):
                assert 0 < len(name) <= NAME_MAX and b"/" not in name and b"\0" not in name, \
                    f"{what}: child name {name[:40]!r}... of {len(name)} bytes"
                _check_attr(_call(ops.lookup(inode, name, None)), f"{what}/{name[:40]!r}")
        elif stat.S_ISLNK(node.st_mode):
            target = _call(ops.readlink(inode, None))
            assert 0 < len(target) <= PATH_MAX and b"\0" not in target, f"{what}: target of {len(target)} bytes"
        elif stat.S_ISREG(node.st_mode):
            fi = _call(ops.open(inode, os.O_RDONLY, None))
            _call(ops.release(fi.fh))


def parse_and_check(data: bytes) -> bool:
    """True if accepted (and then checked), False if refused with a ManifestError. Any other
    exception propagates and fails the test."""
    try:
        m = parse(data, source="hostile")
    except ManifestError as exc:
        msg = str(exc)
        # One line a person reads; a hostile value is cut short, not quoted whole (a path
        # of PATH_MAX bytes may be).
        assert msg and "\n" not in msg, f"not a one-line reason: {msg[:200]!r}"
        assert len(msg) < 8192, f"a {len(msg)}-character error message: {msg[:200]!r}..."
        return False
    check_accepted(m)
    return True


# -- the corpus ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, marks=_xfail(c["defects"]["parse"], "parse"))
                                  for n, c in INDEX.items()])
def test_corpus_case(name: str) -> None:
    data = (CORPUS / f"{name}.json").read_bytes()
    FIGURES.ran("manifest corpus (in process)")
    accepted = parse_and_check(data)
    if name == "reference":
        assert accepted
    if INDEX[name]["class"] in ("structure", "bad-type"):
        assert not accepted, f"{name}: {INDEX[name]['note']} was accepted"


def test_corpus_index_matches_the_files() -> None:
    files = {p.stem for p in CORPUS.glob("*.json")} - {"INDEX"}
    assert files == set(INDEX), "regenerate with tests/faults/make_corpus.py"
    assert len(INDEX) >= 50


# -- generated manifests ---------------------------------------------------------------------
HEX = "ab" * 32
names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


@st.composite
def valid_docs(draw) -> dict[str, Any]:
    """A valid manifest as a JSON document: directories, files in chunks of two blobs,
    symlinks, hard links, devices and xattrs."""
    dirs = [""]
    for _ in range(draw(st.integers(0, 3))):
        dirs.append("/".join(filter(None, [draw(st.sampled_from(dirs)), draw(names)])))
    dirs = sorted(set(dirs))
    entries: list[dict[str, Any]] = [{"path": d, "type": "dir", "mode": 0o755} for d in dirs]
    used = set(dirs)
    files = []
    for _ in range(draw(st.integers(0, 4))):
        path = "/".join(filter(None, [draw(st.sampled_from(dirs)), draw(names)]))
        if path in used:
            continue
        used.add(path)
        sizes = draw(st.lists(st.integers(1, 5000), max_size=4))
        chunks, off = [], 0
        blob = draw(st.integers(0, 1))
        for s in sizes:
            comp = draw(st.sampled_from(["none", "zstd"]))
            chunks.append([blob, off, s if comp == "none" else draw(st.integers(1, 6000)), s, comp, HEX])
            off += s
        e = {"path": path, "type": "file", "mode": draw(st.integers(0, 0o7777)), "size": off,
             "chunks": chunks, "uid": draw(st.integers(0, 70000)), "gid": draw(st.integers(0, 70000)),
             "mtime_ns": draw(st.integers(0, 2**62))}
        if draw(st.booleans()):
            e["xattrs"] = {"user.k": "dmFsdWU="}
        entries.append(e)
        files.append(path)
    for kind in draw(st.lists(st.sampled_from(["symlink", "hardlink", "char", "fifo"]), max_size=3)):
        path = "/".join(filter(None, [draw(st.sampled_from(dirs)), draw(names)]))
        if path in used or (kind == "hardlink" and not files):
            continue
        used.add(path)
        e = {"path": path, "type": kind}
        if kind == "symlink":
            e["target"] = draw(names)
        elif kind == "hardlink":
            e["target"] = draw(st.sampled_from(files))
        elif kind == "char":
            e["rdev"] = draw(st.integers(0, 2**20))
        entries.append(e)
    draw(st.randoms()).shuffle(entries)
    return {"format": "p2pfs-manifest", "version": 1, "kind": "model", "chunk_size": 4096,
            "blobs": ["b0", "pack/b1"], "entries": entries, "annotations": {"a": "b"}}


RAW_TOKENS = ["9" * 4301, "-" + "1" * 5000, "[" * 5000 + "]" * 5000, "[" * 995 + "]" * 995,
              '{"a":' * 3000 + "1" + "}" * 3000, "1e400", "-1e400", "NaN", "Infinity", "-0", "1.0",
              "1E2", '"\\ud800"', '"a\\udfffb"', '"\\u0000"']
hostile_ints = st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**40,
                                2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100, -2**63,
                                64 * MiB, 64 * MiB + 1, 2**30]) | st.integers()
hostile_strings = st.sampled_from(["", ".", "..", "/", "a/../b", "a//b", "/abs", "\x00", "a\x00b",
                                   "\ud800", "x\udc00y", "n" * 256, "p/" * 2100 + "q", "file",
                                   "dir", "symlink", "hardlink", "zstd", "none", HEX, HEX.upper(), "t" * 20000,
                                   "p2pfs-manifest", "b0", "f"]) | \
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20)
hostile_leaf = (hostile_ints | hostile_strings | st.booleans() | st.none() |
                st.floats(allow_nan=True, allow_infinity=True) |
                st.sampled_from(RAW_TOKENS).map(lambda t: _Raw(t)))
hostile_values = st.recursive(hostile_leaf, lambda inner: st.lists(inner, max_size=6) |
                              st.dictionaries(hostile_strings, inner, max_size=4), max_leaves=12)


class _Raw:
    """JSON text spliced in verbatim (what json.dumps refuses to write)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _slots(doc: Any, path: tuple = ()) -> list[tuple]:
    """Every place in a JSON document a value sits: tuples of keys and indices."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_slots(v, path + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_slots(v, path + (i,)))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def encode(doc: Any) -> bytes:
    raws: list[str] = []

    def walk(v: Any) -> Any:
        if isinstance(v, _Raw):
            raws.append(v.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    text = json.dumps(walk(doc), allow_nan=True)  # surrogates escaped, so encodable
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode()


@st.composite
def mutated_docs(draw) -> bytes:
    doc = draw(valid_docs())
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc)
        path = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate", "add_key"]))
        if not path:
            if action == "replace":
                doc = draw(hostile_values)
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if action == "replace":
            parent[key] = draw(hostile_values)
        elif action == "delete":
            del parent[key]
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif action == "add_key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["uid", "gid", "mtime_ns", "size", "rdev", "mode", "target",
                                         "xattrs", "chunks", "type", "path", "kind", "blobs"]))] = \
                draw(hostile_values)
    return encode(doc)



@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_docs())
def test_generated_hostile_manifests(data: bytes) -> None:
    FIGURES.ran("generated manifests (in process)")
    parse_and_check(data)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_docs())
def test_generated_valid_manifests_are_accepted(doc: dict) -> None:
    FIGURES.ran("generated manifests (in process)")
    assert parse_and_check(encode(doc))


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_byte_level_mutations_of_the_reference(data) -> None:
    """Classic fuzzing: flip, insert and delete bytes of a valid manifest."""
    raw = bytearray((CORPUS / "reference.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.sampled_from([b"9" * 20, b"[", b"]", b"{", b'"', b"\\ud800",
                                                      b"\xff", b"-", b"0", b",", b"e99"]))
        else:
            del raw[pos:pos + data.draw(st.integers(1, 16))]
    FIGURES.ran("generated manifests (in process)")
    parse_and_check(bytes(raw))


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["format", "version", "chunk_size", "blobs", "entries",
                                        "annotations", "kind"]), hostile_values, max_size=7),
       st.lists(st.dictionaries(st.sampled_from(["path", "type", "mode", "uid", "gid", "mtime_ns",
                                                 "size", "target", "rdev", "xattrs", "chunks"]),
                                hostile_values, max_size=8), max_size=5))
def test_arbitrary_documents(top: dict, entries: list) -> None:
    doc = {"format": "p2pfs-manifest", "version": 1, "chunk_size": 4096, "blobs": ["b"],
           "entries": [{"path": "", "type": "dir"}, *entries], **top}
    FIGURES.ran("generated manifests (in process)")
    parse_and_check(encode(doc))


def test_handlers_answer_eio_not_an_exception_for_a_broken_node() -> None:
    """A node whose attributes cannot be converted (as if a manifest value slipped through)
    must get EIO from every handler, not an exception that ends pyfuse3.main()."""
    from p2pfs.manifest import Entry

    m = parse((CORPUS / "reference.json").read_bytes())
    tree = build_tree([("", m, "")])
    ops = _ops(tree)
    node = next(n for n in tree.nodes.values() if n.entry is not None and n.entry.type == "file")
    node.entry = Entry(**{**{f: getattr(node.entry, f) for f in Entry.__dataclass_fields__},
                          "uid": 2**40})
    parent = tree.nodes[node.parent]
    name = next(k for k, v in parent.children.items() if v == node.inode)
    for coro in (ops.getattr(node.inode, None), ops.lookup(parent.inode, name, None)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            _call(coro)
        assert e.value.errno == errno.EIO
