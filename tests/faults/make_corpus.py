"""Regenerate tests/faults/corpus/: hostile manifests, one file per case, and INDEX.json.

    .venv/bin/python tests/faults/make_corpus.py

Every case starts from one valid manifest (`_base`: a 48 KiB file in three 16 KiB chunks
of blob `data`, a directory and a symlink) and changes one thing. Values that Python's json
module cannot write (integers of more than 4300 digits, nesting deeper than its recursion
limit) are spliced in as raw JSON text, so the files hold exactly what a hostile publisher
would upload. `data.bin` is the blob the chunks point into; `bomb.zst` is one zstd frame of
512 MiB of zeros (about 16 KB stored).

INDEX.json maps each case to its class, a note, and the defects of issue 12 it exposed on
the code of 2026-12-01 (commit 7c3646a): `parse` for the in-process checks, `mount` for a
real mount (all fixed since; the record stays in INDEX.json).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable

import zstandard

HERE = Path(__file__).parent / "corpus"
CHUNK = 16 * 1024
DATA = random.Random(20261201).randbytes(3 * CHUNK)
BOMB_SIZE = 512 * 1024 * 1024
SHA = [hashlib.sha256(DATA[i:i + CHUNK]).hexdigest() for i in range(0, len(DATA), CHUNK)]
RAW = "@RAW{}@"  # placeholder for raw JSON text


def _nowhere(name: str) -> str:
    """A digest no bytes of the corpus have: such a chunk can only come from its range."""
    return hashlib.sha256(name.encode()).hexdigest()


def _base() -> dict[str, Any]:
    return {
        "format": "p2pfs-manifest", "version": 1, "kind": "model", "chunk_size": CHUNK,
        "blobs": ["data"],
        "entries": [
            {"path": "", "type": "dir", "mode": 0o755},
            {"path": "f.bin", "type": "file", "mode": 0o644, "size": len(DATA),
             "chunks": [[0, i * CHUNK, CHUNK, CHUNK, "none", SHA[i]] for i in range(3)]},
            {"path": "d", "type": "dir", "mode": 0o755},
            {"path": "d/link", "type": "symlink", "mode": 0o777, "target": "../f.bin"},
        ],
        "annotations": {"source": "fault corpus"},
    }


def _bomb() -> bytes:
    c = zstandard.ZstdCompressor(level=19).compressobj(size=BOMB_SIZE)
    zeros = bytes(1 << 20)
    out = [c.compress(zeros) for _ in range(BOMB_SIZE >> 20)]
    out.append(c.flush())
    return b"".join(out)


def _file(doc):
    return doc["entries"][1]


def _add(doc, **entry):
    doc["entries"].append(entry)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# name: (class, note, mutation, defects {"parse": [...], "mount": [...]})
Mutation = Callable[[dict[str, Any], list[str]], None]
CASES: dict[str, tuple[str, str, Mutation, dict[str, list[int]]]] = {}


def case(name: str, cls: str, note: str, parse: tuple[int, ...] = (), mount: tuple[int, ...] = ()):
    def register(fn: Mutation) -> Mutation:
        CASES[name] = (cls, note, fn, {"parse": list(parse), "mount": list(mount)})
        return fn
    return register


case("reference", "valid", "the unmodified base manifest: must mount and serve correct bytes")(
    lambda d, raw: None)
case("uid_2_40", "kernel-range", "uid 2**40 (uid_t is 32 bits)", (1,), (1,))(
    lambda d, raw: _file(d).update(uid=2**40))
case("gid_2_32", "kernel-range", "gid 2**32", (1,), (1,))(
    lambda d, raw: _file(d).update(gid=2**32))
case("uid_root_2_64", "kernel-range", "uid 2**64 on the model's root directory", (1,), (1,))(
    lambda d, raw: d["entries"][0].update(uid=2**64))
case("mtime_2_63", "kernel-range", "mtime_ns 2**63 (signed 64-bit nanoseconds)", (1,), (1,))(
    lambda d, raw: _file(d).update(mtime_ns=2**63))
case("mtime_2_80_dir", "kernel-range", "mtime_ns 2**80 on a directory", (1,), (1,))(
    lambda d, raw: d["entries"][2].update(mtime_ns=2**80))
case("rdev_2_64", "kernel-range", "a char device with rdev 2**64 (dev_t is 64 bits)", (1,), (1,))(
    lambda d, raw: _add(d, path="d/tty", type="char", mode=0o600, rdev=2**64))
case("rdev_2_40", "kernel-range", "a block device with rdev 2**40 (FUSE carries 32 bits)", (1,))(
    lambda d, raw: _add(d, path="d/sda", type="block", mode=0o600, rdev=2**40))
case("size_2_63", "kernel-range", "a file of 2**63 bytes (off_t is signed 64 bits): one zstd "
     "chunk of that size", (1, 3), (1, 3))(
    lambda d, raw: _add(d, path="huge", type="file", size=2**63,
                        chunks=[[0, 0, 100, 2**63, "zstd", _nowhere("huge")]]))
case("name_300_bytes", "kernel-range", "a file name of 300 bytes (NAME_MAX is 255)", (1,))(
    lambda d, raw: _add(d, path="n" * 300, type="file", size=CHUNK,
                        chunks=[[0, 0, CHUNK, CHUNK, "none", SHA[0]]]))
case("path_5000_bytes", "kernel-range", "a path of 5000 bytes in 25 levels (PATH_MAX bounds "
     "what a caller passes, not a FUSE tree's depth: either answer is fine)")(
    lambda d, raw: _add(d, path="/".join(["p" * 199] * 25), type="file", size=0, chunks=[]))
case("symlink_target_5000", "kernel-range", "a symlink target of 5000 bytes", (1,))(
    lambda d, raw: _add(d, path="longlink", type="symlink", target="t" * 5000))
case("xattr_value_128k", "kernel-range", "an xattr value of 128 KiB (XATTR_SIZE_MAX is 64 KiB)", (1,))(
    lambda d, raw: _file(d).update(xattrs={"user.big": __import__("base64").b64encode(
        bytes(128 * 1024)).decode()}))
case("digits_5000_uid", "huge-integer", "uid with 5000 decimal digits (Python refuses over 4300)",
     (4,), (4,))(lambda d, raw: (_file(d).update(uid=RAW.format(len(raw))), raw.append("7" * 5000)))
case("digits_5000_offset", "huge-integer", "a chunk offset of 5000 digits", (4,), (4,))(
    lambda d, raw: (_file(d)["chunks"][0].__setitem__(1, RAW.format(len(raw))),
                    raw.append("1" * 5000)))
case("nesting_100k", "deep-nesting", "an annotation nested 100000 lists deep", (4,), (4,))(
    lambda d, raw: (d["annotations"].update(x=RAW.format(len(raw))), raw.append(_deep(100000))))
case("nesting_990", "deep-nesting", "an annotation nested 990 deep: json parses it, str() "
     "of it may not", (4,), (4,))(
    lambda d, raw: (d["annotations"].update(x=RAW.format(len(raw))), raw.append(_deep(990))))
case("nesting_xattrs", "deep-nesting", "xattrs of an entry nested 50000 deep", (4,), (4,))(
    lambda d, raw: (_file(d).update(xattrs=RAW.format(len(raw))), raw.append(_deep(50000))))
case("surrogate_path", "lone-surrogate", "a file name holding a lone surrogate", (4,), (4,))(
    lambda d, raw: _add(d, path="s\ud800.bin", type="file", size=CHUNK,
                        chunks=[[0, 0, CHUNK, CHUNK, "none", SHA[0]]]))
case("surrogate_dir", "lone-surrogate", "a directory named by a lone low surrogate", (4,), (4,))(
    lambda d, raw: _add(d, path="\udfff", type="dir"))
case("surrogate_target", "lone-surrogate", "a symlink target with a lone surrogate")(
    lambda d, raw: _add(d, path="d/badlink", type="symlink", target="x\ud83d"))
case("surrogate_xattr", "lone-surrogate", "an xattr name with a lone surrogate", (4,), (4,))(
    lambda d, raw: _file(d).update(xattrs={"user.\udc80": "eA=="}))
case("surrogate_annotation", "lone-surrogate", "an annotation value with a lone surrogate", (4,), (4,))(
    lambda d, raw: d["annotations"].update(note="\ud800"))
case("surrogate_blob", "lone-surrogate", "a blob key with a lone surrogate", (4,), (4,))(
    lambda d, raw: d["blobs"].append("b\udbff"))
case("zstd_bomb", "huge-chunk", "one zstd chunk that inflates to 512 MiB (16 KB stored)", (3,), (3,))(
    lambda d, raw: (d["blobs"].append("bomb.zst"),
                    _add(d, path="bomb.bin", type="file", size=BOMB_SIZE,
                         chunks=[[1, 0, len(BOMB), BOMB_SIZE, "zstd", BOMB_SHA]])))
case("chunk_2_40_raw", "huge-chunk", "a raw chunk of 2**40 bytes in a 48 KiB blob", (3,), (3, 9))(
    lambda d, raw: _add(d, path="tera", type="file", size=2**40,
                        chunks=[[0, 0, 2**40, 2**40, "none", _nowhere("tera")]]))
case("chunk_size_2_62", "huge-chunk", "the manifest's chunk_size is 2**62", (3,))(
    lambda d, raw: d.update(chunk_size=2**62))
case("range_past_end", "short-blob", "a chunk range that ends 8 KiB past the end of its blob",
     (), (9,))(
    lambda d, raw: _add(d, path="past_end.bin", type="file", size=CHUNK,
                        chunks=[[0, 2 * CHUNK + CHUNK // 2, CHUNK, CHUNK, "none", _nowhere("past")]]))
case("offset_past_end", "short-blob", "a chunk that starts 1 GiB past the end of its blob", (), (9,))(
    lambda d, raw: _add(d, path="far.bin", type="file", size=CHUNK,
                        chunks=[[0, 1 << 30, CHUNK, CHUNK, "none", _nowhere("far")]]))
case("wrong_sha", "bad-data", "the second chunk's sha256 matches no bytes")(
    lambda d, raw: _file(d)["chunks"][1].__setitem__(5, _nowhere("wrong")))
case("digest_of_another_chunk", "bad-data", "the second chunk's sha256 is the first one's: "
     "content addressing may serve the first chunk's bytes there, or fail")(
    lambda d, raw: _file(d)["chunks"][1].__setitem__(5, SHA[0]))
case("bad_zstd", "bad-data", "a zstd chunk whose stored bytes are not a zstd frame")(
    lambda d, raw: _add(d, path="notzstd.bin", type="file", size=CHUNK,
                        chunks=[[0, 0, CHUNK, CHUNK, "zstd", _nowhere("notzstd")]]))
case("zstd_frame_lies", "huge-chunk", "a 1 MiB zstd chunk whose frame inflates to 512 MiB "
     "(zstandard ignores max_output_size when the frame states its size)", (), (3,))(
    lambda d, raw: (d["blobs"].append("bomb.zst"),
                    _add(d, path="lying.bin", type="file", size=1 << 20,
                         chunks=[[1, 0, len(BOMB), 1 << 20, "zstd", _nowhere("lying")]])))
case("duplicate_path", "structure", "the same path twice")(
    lambda d, raw: d["entries"].append(copy.deepcopy(d["entries"][1])))
case("parent_is_file", "structure", "an entry under a regular file")(
    lambda d, raw: _add(d, path="f.bin/x", type="dir"))
case("parent_is_symlink", "structure", "an entry under a symlink")(
    lambda d, raw: _add(d, path="d/link/x", type="dir"))
case("grandparent_is_file", "structure", "an entry two levels under a regular file, the level "
     "between missing (p2pfs synthesizes missing directories): build_tree raised ValueError",
     (0,), (0,))(
    lambda d, raw: _add(d, path="f.bin/a/b", type="dir"))
case("hardlink_to_dir", "structure", "a hard link to a directory")(
    lambda d, raw: _add(d, path="hl", type="hardlink", target="d"))
case("hardlink_to_missing", "structure", "a hard link to a path that does not exist")(
    lambda d, raw: _add(d, path="hl", type="hardlink", target="nope"))
case("hardlink_to_hardlink", "structure", "a hard link to a hard link")(
    lambda d, raw: (_add(d, path="hl1", type="hardlink", target="f.bin"),
                    _add(d, path="hl2", type="hardlink", target="hl1")))
case("dotdot_path", "structure", "a path escaping the model with ..")(
    lambda d, raw: _file(d).update(path="../../etc/passwd"))
case("absolute_path", "structure", "an absolute path")(
    lambda d, raw: _file(d).update(path="/etc/passwd"))
case("nul_in_path", "structure", "a NUL byte in a path")(
    lambda d, raw: _file(d).update(path="f\u0000.bin"))
case("root_not_dir", "structure", "the root entry is a file")(
    lambda d, raw: d["entries"][0].update(type="file", size=0, chunks=[]))
case("size_mismatch", "structure", "chunks cover less than the file size")(
    lambda d, raw: _file(d).update(size=len(DATA) + 1))
case("blob_index_past", "structure", "a chunk names blob 5 of 1")(
    lambda d, raw: _file(d)["chunks"][0].__setitem__(0, 5))
case("type_100k", "bad-type", "an entry type that is a 100 KB string: the reason must not quote "
     "it whole (one line a person reads, bounded in logs and status)", (0,), (0,))(
    lambda d, raw: _add(d, path="x", type="t" * 100000))
case("negative_uid", "bad-type", "uid -1")(lambda d, raw: _file(d).update(uid=-1))
case("bool_size", "bad-type", "size true")(lambda d, raw: _file(d).update(size=True))
case("float_mtime", "bad-type", "mtime_ns 1.5")(lambda d, raw: _file(d).update(mtime_ns=1.5))
case("string_mode", "bad-type", "mode '0644'")(lambda d, raw: _file(d).update(mode="0644"))
case("null_entries", "bad-type", "entries null")(lambda d, raw: d.update(entries=None))
case("chunk_not_list", "bad-type", "a chunk that is an object")(
    lambda d, raw: _file(d)["chunks"].__setitem__(0, {"blob": 0}))
case("xattr_not_base64", "bad-type", "an xattr value that is not base64")(
    lambda d, raw: _file(d).update(xattrs={"user.k": "!!!"}))
case("xattr_value_int", "bad-type", "an xattr value that is an integer")(
    lambda d, raw: _file(d).update(xattrs={"user.k": 5}))
case("version_2", "bad-type", "an unknown format version")(lambda d, raw: d.update(version=2))
case("top_level_list", "bad-type", "a JSON list instead of an object")(
    lambda d, raw: (d.clear(), d.update(x=RAW.format(len(raw))), raw.append("[1, 2, 3]")))


def render(mutation: Mutation) -> bytes:
    doc, raw = _base(), []
    mutation(doc, raw)
    text = json.dumps(doc, ensure_ascii=True, indent=1)
    if list(doc) == ["x"] and raw and doc["x"] == RAW.format(0):  # whole document raw
        return raw[0].encode()
    for i, token in enumerate(raw):
        text = text.replace(json.dumps(RAW.format(i)), token)
    return text.encode()


BOMB = _bomb()
BOMB_SHA = hashlib.sha256(bytes(BOMB_SIZE)).hexdigest()


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for old in HERE.glob("*.json"):
        old.unlink()
    (HERE / "data.bin").write_bytes(DATA)
    (HERE / "bomb.zst").write_bytes(BOMB)
    index = {}
    for name, (cls, note, fn, defects) in CASES.items():
        (HERE / f"{name}.json").write_bytes(render(fn))
        index[name] = {"class": cls, "note": note, "defects": defects}
    (HERE / "INDEX.json").write_text(json.dumps(index, indent=1, ensure_ascii=True) + "\n")
    print(f"{len(CASES)} cases, bomb {len(BOMB)} bytes")


if __name__ == "__main__":
    main()
