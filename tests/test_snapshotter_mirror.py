"""The image metadata mirror: what `ImageRecorder` stores for a pulled image (from a
content store dir shaped like containerd's, and a real docker-registry for the tag), and
what `MirrorServer` serves from it over real HTTP: by tag and by digest, HEAD, 404s with
OCI error bodies, a tampered stored blob never served, names that try to leave the tree
refused. The object store is a local directory (the same Origin interface as S3; the
end-to-end test in test_images_e2e.py runs it over SeaweedFS)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
from pathlib import Path

import pytest

from image_helpers import registry  # noqa: F401 - fixture
from p2pfs.errors import OriginUnavailable
from p2pfs.origin import parse_url
from snapshotter._mirror import MirrorServer, RouteError, route
from snapshotter._ocistore import (IMAGE_REF_LABEL, MANIFEST_DIGEST_LABEL, ImageRecorder,
                                   MirrorReader, OriginLoop, TagRecord, blob_key, tag_key)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_docs(tag: str = "x") -> dict:
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag,
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}).encode()
    layer = f"not really a tar {tag}".encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": digest(layer), "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest(manifest), "size": len(manifest),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    return {"config": config, "layer": layer, "manifest": manifest, "index": index}


@pytest.fixture
def store(tmp_path):
    """An object store (a local dir) with its loop, a reader and a mirror over them."""
    (tmp_path / "bucket").mkdir()
    yield from _store(parse_url(f"file://{tmp_path}/bucket//layers"))


@pytest.fixture
def s3_store(seaweed):
    import uuid

    from p2pfs.config import S3Config

    yield from _store(parse_url(f"s3://models/mirror-{uuid.uuid4().hex[:6]}"),
                      S3Config(endpoint_url=seaweed.endpoint))


def _store(root, s3=None):
    loop = OriginLoop(root, s3).start()
    reader = MirrorReader(loop)
    server = MirrorServer(reader).start()
    try:
        yield loop, reader, server
    finally:
        server.close()
        loop.close()


def put(loop: OriginLoop, key: str, data: bytes) -> None:
    async def go(origin):
        await origin.put(key, data)
    loop.call(go)


def request(server: MirrorServer, method: str, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def stored_image(loop: OriginLoop, host: str = "127.0.0.1:5000", repo: str = "team/app",
                 tag: str = "v1") -> dict:
    docs = image_docs(tag)
    for name in ("config", "manifest", "index"):
        put(loop, blob_key(loop.root, digest(docs[name])), docs[name])
    put(loop, tag_key(loop.root, host, repo, tag),
        TagRecord(digest(docs["index"]), OCI_INDEX, len(docs["index"])).encode())
    return docs


def test_route_parses_what_containerd_sends_and_refuses_the_rest():
    assert route("GET", "/v2/").kind == "ping"
    r = route("HEAD", "/v2/team/app/manifests/v1?ns=127.0.0.1:5000")
    assert (r.kind, r.registry, r.repository, r.reference) == ("manifest", "127.0.0.1:5000", "team/app", "v1")
    r = route("GET", "/v2/busybox/manifests/latest?ns=docker.io")  # normalized as references are
    assert (r.registry, r.repository) == ("registry-1.docker.io", "library/busybox")
    d = "sha256:" + "ab" * 32
    r = route("GET", f"/v2/a/blobs/{d}")
    assert (r.kind, r.repository, r.reference, r.registry) == ("blob", "a", d, None)
    for method, target, status in [
            ("PUT", "/v2/a/manifests/v1?ns=h.io", 405),
            ("GET", "/v2/a/manifests/v1", 404),           # a tag needs ns
            ("GET", "/v2/a/blobs/v1", 400),
            ("GET", "/v2/a/manifests/sha256:12?ns=h.io", 400),
            ("GET", "/v2/../../etc/manifests/v1?ns=h.io", 400),
            ("GET", "/v2/a/%2e%2e/manifests/v1?ns=h.io", 400),
            ("GET", "/v2/a/manifests/v1?ns=h.io/../x", 400),
            ("GET", "/v2/a/manifests/v1?ns=nohost", 400),
            ("GET", "/v2/a/manifests/..?ns=h.io", 400),
            ("GET", "/etc/passwd", 404)]:
        with pytest.raises(RouteError) as err:
            route(method, target)
        assert err.value.status == status, (method, target, err.value.message)


def test_serves_a_stored_manifest_by_tag_and_by_digest(store):
    loop, reader, server = store
    docs = stored_image(loop)
    status, headers, body = request(server, "GET", "/v2/")
    assert status == 200 and headers["docker-distribution-api-version"] == "registry/2.0"

    status, headers, body = request(server, "GET", "/v2/team/app/manifests/v1?ns=127.0.0.1:5000")
    assert status == 200 and body == docs["index"]
    assert headers["content-type"] == OCI_INDEX
    assert headers["docker-content-digest"] == digest(docs["index"])
    assert int(headers["content-length"]) == len(docs["index"])

    status, headers, body = request(server, "GET", f"/v2/team/app/manifests/{digest(docs['manifest'])}")
    assert status == 200 and body == docs["manifest"] and headers["content-type"] == OCI_MANIFEST
    status, headers, body = request(server, "GET", f"/v2/team/app/blobs/{digest(docs['config'])}?ns=127.0.0.1:5000")
    assert status == 200 and body == docs["config"]
    assert headers["docker-content-digest"] == digest(docs["config"])


def test_serves_from_s3_through_the_loop_thread(s3_store):
    """S3 calls run on the loop's own thread under trio-asyncio; many handler threads at once."""
    import concurrent.futures

    loop, reader, server = s3_store
    docs = stored_image(loop)
    paths = ["/v2/team/app/manifests/v1?ns=127.0.0.1:5000",
             f"/v2/team/app/blobs/{digest(docs['config'])}",
             f"/v2/team/app/manifests/{digest(docs['manifest'])}"] * 8
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: request(server, "GET", p), paths))
    assert [a[0] for a in answers] == [200] * len(paths)
    assert answers[0][2] == docs["index"] and answers[1][2] == docs["config"]
    assert reader.counts["hits"] > 0  # verified blobs come from memory after the first read
    status, _, _ = request(server, "GET", "/v2/team/app/manifests/v9?ns=127.0.0.1:5000")
    assert status == 404


