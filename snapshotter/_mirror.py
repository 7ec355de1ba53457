"""The image metadata mirror: the read side of the OCI distribution API that containerd
uses to resolve and fetch an image, served from what `_ocistore.ImageRecorder` stored in
the object store. containerd reaches it as the last host of a registry's hosts.toml
(`server = "http://127.0.0.1:PORT"`, the registry itself as the `[host]` tried first), so
a pull resolves upstream while the registry answers and from the object store when it
does not; the layers come from the p2pfs mount either way.

    GET|HEAD /v2/                                   200 {}
    GET|HEAD /v2/<name>/manifests/<tag>?ns=<host>   the stored tag's manifest or index
    GET|HEAD /v2/<name>/manifests/<digest>          a stored manifest or index
    GET|HEAD /v2/<name>/blobs/<digest>              a stored config (or manifest)

`ns` is the registry host containerd adds to a request for a mirror; a tag needs it (tags
are per registry), a digest does not (blobs are content addressed). Everything is
verified against its digest before it is sent; what is not stored is a 404 with an OCI
error body, so containerd moves on. `route` is the pure part: a request line in, a
`Route` or a `RouteError` out.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from p2pfs.errors import IntegrityError, OriginError, RegistryError

from ._ocistore import MirrorReader, digest_hex, media_type_of

log = logging.getLogger("snapshotter.mirror")


@dataclass(frozen=True, slots=True)
class Route:
    kind: str                 # "ping", "manifest" or "blob"
    repository: str = ""
    reference: str = ""       # a tag or a digest ("blob": always a digest)
    registry: str | None = None  # from ?ns= (normalized as image references are)


class RouteError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def route(method: str, target: str) -> Route:
    """What a request asks for; RouteError for anything this mirror does not serve."""
    if method not in ("GET", "HEAD"):
        raise RouteError(405, "UNSUPPORTED", "this mirror is read-only (GET and HEAD)")
    url = urlsplit(target)
    path = url.path
    if path in ("/v2", "/v2/"):
        return Route("ping")
    if not path.startswith("/v2/"):
        raise RouteError(404, "NOT_FOUND", "only the /v2/ API is served")
    name, sep, rest = path[4:].rpartition("/manifests/")
    kind = "manifest"
    if not sep:
        name, sep, rest = path[4:].rpartition("/blobs/")
        kind = "blob"
    if not sep or not name or not rest or "/" in rest:
        raise RouteError(404, "NOT_FOUND", "expected /v2/<name>/manifests/<reference> or "
                                           "/v2/<name>/blobs/<digest>")
    ns = parse_qs(url.query).get("ns", [None])[-1]
    registry, repository = _names(ns, name)
    if digest_hex(rest) is not None:
        return Route(kind, repository, rest, registry)
    if kind == "blob" or rest.startswith("sha256:") or ":" in rest:
        raise RouteError(400, "DIGEST_INVALID", f"{rest!r} is not a sha256 digest")
    if registry is None:
        raise RouteError(404, "NAME_UNKNOWN", "a tag needs ?ns=<registry host> (containerd adds "
                                              "it for a mirror): tags are kept per registry")
    from p2pfs.image import parse_reference

    try:
        ref = parse_reference(f"{registry}/{repository}:{rest}")
    except RegistryError as exc:
        raise RouteError(400, "TAG_INVALID", str(exc)) from None
    return Route(kind, ref.repository, ref.tag or "", ref.registry)


def _names(ns: str | None, name: str) -> tuple[str | None, str]:
    """(registry, repository), validated and normalized as image references are (so
    ns=docker.io and name busybox mean registry-1.docker.io/library/busybox)."""
    from p2pfs.image import parse_reference

    try:
        if not _NAME.fullmatch(name):
            raise RegistryError(f"bad repository name {name!r}")
        ref = parse_reference(f"{ns if ns is not None else 'mirror.invalid'}/{name}")
    except RegistryError as exc:
        raise RouteError(400, "NAME_INVALID", str(exc)) from None
    if ref.repository not in (name, "library/" + name):  # ns was taken for a path component
        raise RouteError(400, "NAME_INVALID", f"ns={ns!r} is not a registry host")
    return (ref.registry if ns is not None else None), ref.repository


_NAME = re.compile(r"[a-z0-9._/-]{1,255}")


class MirrorServer:
    """The mirror over HTTP/1.1 (keep-alive), one thread per connection."""

    def __init__(self, reader: MirrorReader, host: str = "127.0.0.1", port: int = 0) -> None:
        self.reader = reader
        self.counts = {"served": 0, "not_found": 0, "errors": 0}
        self._lock = threading.Lock()
        server = self

        class Handler(_Handler):
            mirror = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="oci-mirror", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "MirrorServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def answer(self, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request; the body is sent only for GET."""
        try:
            r = route(method, target)
            if r.kind == "ping":
                return 200, {"Content-Type": "application/json"}, b"{}"
            media_type = None
            digest = r.reference
            if digest_hex(digest) is None:  # a tag
                record = self.reader.tag(r.registry or "", r.repository, r.reference)
                if record is None:
                    raise RouteError(404, "MANIFEST_UNKNOWN",
                                     f"{r.registry}/{r.repository}:{r.reference} is not mirrored")
                digest, media_type = record.digest, record.media_type
            data = self.reader.blob(digest)
            if data is None:
                code = "MANIFEST_UNKNOWN" if r.kind == "manifest" else "BLOB_UNKNOWN"
                raise RouteError(404, code, f"{digest} is not mirrored")
        except RouteError as exc:
            self.count("not_found" if exc.status == 404 else "errors")
            return _error(exc.status, exc.code, exc.message)
        except IntegrityError as exc:
            self.count("errors")
            log.error("mirror: not serving %s: %s", target, exc)
            return _error(500, "UNKNOWN", f"the stored copy is corrupt: {exc}")
        except OriginError as exc:
            self.count("errors")
            log.warning("mirror: %s: the object store failed: %s", target, exc)
            return _error(503, "UNAVAILABLE", f"the object store failed: {exc}")
        self.count("served")
        if r.kind == "manifest":
            ctype = media_type or media_type_of(data)
        else:
            ctype = "application/octet-stream"
        return 200, {"Content-Type": ctype, "Docker-Content-Digest": digest}, data


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return status, {"Content-Type": "application/json"}, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "p2pfs-mirror"
    mirror: Any = None
    timeout = 60  # an idle keep-alive connection is closed after this

    def do_GET(self) -> None:
        self._reply("GET")

    def do_HEAD(self) -> None:
        self._reply("HEAD")

    def _other(self) -> None:
        self._reply(self.command)

    do_POST = do_PUT = do_PATCH = do_DELETE = _other

    def _reply(self, method: str) -> None:
        status, headers, body = self.mirror.answer(method, self.path)
        # Each request logged: the mirror answers only when the registry did not, and a
        # pull that silently went elsewhere is the complaint to avoid.
        log.info("mirror: %s %s -> %d (%d bytes)", method, self.path, status, len(body))
        self.send_response(status)
        headers = {**headers, "Content-Length": str(len(body)),
                   "Docker-Distribution-API-Version": "registry/2.0"}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("mirror: %s %s", self.address_string(), fmt % args)


class MirrorMetrics:
    """Prometheus collector: the mirror's answers and the recorder's jobs by outcome."""

    def __init__(self, server: "MirrorServer | None", recorder: Any) -> None:
        self.server, self.recorder = server, recorder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        if self.server is not None:
            c = CounterMetricFamily("p2pfs_snapshotter_mirror_requests",
                                    "Image metadata mirror requests by outcome", labels=["outcome"])
            with self.server._lock:
                counts = dict(self.server.counts)
            for outcome, n in counts.items():
                c.add_metric([outcome], n)
            yield c
        if self.recorder is not None:
            c = CounterMetricFamily("p2pfs_snapshotter_image_records",
                                    "Images whose metadata was stored for the mirror, by outcome",
                                    labels=["outcome"])
            st = self.recorder.status()
            for outcome in ("stored", "existed", "failed", "dropped"):
                c.add_metric([outcome], st[outcome])
            yield c
