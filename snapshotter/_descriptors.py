"""Protobuf message descriptors from small field tables, for the gRPC services the
snapshotter speaks (containerd's snapshots.v1, CRI's runtime.v1 image service).

Why not generated `_pb2.py`: generated code pins the protobuf runtime it was generated for
(see scaler/keda/_proto.py). A table row is `(field, number, type, repeated)`; type is a
scalar name from SCALARS, "map" (map<string, string>), or a fully qualified message or enum
name (".pkg.Name"; enums are named in `enums`).
"""

from __future__ import annotations

from typing import Iterable

from google.protobuf import descriptor_pb2

Field = tuple[str, int, str, bool]

_F = descriptor_pb2.FieldDescriptorProto
SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "int64": _F.TYPE_INT64,
           "uint64": _F.TYPE_UINT64, "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32}


def camel(name: str) -> str:
    """protoc's json_name: snake_case -> lowerCamelCase."""
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def add_message(fdp: descriptor_pb2.FileDescriptorProto, name: str, fields: Iterable[Field], *,
                enums: Iterable[str] = ()) -> None:
    """Add message NAME with FIELDS to FDP (its package is fdp.package)."""
    enums = set(enums)
    msg = fdp.message_type.add(name=name)
    for fname, number, typ, repeated in fields:
        field = msg.field.add(name=fname, number=number, json_name=camel(fname),
                              label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
        if typ == "map":
            entry = msg.nested_type.add(name=camel(fname)[0].upper() + camel(fname)[1:] + "Entry")
            entry.options.map_entry = True
            for n, kv in enumerate(("key", "value"), 1):
                entry.field.add(name=kv, number=n, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL,
                                json_name=kv)
            field.label = _F.LABEL_REPEATED
            field.type = _F.TYPE_MESSAGE
            field.type_name = f".{fdp.package}.{name}.{entry.name}"
        elif typ in SCALARS:
            field.type = SCALARS[typ]
        else:
            field.type = _F.TYPE_ENUM if typ in enums else _F.TYPE_MESSAGE
            field.type_name = typ
