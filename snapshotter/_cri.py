"""A blocking client for containerd's CRI image service (`runtime.v1.ImageService`), the
service kubelet pulls through: a pull this way passes the layer labels a remote snapshotter
needs (`containerd.io/snapshot/cri.layer-digest` and friends, with CRI's
`disable_snapshot_annotations = false`), which `ctr image pull` never does.

The message classes are built at import time from field tables written here (the fields of
CRI's api.proto this client uses, numbers as upstream; see _descriptors.py for why not
generated code). Unknown fields in answers are kept and ignored, so a newer containerd's
extra fields do no harm.

Errors: every gRPC failure becomes `CRIError` (its `code` is the gRPC status name, e.g.
"UNAVAILABLE", "NOT_FOUND", "DEADLINE_EXCEEDED"); nothing from grpc leaks out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from snapshotter._descriptors import Field, add_message

PACKAGE = "runtime.v1"
SERVICE = "ImageService"

_P = f".{PACKAGE}."
# message -> [(field, number, type, repeated)] (see _descriptors.py)
_MESSAGES: dict[str, list[Field]] = {
    "Int64Value": [("value", 1, "int64", False)],
    "ImageSpec": [("image", 1, "string", False), ("annotations", 2, "map", False)],
    "AuthConfig": [("username", 1, "string", False), ("password", 2, "string", False),
                   ("auth", 3, "string", False), ("server_address", 4, "string", False),
                   ("identity_token", 5, "string", False), ("registry_token", 6, "string", False)],
    "PullImageRequest": [("image", 1, _P + "ImageSpec", False), ("auth", 2, _P + "AuthConfig", False)],
    "PullImageResponse": [("image_ref", 1, "string", False)],
    "RemoveImageRequest": [("image", 1, _P + "ImageSpec", False)],
    "RemoveImageResponse": [],
    "ImageStatusRequest": [("image", 1, _P + "ImageSpec", False), ("verbose", 2, "bool", False)],
    "Image": [("id", 1, "string", False), ("repo_tags", 2, "string", True),
              ("repo_digests", 3, "string", True), ("size", 4, "uint64", False),
              ("uid", 5, _P + "Int64Value", False), ("username", 6, "string", False),
              ("spec", 7, _P + "ImageSpec", False), ("pinned", 8, "bool", False)],
    "ImageStatusResponse": [("image", 1, _P + "Image", False), ("info", 2, "map", False)],
    "ImageFilter": [("image", 1, _P + "ImageSpec", False)],
    "ListImagesRequest": [("filter", 1, _P + "ImageFilter", False)],
    "ListImagesResponse": [("images", 1, _P + "Image", True)],
}
_METHODS = {"PullImage": ("PullImageRequest", "PullImageResponse"),
            "RemoveImage": ("RemoveImageRequest", "RemoveImageResponse"),
            "ImageStatus": ("ImageStatusRequest", "ImageStatusResponse"),
            "ListImages": ("ListImagesRequest", "ListImagesResponse")}


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name="p2pfs/cri_image_service.proto",
                                             package=PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES.items():
        add_message(fdp, name, fields)
    svc = fdp.service.add(name=SERVICE)
    for name, (req, resp) in _METHODS.items():
        svc.method.add(name=name, input_type=_P + req, output_type=_P + resp)
    return fdp


def _build() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in _MESSAGES}


MESSAGES = _build()


class CRIError(Exception):
    """A CRI call failed; `code` is the gRPC status name ("UNAVAILABLE", "NOT_FOUND", ...)."""

    def __init__(self, method: str, code: str, details: str):
        super().__init__(f"CRI {method}: {code}: {details}")
        self.method, self.code, self.details = method, code, details


@dataclass(frozen=True)
class Auth:
    """Registry credentials passed with a pull (CRI's AuthConfig); all optional."""

    username: str = ""
    password: str = ""
    auth: str = ""
    server_address: str = ""
    identity_token: str = ""
    registry_token: str = ""


@dataclass(frozen=True)
class ImageInfo:
    """What ImageStatus tells about one image."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


class ImageService:
    """`ImageService("/run/containerd/containerd.sock")`: PullImage, RemoveImage, ImageStatus
    and ListImages over containerd's unix socket. Blocking; each call has a timeout."""

    def __init__(self, socket: str, *, timeout: float = 600.0):
        self.socket = str(socket)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{self.socket}", options=[("grpc.enable_http_proxy", 0)])

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ImageService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        req_name, resp_name = _METHODS[method]
        stub = self._channel.unary_unary(f"/{PACKAGE}.{SERVICE}/{method}",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=MESSAGES[resp_name].FromString)
        try:
            return stub(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CRIError(method, code.name if code is not None else "UNKNOWN", details or "") from None

    def pull(self, image: str, *, auth: Auth | None = None,
             annotations: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
        """Pull IMAGE as kubelet would; returns the image ref CRI answers (the config digest)."""
        request = MESSAGES["PullImageRequest"](image=_spec(image, annotations))
        if auth is not None:
            request.auth.CopyFrom(MESSAGES["AuthConfig"](**vars(auth)))
        return self._call("PullImage", request, timeout).image_ref

    def remove(self, image: str, *, timeout: float | None = None) -> None:
        """Remove IMAGE (a tag, repo@digest or the image id): CRI drops every record of that
        image (tag, repo@digest, config digest). Removing an absent image is not an error."""
        self._call("RemoveImage", MESSAGES["RemoveImageRequest"](image=_spec(image)), timeout)

    def status(self, image: str, *, timeout: float | None = None) -> ImageInfo | None:
        """The image's id, tags, digests and size; None when CRI does not know it."""
        resp = self._call("ImageStatus", MESSAGES["ImageStatusRequest"](image=_spec(image)), timeout)
        return _info(resp.image) if resp.HasField("image") and resp.image.id else None

    def list(self, *, timeout: float | None = None) -> list[ImageInfo]:
        resp = self._call("ListImages", MESSAGES["ListImagesRequest"](), timeout)
        return [_info(img) for img in resp.images]


def _spec(image: str, annotations: Mapping[str, str] | None = None) -> Any:
    return MESSAGES["ImageSpec"](image=image, annotations=dict(annotations or {}))


def _info(img: Any) -> ImageInfo:
    return ImageInfo(id=img.id, repo_tags=tuple(img.repo_tags), repo_digests=tuple(img.repo_digests),
                     size=img.size)
