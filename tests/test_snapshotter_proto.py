"""snapshotter/_proto.py against containerd's own .proto files (`make install` unpacks them
from Debian's golang-github-containerd-containerd-dev; skipped where they are absent), and
the wire bytes of a few messages against hand-computed protobuf encodings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from snapshotter import _proto as pb

#: Where `make install` unpacks them, else where the Debian package installs them.
UNPACKED = Path(__file__).resolve().parent.parent / ".venv/share/containerd-api"
API = UNPACKED if UNPACKED.is_dir() else Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
SNAPSHOTS = API / "services/snapshots/v1/snapshots.proto"
MOUNT = API / "types/mount.proto"
needs_protos = pytest.mark.skipif(not SNAPSHOTS.exists() or not MOUNT.exists(),
                                  reason="containerd's .proto files are not installed "
                                         "(make install, or apt-get install golang-github-containerd-containerd-dev)")

_FIELD = re.compile(r"(repeated\s+)?(map<\s*\w+\s*,\s*\w+\s*>|[\w.]+)\s+(\w+)\s*=\s*(\d+)")


def _strip(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.S)


def proto_messages(path: Path) -> dict[str, set[tuple[str, int, str, bool]]]:
    out = {}
    for name, body in re.findall(r"message\s+(\w+)\s*\{([^}]*)\}", _strip(path.read_text())):
        fields = set()
        for rep, typ, fname, num in _FIELD.findall(re.sub(r"\[[^\]]*\]", "", body)):
            typ = "map" if typ.startswith("map<") else typ
            fields.add((fname, int(num), typ.split(".")[-1], bool(rep)))
        out[name] = fields
    return out


def ours(table) -> set[tuple[str, int, str, bool]]:
    return {(n, num, typ.split(".")[-1], rep) for n, num, typ, rep in table}


@needs_protos
def test_every_message_and_field_matches_containerds_proto():
    theirs = proto_messages(SNAPSHOTS)
    assert set(theirs) == set(pb.FIELDS)
    for name, fields in theirs.items():
        assert ours(pb.FIELDS[name]) == fields, name
    assert ours(pb.MOUNT_FIELDS) == proto_messages(MOUNT)["Mount"]
    assert re.search(r"package\s+containerd\.types\s*;", MOUNT.read_text())
    assert re.search(rf"package\s+{re.escape(pb.PACKAGE)}\s*;", SNAPSHOTS.read_text())


@needs_protos
def test_the_service_and_the_kind_enum_match():
    text = _strip(SNAPSHOTS.read_text())
    rpcs = {name: (req, resp.split(".")[-1], bool(stream)) for name, req, stream, resp in re.findall(
        r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(stream\s+)?([\w.]+)\s*\)", text)}
    assert rpcs == {n: (req, resp.split(".")[-1], s) for n, (req, resp, s) in pb.RPCS.items()}
    enum = re.search(r"enum\s+Kind\s*\{([^}]*)\}", text).group(1)
    assert dict((k, int(v)) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", enum)) == pb.KINDS
    assert re.search(rf"service\s+{pb.SERVICE}\s*\{{", text)


def test_wire_bytes():
    # PrepareSnapshotRequest{key=2:"k", labels=4:{"a":"b"}}: tag 0x12, len 1, "k"; tag 0x22, entry.
    assert pb.PrepareSnapshotRequest(key="k", labels={"a": "b"}).SerializeToString() == \
        b"\x12\x01k\x22\x06\x0a\x01a\x12\x01b"
    # Mount{type=1, options=4 repeated}
    assert pb.Mount(type="bind", options=["ro", "rbind"]).SerializeToString() == \
        b"\x0a\x04bind\x22\x02ro\x22\x05rbind"
    # UsageResponse{size=1, inodes=2} varints; Info.kind=3 COMMITTED
    assert pb.UsageResponse(size=300, inodes=1).SerializeToString() == b"\x08\xac\x02\x10\x01"
    assert pb.Info(kind=pb.KINDS["COMMITTED"]).SerializeToString() == b"\x18\x03"
    # UpdateSnapshotRequest.update_mask=3 is a google.protobuf.FieldMask (paths=1)
    req = pb.UpdateSnapshotRequest()
    req.update_mask.paths.append("labels")
    assert req.SerializeToString() == b"\x1a\x08\x0a\x06labels"


def test_well_known_types_are_the_runtimes():
    info = pb.Info()
    info.created_at.FromNanoseconds(1_500_000_000_123)
    assert info.created_at.ToNanoseconds() == 1_500_000_000_123
    assert pb.Empty.DESCRIPTOR.full_name == "google.protobuf.Empty"
    assert pb.method_path("List") == "/containerd.services.snapshots.v1.Snapshots/List"
