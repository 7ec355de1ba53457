"""containerd's snapshots.v1 service and messages, built at import time.

Why no generated `_pb2.py`: see _descriptors.py, which turns the field tables below into
descriptors. These tables are written from containerd's
api/services/snapshots/v1/snapshots.proto and api/types/mount.proto (the same on the
wire in containerd 1.6, 1.7 and 2.x); tests/test_snapshotter_proto.py compares them
field by field with those files where Debian's golang-github-containerd-containerd-dev
installed them. The well-known types (Timestamp, FieldMask, Empty) are the runtime's own,
so `Timestamp.FromNanoseconds` and friends work on our messages.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import (descriptor_pb2, descriptor_pool, empty_pb2, field_mask_pb2,
                             message_factory, timestamp_pb2)

from ._descriptors import add_message

PACKAGE = "containerd.services.snapshots.v1"
SERVICE = "Snapshots"
TYPES_PACKAGE = "containerd.types"
MOUNT_FILE = "github.com/containerd/containerd/api/types/mount.proto"
SNAPSHOTS_FILE = "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"

#: Kind enum values (package level in snapshots.proto).
KINDS = {"UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}

_MOUNTS = ".containerd.types.Mount"
_TS = ".google.protobuf.Timestamp"
# message -> [(field, number, type, repeated)]; type: a scalar name, "map" (string->string),
# or a fully qualified message/enum name.
FIELDS: dict[str, list[tuple[str, int, str, bool]]] = {
    "PrepareSnapshotRequest": [("snapshotter", 1, "string", False), ("key", 2, "string", False),
                               ("parent", 3, "string", False), ("labels", 4, "map", False)],
    "PrepareSnapshotResponse": [("mounts", 1, _MOUNTS, True)],
    "ViewSnapshotRequest": [("snapshotter", 1, "string", False), ("key", 2, "string", False),
                            ("parent", 3, "string", False), ("labels", 4, "map", False)],
    "ViewSnapshotResponse": [("mounts", 1, _MOUNTS, True)],
    "MountsRequest": [("snapshotter", 1, "string", False), ("key", 2, "string", False)],
    "MountsResponse": [("mounts", 1, _MOUNTS, True)],
    "RemoveSnapshotRequest": [("snapshotter", 1, "string", False), ("key", 2, "string", False)],
    "CommitSnapshotRequest": [("snapshotter", 1, "string", False), ("name", 2, "string", False),
                              ("key", 3, "string", False), ("labels", 4, "map", False)],
    "StatSnapshotRequest": [("snapshotter", 1, "string", False), ("key", 2, "string", False)],
    "Info": [("name", 1, "string", False), ("parent", 2, "string", False),
             ("kind", 3, f".{PACKAGE}.Kind", False), ("created_at", 4, _TS, False),
             ("updated_at", 5, _TS, False), ("labels", 6, "map", False)],
    "StatSnapshotResponse": [("info", 1, f".{PACKAGE}.Info", False)],
    "UpdateSnapshotRequest": [("snapshotter", 1, "string", False),
                              ("info", 2, f".{PACKAGE}.Info", False),
                              ("update_mask", 3, ".google.protobuf.FieldMask", False)],
    "UpdateSnapshotResponse": [("info", 1, f".{PACKAGE}.Info", False)],
    "ListSnapshotsRequest": [("snapshotter", 1, "string", False), ("filters", 2, "string", True)],
    "ListSnapshotsResponse": [("info", 1, f".{PACKAGE}.Info", True)],
    "UsageRequest": [("snapshotter", 1, "string", False), ("key", 2, "string", False)],
    "UsageResponse": [("size", 1, "int64", False), ("inodes", 2, "int64", False)],
    "CleanupRequest": [("snapshotter", 1, "string", False)],
}
MOUNT_FIELDS = [("type", 1, "string", False), ("source", 2, "string", False),
                ("target", 3, "string", False), ("options", 4, "string", True)]

_EMPTY = ".google.protobuf.Empty"
#: method -> (request, response, server streaming); responses outside the package are full names.
RPCS: dict[str, tuple[str, str, bool]] = {
    "Prepare": ("PrepareSnapshotRequest", "PrepareSnapshotResponse", False),
    "View": ("ViewSnapshotRequest", "ViewSnapshotResponse", False),
    "Mounts": ("MountsRequest", "MountsResponse", False),
    "Commit": ("CommitSnapshotRequest", _EMPTY, False),
    "Remove": ("RemoveSnapshotRequest", _EMPTY, False),
    "Stat": ("StatSnapshotRequest", "StatSnapshotResponse", False),
    "Update": ("UpdateSnapshotRequest", "UpdateSnapshotResponse", False),
    "List": ("ListSnapshotsRequest", "ListSnapshotsResponse", True),
    "Usage": ("UsageRequest", "UsageResponse", False),
    "Cleanup": ("CleanupRequest", _EMPTY, False),
}

def file_descriptors() -> tuple[descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto]:
    """(mount.proto, snapshots.proto) as FileDescriptorProtos."""
    mount = descriptor_pb2.FileDescriptorProto(name=MOUNT_FILE, package=TYPES_PACKAGE,
                                               syntax="proto3")
    add_message(mount, "Mount", MOUNT_FIELDS)
    snaps = descriptor_pb2.FileDescriptorProto(
        name=SNAPSHOTS_FILE, package=PACKAGE, syntax="proto3",
        dependency=["google/protobuf/empty.proto", "google/protobuf/field_mask.proto",
                    "google/protobuf/timestamp.proto", MOUNT_FILE])
    kind = snaps.enum_type.add(name="Kind")
    for name, number in KINDS.items():
        kind.value.add(name=name, number=number)
    for name, fields in FIELDS.items():
        add_message(snaps, name, fields, enums=[f".{PACKAGE}.Kind"])
    svc = snaps.service.add(name=SERVICE)
    for name, (req, resp, stream) in RPCS.items():
        svc.method.add(name=name, input_type=f".{PACKAGE}.{req}",
                       output_type=resp if resp.startswith(".") else f".{PACKAGE}.{resp}",
                       server_streaming=stream)
    return mount, snaps


def _build() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (empty_pb2, field_mask_pb2, timestamp_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        wkt.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    mount, snaps = file_descriptors()
    pool.Add(mount)
    pool.Add(snaps)
    classes = {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
               for name in FIELDS}
    classes["Mount"] = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{TYPES_PACKAGE}.Mount"))
    for wkt in ("Empty", "FieldMask", "Timestamp"):
        classes[wkt] = message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"google.protobuf.{wkt}"))
    return classes


MESSAGES = _build()
Mount = MESSAGES["Mount"]
Empty = MESSAGES["Empty"]
FieldMask = MESSAGES["FieldMask"]
Info = MESSAGES["Info"]
PrepareSnapshotRequest = MESSAGES["PrepareSnapshotRequest"]
PrepareSnapshotResponse = MESSAGES["PrepareSnapshotResponse"]
ViewSnapshotRequest = MESSAGES["ViewSnapshotRequest"]
ViewSnapshotResponse = MESSAGES["ViewSnapshotResponse"]
MountsRequest = MESSAGES["MountsRequest"]
MountsResponse = MESSAGES["MountsResponse"]
RemoveSnapshotRequest = MESSAGES["RemoveSnapshotRequest"]
CommitSnapshotRequest = MESSAGES["CommitSnapshotRequest"]
StatSnapshotRequest = MESSAGES["StatSnapshotRequest"]
StatSnapshotResponse = MESSAGES["StatSnapshotResponse"]
UpdateSnapshotRequest = MESSAGES["UpdateSnapshotRequest"]
UpdateSnapshotResponse = MESSAGES["UpdateSnapshotResponse"]
ListSnapshotsRequest = MESSAGES["ListSnapshotsRequest"]
ListSnapshotsResponse = MESSAGES["ListSnapshotsResponse"]
UsageRequest = MESSAGES["UsageRequest"]
UsageResponse = MESSAGES["UsageResponse"]
CleanupRequest = MESSAGES["CleanupRequest"]


def message(name: str) -> Any:
    """The class for a request/response name as RPCS spells it (full names for Empty)."""
    return Empty if name == _EMPTY else MESSAGES[name]


def method_path(name: str) -> str:
    return f"/{PACKAGE}.{SERVICE}/{name}"