def test_head_sends_headers_and_no_body(store):
    loop, reader, server = store
    docs = stored_image(loop)
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    try:  # one keep-alive connection: a HEAD without a body must not desync the next reply
        conn.request("HEAD", "/v2/team/app/manifests/v1?ns=127.0.0.1:5000")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert int(resp.getheader("Content-Length")) == len(docs["index"])
        assert resp.getheader("Docker-Content-Digest") == digest(docs["index"])
        conn.request("GET", f"/v2/team/app/blobs/{digest(docs['config'])}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == docs["config"]
    finally:
        conn.close()


def test_what_is_not_stored_is_404_with_an_oci_error(store):
    loop, reader, server = store
    stored_image(loop)
    for path, code in [("/v2/team/app/manifests/v2?ns=127.0.0.1:5000", "MANIFEST_UNKNOWN"),
                       ("/v2/team/app/manifests/v1?ns=127.0.0.1:5001", "MANIFEST_UNKNOWN"),
                       ("/v2/team/other/manifests/v1?ns=127.0.0.1:5000", "MANIFEST_UNKNOWN"),
                       (f"/v2/team/app/manifests/sha256:{'0' * 64}", "MANIFEST_UNKNOWN"),
                       (f"/v2/team/app/blobs/sha256:{'0' * 64}", "BLOB_UNKNOWN")]:
        status, headers, body = request(server, "GET", path)
        assert status == 404, path
        assert json.loads(body)["errors"][0]["code"] == code
        assert headers["content-type"] == "application/json"
    status, _, body = request(server, "HEAD", "/v2/team/app/manifests/v2?ns=127.0.0.1:5000")
    assert status == 404 and body == b""
    assert server.counts["not_found"] == 6
    from prometheus_client import CollectorRegistry, generate_latest

    from snapshotter._mirror import MirrorMetrics

    reg = CollectorRegistry()
    reg.register(MirrorMetrics(server, None))
    text = generate_latest(reg).decode()
    assert 'p2pfs_snapshotter_mirror_requests_total{outcome="not_found"} 6.0' in text


def test_a_tampered_stored_blob_is_not_served(store, caplog):
    loop, reader, server = store
    docs = stored_image(loop)
    bad = docs["manifest"].replace(b'"schemaVersion": 2', b'"schemaVersion": 3')
    put(loop, blob_key(loop.root, digest(docs["manifest"])), bad)
    with caplog.at_level(logging.ERROR, logger="snapshotter.mirror"):
        status, _, body = request(server, "GET", f"/v2/team/app/manifests/{digest(docs['manifest'])}")
    assert status == 500 and bad not in body
    assert "hash to" in caplog.text and digest(docs["manifest"]) in caplog.text
    assert reader.counts["corrupt"] == 1
    # A tag record pointing at a tampered index: not served either.
    put(loop, blob_key(loop.root, digest(docs["index"])), docs["index"] + b" ")
    status, _, body = request(server, "GET", "/v2/team/app/manifests/v1?ns=127.0.0.1:5000")
    assert status == 500
    put(loop, tag_key(loop.root, "127.0.0.1:5000", "team/app", "v1"), b"{not json")
    status, _, _ = request(server, "GET", "/v2/team/app/manifests/v1?ns=127.0.0.1:5000")
    assert status == 500


def test_names_that_leave_the_tree_are_refused(store, tmp_path):
    loop, reader, server = store
    stored_image(loop)
    secret = tmp_path / "bucket" / "secret"
    secret.write_bytes(b"top secret")
    for path in ["/v2/../../secret/manifests/v1?ns=127.0.0.1:5000",
                 "/v2/team/app/manifests/..%2F..%2Fsecret?ns=127.0.0.1:5000",
                 "/v2/team/app/manifests/v1?ns=..%2F..%2F..",
                 "/v2/team/%2e%2e/%2e%2e/manifests/v1?ns=127.0.0.1:5000",
                 "/v2/team/app/blobs/sha256:..%2F..%2Fsecret"]:
        status, _, body = request(server, "GET", path)
        assert status in (400, 404), path
        assert b"top secret" not in body


def test_recorder_stores_manifest_config_index_and_tag_once(store, registry, tmp_path):  # noqa: F811
    loop, reader, server = store
    docs = image_docs("rec")
    name = "rec/app"
    registry.put_blob(name, docs["layer"])
    registry.put_blob(name, docs["config"])
    registry.put_manifest(name, digest(docs["manifest"]), docs["manifest"], OCI_MANIFEST)
    registry.put_manifest(name, "v1", docs["index"], OCI_INDEX)
    content = tmp_path / "content"  # containerd's content store: the manifest is there, the config not
    content.mkdir()
    (content / digest(docs["manifest"]).removeprefix("sha256:")).write_bytes(docs["manifest"])
    rec = ImageRecorder(loop, content_dir=content, plain_http_registries=[registry.host])
    labels = {IMAGE_REF_LABEL: f"{registry.host}/{name}:v1",
              MANIFEST_DIGEST_LABEL: digest(docs["manifest"])}
    try:
        assert rec.seen(labels)
        assert not rec.seen(labels)  # queued or done: once per image
        assert rec.wait_idle(10)
        assert rec.status()["stored"] == 1, rec.status()
        assert not rec.seen(labels)  # recorded: not queued again
        status, headers, body = request(server, "GET", f"/v2/{name}/manifests/v1?ns={registry.host}")
        assert status == 200 and body == docs["index"] and headers["content-type"] == OCI_INDEX
        for key in ("manifest", "config"):
            status, _, body = request(server, "GET", f"/v2/{name}/blobs/{digest(docs[key])}")
            assert status == 200 and body == docs[key]

        # A fresh recorder (another node, or a restart) finds it stored: one read, no writes.
        rec2 = ImageRecorder(loop, content_dir=None, plain_http_registries=[registry.host])
        assert rec2.record(labels[IMAGE_REF_LABEL], labels[MANIFEST_DIGEST_LABEL]) == "existed"
        rec2.close()

        # The tag moved upstream since this node pulled: the blobs are stored, the tag is not.
        docs2 = image_docs("moved")
        registry.put_blob(name, docs2["layer"])
        registry.put_blob(name, docs2["config"])
        registry.put_manifest(name, "v2", docs2["manifest"], OCI_MANIFEST)
        assert rec.record(f"{registry.host}/{name}:v2", digest(docs["manifest"])) == "stored"
        status, _, _ = request(server, "GET", f"/v2/{name}/manifests/v2?ns={registry.host}")
        assert status == 404
    finally:
        rec.close()


def test_recorder_failure_is_counted_and_retried_later(store, tmp_path):
    """The registry is down: the blobs in the content store are stored (a pull by digest
    works), the tag is not, and the job is retried on a pull after `retry_after`."""
    loop, reader, server = store
    docs = image_docs("down")
    content = tmp_path / "content"
    content.mkdir()
    for key in ("manifest", "config"):
        (content / digest(docs[key]).removeprefix("sha256:")).write_bytes(docs[key])
    now = [0.0]
    rec = ImageRecorder(loop, content_dir=content, plain_http_registries=["127.0.0.1:9"],
                        retry_after=60, clock=lambda: now[0])
    labels = {IMAGE_REF_LABEL: "127.0.0.1:9/gone:v1", MANIFEST_DIGEST_LABEL: digest(docs["manifest"])}
    try:
        assert rec.seen(labels) and rec.wait_idle(30)
        st = rec.status()
        assert st["failed"] == 1 and "gone" in st["last_error"], st
        status, _, body = request(server, "GET", f"/v2/gone/manifests/{digest(docs['manifest'])}")
        assert status == 200 and body == docs["manifest"]
        status, _, _ = request(server, "GET", "/v2/gone/manifests/v1?ns=127.0.0.1:9")
        assert status == 404
        assert not rec.seen(labels)  # failing lately: not tried on every Prepare
        now[0] = 61.0
        assert rec.seen(labels) and rec.wait_idle(30)
        assert rec.status()["failed"] == 2
        assert not rec.seen({IMAGE_REF_LABEL: "x"})  # no manifest digest: nothing to record
    finally:
        rec.close()


def test_loop_state_says_opening_open_or_why_it_failed(tmp_path, caplog):
    from p2pfs.config import S3Config

    (tmp_path / "bucket").mkdir()
    loop = OriginLoop(parse_url(f"file://{tmp_path}/bucket//layers"))
    assert loop.state() == "opening"  # not started: nothing is open yet
    loop.start()
    try:
        assert loop.state() == "open"
    finally:
        loop.close()
    bad = OriginLoop(parse_url("s3://models/x"), S3Config(endpoint_url="http://[not-a-host"))
    with caplog.at_level("WARNING", logger="snapshotter"):
        with pytest.raises(OriginUnavailable):
            bad.start()
    try:
        assert bad.state().startswith("failed: "), bad.state()
        assert "did not open" in caplog.text
    finally:
        bad.close()
