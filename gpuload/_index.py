"""Sharded checkpoints: which files make a model, in which order.

`parse_index` and `check_shards` are pure; `resolve` looks at the filesystem (a stat and a
directory listing) to turn what the user gave us (a file, a directory, an index) into the
ordered list of shards that one pipeline then reads front to back.

Index format (Hugging Face): {"metadata": {...}, "weight_map": {tensor name: shard file}}.
Shard names must be plain file names next to the index: an index is data from the model
repository and must not point us at other files on the machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ._io import open_regular
from .errors import IndexFileError, ReadError

INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_SIZE = 64 * 2**20


@dataclass(frozen=True)
class Checkpoint:
    shards: tuple[Path, ...]                 # in the order we read them
    weight_map: Mapping[str, str] | None     # from an index file, if there was one


def parse_index(raw: bytes) -> dict[str, str]:
    """The weight_map of an index file, validated."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IndexFileError(f"index is not valid JSON ({exc})") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise IndexFileError("index has no weight_map object")
    for name, shard in wm.items():
        if (not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard
                or shard in (".", "..")):
            raise IndexFileError(f"tensor {name!r} maps to {shard!r}, not a file name "
                                 f"next to the index")
    return dict(wm)


def shard_order(weight_map: Mapping[str, str]) -> list[str]:
    """Shard files sorted by name (model-00001-of-00004... sorts in file order)."""
    return sorted(set(weight_map.values()))


def check_shards(weight_map: Mapping[str, str], shard_tensors: Mapping[str, list[str]]) -> None:
    """Every tensor the index names lies in the shard it names, and no shard holds a
    tensor the index does not know or assigns elsewhere."""
    for shard, names in shard_tensors.items():
        for name in names:
            where = weight_map.get(name)
            if where != shard:
                raise IndexFileError(f"tensor {name!r} is in {shard} but the index says "
                                     f"{where or 'nothing'}")
    present = {n for names in shard_tensors.values() for n in names}
    missing = [n for n in weight_map if n not in present]
    if missing:
        raise IndexFileError(f"{len(missing)} tensors of the index are in no shard "
                             f"(first: {missing[0]!r} in {weight_map[missing[0]]})")


def resolve(path: str | os.PathLike[str]) -> Checkpoint:
    """A .safetensors file, an index file, or a directory holding either."""
    p = Path(path)
    try:
        is_dir = p.is_dir()
        exists = is_dir or p.exists()
    except OSError as exc:
        raise ReadError(f"{p}: {exc.strerror or exc}") from None
    if not exists:
        raise ReadError(f"{p}: no such file or directory")
    if not is_dir:
        return _index(p) if p.name.endswith(".index.json") else Checkpoint((p,), None)
    try:
        names = sorted(os.listdir(p))
    except OSError as exc:
        raise ReadError(f"{p}: {exc.strerror or exc}") from None
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if "model" + INDEX_SUFFIX in indexes:
        return _index(p / ("model" + INDEX_SUFFIX))
    if len(indexes) == 1:
        return _index(p / indexes[0])
    files = [p / n for n in names if n.endswith(".safetensors")]
    if not files:
        raise ReadError(f"{p}: no .safetensors files and no index in this directory")
    return Checkpoint(tuple(files), None)


def _index(p: Path) -> Checkpoint:
    try:
        with os.fdopen(open_regular(p), "rb") as f:  # a FIFO must not block the open
            raw = f.read(MAX_INDEX_SIZE + 1)
    except OSError as exc:
        raise ReadError(f"{p}: {exc.strerror or exc}") from None
    if len(raw) > MAX_INDEX_SIZE:
        raise IndexFileError(f"{p}: index larger than {MAX_INDEX_SIZE} bytes")
    try:
        wm = parse_index(raw)
    except IndexFileError as exc:
        raise IndexFileError(f"{p}: {exc}") from None
    return Checkpoint(tuple(p.parent / s for s in shard_order(wm)), wm)
