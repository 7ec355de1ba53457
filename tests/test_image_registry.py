"""The OCI distribution client (p2pfs/image/_registry.py, _oci.py).

Pure parsing first (references, platforms, challenges, manifests, docker config), then a
real docker-registry (Debian's, started by `image_helpers.registry`) serving images built
and pushed here: by tag and by digest, OCI and Docker manifests, an index over two
platforms, gzip/zstd/uncompressed layers, blob streaming, not-found and down registries.

Bearer-token auth runs against an in-process fake at the HTTP interface (`FakeRegistry`):
docker-registry's token auth needs a token server with a signing key and certificate, which
adds nothing to what is tested here (the client's side of the challenge, token and retry).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HAVE_FUSE
from image_helpers import (MT_LAYER_GZIP, MT_LAYER_TAR, MT_LAYER_ZSTD, MT_OCI_CONFIG, MT_OCI_INDEX,
                           MT_OCI_MANIFEST, RegistryServer, build_image, busybox_image,
                           compress_layer, oci_manifest, push, registry)  # noqa: F401
from p2pfs.errors import (RegistryAuthError, RegistryError, RegistryNotFound,
                          RegistryUnavailable)
from p2pfs.image._oci import (DOCKER_HUB, Platform, Reference, manifest_kind, parse_challenge,
                              parse_config, parse_manifest, select_platform)
from p2pfs.image._registry import Credentials, Registry, docker_config_auths, parse_reference
from p2pfs.manifest import parse

HEX = "a" * 64


# --- pure -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("busybox", Reference(DOCKER_HUB, "library/busybox", "latest")),
    ("docker.io/busybox:1.36", Reference(DOCKER_HUB, "library/busybox", "1.36")),
    ("index.docker.io/user/app", Reference(DOCKER_HUB, "user/app", "latest")),
    ("user/app:v2", Reference(DOCKER_HUB, "user/app", "v2")),
    ("127.0.0.1:5000/busybox:v1", Reference("127.0.0.1:5000", "busybox", "v1")),
    ("localhost/a/b", Reference("localhost", "a/b", "latest")),
    ("localhost:5000/a/b-c_d.e@sha256:" + HEX, Reference("localhost:5000", "a/b-c_d.e", None, "sha256:" + HEX)),
    ("ghcr.io/o/r:t@sha256:" + HEX, Reference("ghcr.io", "o/r", "t", "sha256:" + HEX)),
    ("[::1]:5000/x", Reference("[::1]:5000", "x", "latest")),
])
def test_parse_reference(text, want):
    got = parse_reference(text)
    assert got == want
    assert got.reference == (want.digest or want.tag)
    assert parse_reference(str(got)) == got


@pytest.mark.parametrize("text", ["", " busybox", "Upper/app", "x@sha256:abc", "x@md5:" + HEX,
                                  "x:bad!tag", "127.0.0.1:5000/", "a//b", "a/-b", "host:port:x/y"])
def test_parse_reference_refuses(text):
    with pytest.raises(RegistryError):
        parse_reference(text)


def test_platforms():
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.host("x86_64") == Platform("linux", "amd64")
    assert Platform.host("aarch64") == Platform("linux", "arm64", "v8")
    assert Platform.host("armv7l") == Platform("linux", "arm", "v7")
    assert Platform("linux", "arm64", "v8").matches(Platform("linux", "arm64"))  # v8 is arm64's default
    assert not Platform("linux", "arm", "v7").matches(Platform("linux", "arm", "v6"))
    assert Platform("linux", "arm").matches(Platform("linux", "arm", "v6"))
    assert not Platform("linux", "amd64").matches(Platform("windows", "amd64"))
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(RegistryError):
            Platform.parse(bad)


def test_parse_challenge():
    c = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                        'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert dict(c.params) == {"realm": "https://auth.example/token", "service": "registry.example",
                              "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x \\"q\\""').params == {"realm": 'x "q"'}
    assert parse_challenge(None) is None


def _manifest_doc(layer_type=MT_LAYER_GZIP):
    return {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": "sha256:" + HEX, "size": 2},
            "layers": [{"mediaType": layer_type, "digest": "sha256:" + "b" * 64, "size": 10}]}


def test_manifest_parsing_refuses_what_cannot_be_converted():
    ref = parse_reference("r.example/x")
    assert manifest_kind(json.dumps(_manifest_doc()).encode(), None)[0] == "manifest"
    with pytest.raises(RegistryError, match="schema 1"):
        manifest_kind(b'{"schemaVersion": 1, "fsLayers": []}', None)
    with pytest.raises(RegistryError, match="not JSON"):
        manifest_kind(b"<html>", "text/html")
    foreign = _manifest_doc("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
    with pytest.raises(RegistryError, match="foreign"):
        parse_manifest(ref, b"", foreign, None)
    with pytest.raises(RegistryError, match="media type"):
        parse_manifest(ref, b"", _manifest_doc("application/vnd.oci.image.layer.v1.tar+encrypted"), None)
    bad = _manifest_doc()
    bad["layers"][0]["digest"] = "sha512:" + "c" * 128
    with pytest.raises(RegistryError, match="sha256"):
        parse_manifest(ref, b"", bad, None)
    index = {"manifests": [{"mediaType": MT_OCI_MANIFEST, "digest": "sha256:" + HEX, "size": 1,
                            "platform": {"os": "linux", "architecture": "arm64"}}]}
    assert select_platform(index, Platform("linux", "arm64", "v8")).digest == "sha256:" + HEX
    with pytest.raises(RegistryError, match="linux/arm64"):  # says what it has
        select_platform(index, Platform("linux", "amd64"))


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["mediaType", "schemaVersion", "config", "layers",
                                                        "manifests", "digest", "size", "platform", "os",
                                                        "architecture", "variant", "rootfs", "diff_ids"]),
                                       inner, max_size=6), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80), header=st.text(max_size=80), doc=_JSON)
def test_hostile_inputs_raise_only_registry_errors(text, header, doc):
    """Whatever a user types or a registry sends: a value or a RegistryError, nothing else."""
    try:
        ref = parse_reference(text)
        assert parse_reference(str(ref)) == ref
    except RegistryError:
        pass
    parse_challenge(header)
    data = json.dumps(doc).encode()
    ref = parse_reference("r.example/x")
    for fn in (lambda: parse_manifest(ref, data, *manifest_kind(data, None)[1:], None),
               lambda: select_platform(manifest_kind(data, None)[1], Platform("linux", "amd64")),
               lambda: parse_config(data)):
        try:
            fn()
        except RegistryError:
            pass


def test_docker_config_auths(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpw").decode()},
        "reg.example:5000": {"username": "u", "password": "p:w"},
        "https://other.example/v2/": {"auth": base64.b64encode(b"o:pw:with:colons").decode()},
        "helper.example": {}}, "credsStore": "desktop"}))
    auths = docker_config_auths(cfg)
    assert auths == {DOCKER_HUB: Credentials("hubuser", "hubpw"), "reg.example:5000": Credentials("u", "p:w"),
                     "other.example": Credentials("o", "pw:with:colons")}
    assert "hubpw" not in repr(auths)
    assert docker_config_auths(tmp_path / "missing.json") == {}
    cfg.write_text("{not json")
    with pytest.raises(RegistryError, match="config.json"):
        docker_config_auths(cfg)


# --- a real docker-registry --------------------------------------------------------------

@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    """busybox:v1 (OCI), busybox:docker (Docker v2), busybox:arm64, and busybox:multi
    (an OCI index of amd64 and arm64)."""
    tmp = tmp_path_factory.mktemp("busybox")
    img = busybox_image(tmp)
    digests = {"v1": push(img.oci_dir, "v1", registry, "busybox"),
               "docker": push(img.oci_dir, "v1", registry, "busybox", manifest_format="v2s2",
                              dest_tag="docker")}
    arm_layer = tmp / "arm-layer"
    (arm_layer / "etc").mkdir(parents=True)
    (arm_layer / "etc" / "arch").write_text("arm64\n")
    build_image(img.oci_dir, "arm64", [img.layer_dirs[0], arm_layer], arch="arm64")
    digests["arm64"] = push(img.oci_dir, "arm64", registry, "busybox")
    entries = []
    for tag, arch in (("v1", "amd64"), ("arm64", "arm64")):
        body = registry.get(f"/v2/busybox/manifests/{digests[tag]}", MT_OCI_MANIFEST)[2]
        entries.append({"mediaType": MT_OCI_MANIFEST, "digest": digests[tag], "size": len(body),
                        "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}).encode()
    digests["multi"] = registry.put_manifest("busybox", "multi", index, MT_OCI_INDEX)
    return img, digests


def _sha(f) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while block := f.read(1 << 16):
        h.update(block)
        n += len(block)
    return "sha256:" + h.hexdigest(), n


def test_resolve_by_tag_and_digest(registry, pushed):
    img, digests = pushed
    reg = Registry(plain_http=True, timeout=10)
    by_tag = reg.resolve(f"{registry.host}/busybox:v1")
    layout = oci_manifest(img.oci_dir, "v1")
    assert by_tag.digest == digests["v1"]
    assert [d.digest for d in by_tag.layers] == [x["digest"] for x in layout["layers"]]
    assert [d.media_type for d in by_tag.layers] == [MT_LAYER_GZIP] * 3
    assert by_tag.platform == Platform("linux", "amd64")
    assert len(by_tag.diff_ids) == 3 and by_tag.index_digest is None
    by_digest = reg.resolve(f"{registry.host}/busybox@{digests['v1']}")
    assert by_digest.digest == by_tag.digest and by_digest.layers == by_tag.layers


def test_docker_v2_manifest(registry, pushed):
    _, digests = pushed
    m = Registry(plain_http=True).resolve(f"{registry.host}/busybox:docker")
    assert m.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert m.digest == digests["docker"] != digests["v1"]
    assert {d.media_type for d in m.layers} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}


def test_index_picks_the_platform(registry, pushed):
    _, digests = pushed
    reg = Registry(plain_http=True)
    ref = f"{registry.host}/busybox:multi"
    amd = reg.resolve(ref, Platform("linux", "amd64"))
    arm = reg.resolve(ref, Platform.parse("linux/arm64/v8"))
    assert (amd.digest, arm.digest) == (digests["v1"], digests["arm64"])
    assert amd.index_digest == arm.index_digest == digests["multi"]
    assert arm.platform == Platform("linux", "arm64") and len(arm.layers) == 2
    host = Platform.host()
    if host.architecture in ("amd64", "arm64"):
        assert reg.resolve(ref).digest == digests["v1" if host.architecture == "amd64" else "arm64"]
    with pytest.raises(RegistryError, match="linux/amd64, linux/arm64"):
        reg.resolve(ref, Platform("linux", "s390x"))
    with pytest.raises(RegistryError, match="linux/arm64 image, not linux/amd64"):
        reg.resolve(f"{registry.host}/busybox:arm64", Platform("linux", "amd64"))


def test_blobs_stream_with_their_digest(registry, pushed):
    reg = Registry(plain_http=True)
    m = reg.resolve(f"{registry.host}/busybox:v1")
    for layer in m.layers:
        with reg.open_blob(m.ref, layer.digest) as f:
            assert _sha(f) == (layer.digest, layer.size)


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_uncompressed_and_zstd_layers(registry, pushed):
    """Pushed over HTTP (umoci writes only gzip): each media type resolves and streams."""
    raw = _tar_bytes({"etc/z": b"zstd layer\n"})
    layers = []
    for mt in (MT_LAYER_TAR, MT_LAYER_ZSTD):
        blob = compress_layer(raw, mt)
        layers.append({"mediaType": mt, "digest": registry.put_blob("mixed", blob), "size": len(blob)})
    diff = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff, diff]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                           "config": {"mediaType": MT_OCI_CONFIG, "digest": registry.put_blob("mixed", config),
                                      "size": len(config)}, "layers": layers}).encode()
    registry.put_manifest("mixed", "v1", manifest, MT_OCI_MANIFEST)
    reg = Registry(plain_http=True)
    m = reg.resolve(f"{registry.host}/mixed:v1")
    assert [d.media_type for d in m.layers] == [MT_LAYER_TAR, MT_LAYER_ZSTD]
    for layer in m.layers:
        with reg.open_blob(m.ref, layer.digest) as f:
            assert _sha(f) == (layer.digest, layer.size)


def test_not_found(registry, pushed):
    reg = Registry(plain_http=True)
    with pytest.raises(RegistryNotFound, match="MANIFEST_UNKNOWN"):
        reg.resolve(f"{registry.host}/busybox:nope")
    with pytest.raises(RegistryNotFound):
        reg.resolve(f"{registry.host}/no/such/repo:v1")
    with pytest.raises(RegistryNotFound, match="blob"):
        reg.open_blob(parse_reference(f"{registry.host}/busybox:v1"), "sha256:" + HEX)


def test_https_to_a_plain_http_registry_says_plain_http(registry, pushed):
    with pytest.raises(RegistryError, match="--plain-http"):
        Registry(timeout=5).resolve(f"{registry.host}/busybox:v1")


def test_registry_down_or_hung_fails_in_bounded_time(tmp_path):
    server = RegistryServer(tmp_path / "reg").start()
    ref = f"{server.host}/busybox:v1"
    pid = server.proc.pid
    try:
        os.kill(pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
        t0 = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="timed out"):
            Registry(plain_http=True, timeout=1, retries=1, retry_delay=0.1).resolve(ref)
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="unreachable.*running"):
        Registry(plain_http=True, timeout=1, retries=2, retry_delay=0.1).resolve(ref)
    assert time.monotonic() - t0 < 3


# --- bearer tokens, basic auth, redirects: an in-process fake ----------------------------

class FakeRegistry:
    """A registry at the HTTP interface: /v2/team/app/... needs `Authorization: Bearer <t>`
    from /token (which checks basic credentials user:secret and the scope), or Basic itself
    (`basic=True`); blobs redirect to a second server on 127.0.0.2 (`storage`), which
    records the Authorization headers it got."""

    def __init__(self, *, basic: bool = False, anonymous: bool = False, break_blobs: int = 0,
                 tamper: bool = False) -> None:
        self.basic, self.anonymous = basic, anonymous
        self.break_blobs, self.tamper = break_blobs, tamper  # storage: cut the first N bodies short; other bytes
        self.tokens: set[str] = set()
        self.token_requests: list[dict] = []
        self.storage_auth: list[str | None] = []
        noise = random.Random(0).randbytes(3 << 20)  # incompressible: a cut stream has sent some
        tar = _tar_bytes({"etc/fake.txt": b"from the fake registry\n", "data/noise": noise})
        self.tar, self.blob = tar, compress_layer(tar, MT_LAYER_GZIP)
        self.blob_digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        self.config = json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {
            "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar).hexdigest()]}}).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "size": len(self.config),
                       "digest": "sha256:" + hashlib.sha256(self.config).hexdigest()},
            "layers": [{"mediaType": MT_LAYER_GZIP, "digest": self.blob_digest, "size": len(self.blob)}],
        }).encode()
        self.bad_digest_manifest = b'{"tampered": true}'
        self.main = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(self._serve_registry))
        self.storage = ThreadingHTTPServer(("127.0.0.2", 0), self._handler(self._serve_storage))
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.main, self.storage)]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.main.server_address[1]}"

    def __enter__(self) -> "FakeRegistry":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in (self.main, self.storage):
            s.shutdown()
            s.server_close()

    @staticmethod
    def _handler(serve):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                serve(self)

            def log_message(self, *args):
                pass
        return Handler

    @staticmethod
    def _send(h, code, body=b"", headers=()):
        h.send_response(code)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _serve_registry(self, h):
        url = urlsplit(h.path)
        if url.path == "/token":
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            self.token_requests.append({"auth": h.headers.get("Authorization"), **q})
            ok_creds = h.headers.get("Authorization") == Credentials("user", "secret").basic()
            if (not ok_creds and not self.anonymous) or q.get("scope") != "repository:team/app:pull" \
                    or q.get("service") != "fake":
                return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
            token = f"tok-{len(self.token_requests)}"
            self.tokens.add(token)
            return self._send(h, 200, json.dumps({"token": token, "expires_in": 60}).encode())
        auth = h.headers.get("Authorization") or ""
        if self.basic:
            allowed = auth == Credentials("user", "secret").basic()
            challenge = 'Basic realm="fake"'
        else:
            allowed = auth.startswith("Bearer ") and auth[7:] in self.tokens
            challenge = (f'Bearer realm="http://{self.host}/token",service="fake",'
                         'scope="repository:team/app:pull"')
        if not allowed:
            return self._send(h, 401, b"{}", [("WWW-Authenticate", challenge)])
        docs = {"/v2/team/app/manifests/v1": self.manifest,
                "/v2/team/app/manifests/sha256:" + HEX: self.bad_digest_manifest,
                "/v2/team/app/blobs/" + json.loads(self.manifest)["config"]["digest"]: self.config}
        if url.path in docs:
            return self._send(h, 200, docs[url.path], [("Content-Type", MT_OCI_MANIFEST)])
        if url.path == f"/v2/team/app/blobs/{self.blob_digest}":
            port = self.storage.server_address[1]
            return self._send(h, 307, headers=[("Location", f"http://127.0.0.2:{port}/b?sig=1")])
        if url.path == "/v2/team/app/blobs/sha256:" + "e" * 64:  # no length: "until close"
            h.send_response(200)
            h.end_headers()
            for _ in range(64):
                h.wfile.write(b"\0" * (64 << 10))
            h.close_connection = True
            return
        if url.path == "/v2/team/app/blobs/sha256:" + "f" * 64:
            return self._send(h, 302, headers=[("Location", "file:///etc/passwd")])
        self._send(h, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}')

    def _serve_storage(self, h):
        self.storage_auth.append(h.headers.get("Authorization"))
        if len(self.storage_auth) <= self.break_blobs:
            h.send_response(200)
            h.send_header("Content-Length", str(len(self.blob)))
            h.end_headers()
            h.wfile.write(self.blob[: len(self.blob) // 2])
            h.close_connection = True
            return
        if self.tamper:  # the same tar and length, other bytes (a gzip header's mtime)
            return self._send(h, 200, gzip.compress(self.tar, mtime=12345))
        self._send(h, 200, self.blob)

    def expire_tokens(self) -> None:
        self.tokens.clear()


def test_bearer_token_flow():
    with FakeRegistry() as fake:
        reg = Registry(plain_http=True, credentials={fake.host: Credentials("user", "secret")}, timeout=5)
        m = reg.resolve(f"{fake.host}/team/app:v1")
        assert [d.digest for d in m.layers] == [fake.blob_digest]
        assert len(fake.token_requests) == 1  # manifest and config share the token
        req = fake.token_requests[0]
        assert req["service"] == "fake" and req["scope"] == "repository:team/app:pull"
        with reg.open_blob(m.ref, fake.blob_digest) as f:
            assert f.read() == fake.blob
        assert fake.storage_auth == [None]  # the redirect to another host dropped the token
        fake.expire_tokens()  # a token that expired mid-conversion is fetched again, once
        reg.resolve(f"{fake.host}/team/app:v1")
        assert len(fake.token_requests) == 2


def test_bearer_token_refused():
    with FakeRegistry() as fake:
        ref = f"{fake.host}/team/app:v1"
        with pytest.raises(RegistryAuthError, match="refused an anonymous request.*--username"):
            Registry(plain_http=True).resolve(ref)
        bad = Registry(plain_http=True, credentials={fake.host: Credentials("user", "wrong")})
        with pytest.raises(RegistryAuthError, match="credentials of 'user'"):
            bad.resolve(ref)


def test_a_cut_blob_stream_is_an_error_not_eof():
    """http.client reads a body cut short of its Content-Length as EOF; the stream must not."""
    with FakeRegistry(anonymous=True, break_blobs=1) as fake:
        reg = Registry(plain_http=True)
        ref = parse_reference(f"{fake.host}/team/app:v1")
        with pytest.raises(RegistryUnavailable, match=rf"broke after \d+ bytes \({len(fake.blob)} bytes announced"):
            with reg.open_blob(ref, fake.blob_digest) as f:
                f.read()
        with reg.open_blob(ref, fake.blob_digest) as f:
            assert f.read() == fake.blob


def test_a_blob_longer_than_its_descriptor_is_refused():
    with FakeRegistry(anonymous=True) as fake:
        reg = Registry(plain_http=True)
        ref = parse_reference(f"{fake.host}/team/app:v1")
        with pytest.raises(RegistryError, match="its descriptor says 1000"):
            reg.open_blob(ref, fake.blob_digest, size=1000)
        with reg.open_blob(ref, "sha256:" + "e" * 64, size=100_000) as f:
            with pytest.raises(RegistryError, match="longer than the 100000 bytes"):
                while f.read(1 << 16):
                    pass


def test_anonymous_token():
    with FakeRegistry(anonymous=True) as fake:
        m = Registry(plain_http=True).resolve(f"{fake.host}/team/app:v1")
        assert m.layers[0].digest == fake.blob_digest
        assert fake.token_requests[0]["auth"] is None


def test_basic_auth_challenge():
    with FakeRegistry(basic=True) as fake:
        ref = f"{fake.host}/team/app:v1"
        with pytest.raises(RegistryAuthError, match="user name and password"):
            Registry(plain_http=True).resolve(ref)
        with pytest.raises(RegistryAuthError, match="not authorized.*as user"):
            Registry(plain_http=True, credentials={fake.host: Credentials("user", "nope")}).resolve(ref)
        m = Registry(plain_http=True, credentials={fake.host: Credentials("user", "secret")}).resolve(ref)
        assert m.layers[0].digest == fake.blob_digest and not fake.token_requests


def test_digest_reference_is_verified_and_redirects_stay_http():
    with FakeRegistry(anonymous=True) as fake:
        reg = Registry(plain_http=True)
        with pytest.raises(RegistryError, match="has digest"):
            reg.resolve(f"{fake.host}/team/app@sha256:{HEX}")
        with pytest.raises(RegistryError, match="only http and https"):
            reg.open_blob(parse_reference(f"{fake.host}/team/app:v1"), "sha256:" + "f" * 64)
        with pytest.raises(RegistryNotFound, match="NAME_UNKNOWN"):
            reg.resolve(f"{fake.host}/team/app:v2")



# --- convert_image against the fake: retries, failures, progress ----------------------

def _convert(fake: FakeRegistry, tmp_path: Path, progress=None):
    import trio

    from p2pfs.image import convert_image
    from p2pfs.origin import LocalDirOrigin, parse_url

    (tmp_path / "store").mkdir(exist_ok=True)
    root = parse_url(f"file://{tmp_path}/store//layers")
    return trio.run(lambda: convert_image(LocalDirOrigin(str(tmp_path / "store")), root,
                                          f"{fake.host}/team/app:v1", registry=Registry(plain_http=True),
                                          progress=progress)), root


def test_convert_image_converts_a_broken_stream_again(tmp_path):
    with FakeRegistry(anonymous=True, break_blobs=1) as fake:
        seen: list[int] = []
        result, _ = _convert(fake, tmp_path, progress=seen.append)
        assert len(fake.storage_auth) == 2  # the first body broke off; the layer was read again
        assert [x.converted for x in result.layers] == [True]
        assert sum(seen) == len(fake.blob)  # what the broken attempt reported was taken back
        assert any(n < 0 for n in seen)
        assert (tmp_path / "store" / result.record).exists()


def test_convert_image_gives_up_and_publishes_nothing(tmp_path):
    from p2pfs.errors import LayerError

    with FakeRegistry(anonymous=True, break_blobs=5) as fake:
        with pytest.raises(RegistryUnavailable, match="broke after"):  # raised as itself, no group
            _convert(fake, tmp_path)
        assert len(fake.storage_auth) == 2  # attempts=2
    with FakeRegistry(anonymous=True, tamper=True) as fake:
        with pytest.raises(LayerError, match="not published"):
            _convert(fake, tmp_path)
    layers = tmp_path / "store" / "layers"
    assert not list(layers.glob("*/.p2pfs/manifest.json")) and not (layers / ".p2pfs" / "images").exists()


# --- `p2pfs image convert`, end to end ----------------------------------------------------

def _convert_cmd(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
                 endpoint: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("P2PFS_REGISTRY_", "DOCKER_CONFIG"))}
    full.update(env or {})
    if endpoint:
        full["AWS_ENDPOINT_URL"] = endpoint
    return subprocess.run([sys.executable, "-m", "p2pfs", "image", "convert", *args], env=full,
                          input=stdin, capture_output=True, text=True, timeout=180)


def test_cli_converts_an_image_once(registry, pushed, seaweed, mount_factory):
    """Every layer converted into SeaweedFS, an image record listing them in order; the
    second run skips every layer. With FUSE, the mounted layers show the image's tree."""
    img, digests = pushed
    url = f"s3://models/layers-{uuid.uuid4().hex[:8]}"
    ref = f"{registry.host}/busybox:v1"
    layout = [d["digest"] for d in oci_manifest(img.oci_dir, "v1")["layers"]]
    r = _convert_cmd(ref, url, "--plain-http", "--json", endpoint=seaweed.endpoint)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert (first["manifest_digest"], first["platform"]) == (digests["v1"], "linux/amd64")
    assert [x["digest"] for x in first["layers"]] == layout
    assert [x["status"] for x in first["layers"]] == ["converted"] * 3 and first["skipped"] == 0
    assert first["stored_bytes"] > 0
    assert first["blob_bytes"] == sum(x["size"] for x in first["layers"])

    r = _convert_cmd(ref, url, "--plain-http", "--json", endpoint=seaweed.endpoint)
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert [x["status"] for x in second["layers"]] == ["skipped"] * 3 and second["converted"] == 0
    assert second["stored_bytes"] == 0
    assert [x["result"]["manifest_digest"] for x in second["layers"]] == \
        [x["result"]["manifest_digest"] for x in first["layers"]]

    record = json.loads(_s3_get(seaweed, "models", first["record"]))
    assert record["manifest_digest"] == digests["v1"] and record["version"] == 1
    assert [x["digest"] for x in record["layers"]] == layout
    assert all(x["diff_id"].startswith("sha256:") for x in record["layers"])
    prefix = url.removeprefix("s3://models/")

    def layer_manifest(p: str, digest: str):
        return parse(_s3_get(seaweed, "models", f"{p}/{digest[7:]}/.p2pfs/manifest.json"))
    assert {layer_manifest(prefix, d).chunk_hash for d in layout} == {"blake3"}
    # --chunk-hash sha256 converts into manifests p2pfs before v3 mounts too.
    old = f"layers-{uuid.uuid4().hex[:8]}"
    r = _convert_cmd(ref, f"s3://models/{old}", "--plain-http", "--chunk-hash", "sha256",
                     endpoint=seaweed.endpoint)
    assert r.returncode == 0, r.stderr
    assert {(layer_manifest(old, d).chunk_hash, layer_manifest(old, d).version)
            for d in layout} == {("sha256", 2)}

    if not HAVE_FUSE:
        pytest.skip("needs root and /dev/fuse to mount the converted layers")
    m = mount_factory(url, seaweed.endpoint)
    base, files, changes = (m.path / d.split(":")[1] for d in layout)
    assert (base / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(base / "bin" / "sh") == "busybox"
    st = (changes / "etc" / "hello.txt").lstat()  # the whiteout
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(changes / "etc" / "app", "trusted.overlay.opaque") == b"y"
    assert (files / "data" / "blob.bin").stat().st_ino == (files / "data" / "blob-link").stat().st_ino
    assert (files / "bin" / "suid").stat().st_mode & 0o7777 == 0o4755
    assert stat.S_ISFIFO((files / "data" / "fifo").lstat().st_mode)
    if img.expected_xattrs:
        assert os.getxattr(files / "data" / "xattr.txt", "user.p2pfs.test") == b"layer2"


def _s3_get(seaweed, bucket: str, key: str) -> bytes:
    import trio
    import trio_asyncio

    from p2pfs.config import S3Config
    from p2pfs.origin._s3 import S3Origin

    async def main() -> bytes:
        async with trio_asyncio.open_loop():
            origin = await S3Origin.create(bucket, S3Config(endpoint_url=seaweed.endpoint))
            try:
                return await origin.get(key)
            finally:
                await origin.aclose()
    return trio.run(main)


def test_cli_errors_are_one_line(registry, pushed, tmp_path):
    url = f"file://{tmp_path}//layers"
    r = _convert_cmd(f"{registry.host}/busybox:nope", url, "--plain-http")
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = _convert_cmd(f"{registry.host}/busybox:v1", url)
    assert r.returncode == 1 and "--plain-http" in r.stderr and "Traceback" not in r.stderr
    r = _convert_cmd(f"{registry.host}/busybox:v1", url, "--plain-http", "--platform", "linux")
    assert r.returncode == 1 and "os/arch" in r.stderr
    r = _convert_cmd(f"{registry.host}/busybox:v1", url, "--password-stdin")
    assert r.returncode == 2 and "--username" in r.stderr
    assert not (tmp_path / "layers").exists()


@pytest.mark.parametrize("how", ["flags", "env", "docker-config"])
def test_cli_credentials(tmp_path, how):
    """The three sources of credentials reach the token service (a fake: see the module
    docstring) and the layer is converted into a file:// store."""
    with FakeRegistry() as fake:
        args, env, stdin = [], {}, None
        if how == "flags":
            args, stdin = ["--username", "user", "--password-stdin"], "secret\n"
        elif how == "env":
            env = {"P2PFS_REGISTRY_USERNAME": "user", "P2PFS_REGISTRY_PASSWORD": "secret"}
        else:
            (tmp_path / "docker").mkdir()
            (tmp_path / "docker" / "config.json").write_text(json.dumps(
                {"auths": {f"http://{fake.host}": {"auth": base64.b64encode(b"user:secret").decode()}}}))
            env = {"DOCKER_CONFIG": str(tmp_path / "docker")}
        r = _convert_cmd(f"{fake.host}/team/app:v1", f"file://{tmp_path}//layers", "--plain-http",
                         "--json", *args, env=env, stdin=stdin)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [x["digest"] for x in out["layers"]] == [fake.blob_digest]
        assert fake.token_requests[0]["auth"] == Credentials("user", "secret").basic()
        hexd = fake.blob_digest.split(":")[1]
        assert (tmp_path / "layers" / hexd / ".p2pfs" / "manifest.json").exists()
        r = _convert_cmd(f"{fake.host}/team/app:v1", f"file://{tmp_path}//layers", "--plain-http")
        assert r.returncode == 1 and "anonymous" in r.stderr
