"""Message classes for KEDA's external scaler protocol, built at import time.

Why not generated `_pb2.py` files: generated code pins the protobuf runtime version it
was generated for (protobuf 5+ refuses older gencode or warns on newer). Building the
descriptor from the .proto text with the installed runtime works with any protobuf >= 4.21.
The parser understands exactly the subset KEDA's file uses: one package, proto3
messages with scalar, message, repeated and map<string,string> fields, one service.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

#: Same text as externalscaler.proto next to this file (tests/test_scaler_keda.py checks).
PROTO_SOURCE = '// KEDA external scaler protocol, written from KEDA\'s documentation\n// (keda.sh/docs/latest/concepts/external-scalers/). scaler/keda/_proto.py carries this\n// same text and builds the message classes from it at import time; a test keeps the two equal.\nsyntax = "proto3";\n\npackage externalscaler;\noption go_package = ".;externalscaler";\n\nservice ExternalScaler {\n    rpc IsActive(ScaledObjectRef) returns (IsActiveResponse) {}\n    rpc StreamIsActive(ScaledObjectRef) returns (stream IsActiveResponse) {}\n    rpc GetMetricSpec(ScaledObjectRef) returns (GetMetricSpecResponse) {}\n    rpc GetMetrics(GetMetricsRequest) returns (GetMetricsResponse) {}\n}\n\nmessage ScaledObjectRef {\n    string name = 1;\n    string namespace = 2;\n    map<string, string> scalerMetadata = 3;\n}\n\nmessage IsActiveResponse {\n    bool result = 1;\n}\n\nmessage GetMetricSpecResponse {\n    repeated MetricSpec metricSpecs = 1;\n}\n\nmessage MetricSpec {\n    string metricName = 1;\n    int64 targetSize = 2;\n    double targetSizeFloat = 3;\n}\n\nmessage GetMetricsRequest {\n    ScaledObjectRef scaledObjectRef = 1;\n    string metricName = 2;\n}\n\nmessage GetMetricsResponse {\n    repeated MetricValue metricValues = 1;\n}\n\nmessage MetricValue {\n    string metricName = 1;\n    int64 metricValue = 2;\n    double metricValueFloat = 3;\n}\n'

PACKAGE = "externalscaler"
SERVICE = "ExternalScaler"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "int64": _F.TYPE_INT64,
            "double": _F.TYPE_DOUBLE, "int32": _F.TYPE_INT32, "float": _F.TYPE_FLOAT}
_MESSAGE = re.compile(r"message\s+(\w+)\s*\{([^}]*)\}")
_FIELD = re.compile(r"(repeated\s+)?(map<\s*(\w+)\s*,\s*(\w+)\s*>|\w+)\s+(\w+)\s*=\s*(\d+)\s*;")
_RPC = re.compile(r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(stream\s+)?(\w+)\s*\)")


def _json_name(name: str) -> str:
    return name[0].lower() + name[1:] if name else name


def file_descriptor(source: str = PROTO_SOURCE) -> descriptor_pb2.FileDescriptorProto:
    text = re.sub(r"//[^\n]*", "", source)
    fdp = descriptor_pb2.FileDescriptorProto(name="externalscaler.proto", package=PACKAGE,
                                             syntax="proto3")
    for mname, body in _MESSAGE.findall(text):
        msg = fdp.message_type.add(name=mname)
        for rep, typ, kt, vt, fname, num in _FIELD.findall(body):
            field = msg.field.add(name=fname, number=int(num), json_name=_json_name(fname))
            if kt:
                entry = msg.nested_type.add(name=fname[0].upper() + fname[1:] + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_SCALARS[kt], label=_F.LABEL_OPTIONAL,
                                json_name="key")
                entry.field.add(name="value", number=2, type=_SCALARS[vt], label=_F.LABEL_OPTIONAL,
                                json_name="value")
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{mname}.{entry.name}"
                continue
            field.label = _F.LABEL_REPEATED if rep else _F.LABEL_OPTIONAL
            if typ in _SCALARS:
                field.type = _SCALARS[typ]
            else:
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{typ}"
    svc = fdp.service.add(name=SERVICE)
    for name, req, stream, resp in _RPC.findall(text):
        svc.method.add(name=name, input_type=f".{PACKAGE}.{req}", output_type=f".{PACKAGE}.{resp}",
                       server_streaming=bool(stream))
    return fdp


def _build() -> tuple[dict[str, Any], dict[str, tuple[str, str, bool]]]:
    pool = descriptor_pool.DescriptorPool()
    fdp = file_descriptor()
    pool.Add(fdp)
    classes = {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{m.name}"))
               for m in fdp.message_type}
    methods = {m.name: (m.input_type.rsplit(".", 1)[1], m.output_type.rsplit(".", 1)[1],
                        m.server_streaming) for m in fdp.service[0].method}
    return classes, methods


MESSAGES, METHODS = _build()
ScaledObjectRef = MESSAGES["ScaledObjectRef"]
IsActiveResponse = MESSAGES["IsActiveResponse"]
GetMetricSpecResponse = MESSAGES["GetMetricSpecResponse"]
MetricSpec = MESSAGES["MetricSpec"]
GetMetricsRequest = MESSAGES["GetMetricsRequest"]
GetMetricsResponse = MESSAGES["GetMetricsResponse"]
MetricValue = MESSAGES["MetricValue"]


def method_path(name: str) -> str:
    return f"/{PACKAGE}.{SERVICE}/{name}"
