"""A blocking OCI distribution v2 client: resolve an image reference to one platform's
manifest, and stream its blobs. Used from worker threads (`trio.to_thread`): one HTTP
connection per request, the token cache under a lock, every socket operation under
`timeout`, never a proxy (http.client reads no environment).

Auth, as registries ask for it: a 401 with `WWW-Authenticate: Bearer realm=..,service=..,
scope=..` fetches a token from the realm (anonymously, or with the registry's basic
credentials) and retries once; `Basic` sends the credentials. Credentials come from the
caller (`credentials`: registry host -> `Credentials`; the CLI fills it from flags, the
environment or docker's config.json `auths`, see `docker_config_auths`). Redirects (blob
storage) are followed over http/https only, and Authorization is dropped when the host
changes.

Errors are `RegistryError`s that say what to do: `RegistryUnavailable` (refused, timed
out, 429/5xx, a broken stream; requests other than a blob's body are retried `retries`
times), `RegistryNotFound`, `RegistryAuthError`.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

from ..errors import RegistryAuthError, RegistryError, RegistryNotFound, RegistryUnavailable
from ._oci import (ACCEPT, DOCKER_HUB, MAX_MANIFEST_BYTES, Challenge, Descriptor, ImageManifest,
                   Platform, Reference, check_digest, manifest_kind, parse_challenge, parse_config,
                   parse_manifest, parse_reference, select_platform, sha256_digest)

__all__ = ["Credentials", "Registry", "docker_config_auths", "parse_reference"]

T = TypeVar("T")

MAX_CONFIG_BYTES = 16 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", DOCKER_HUB)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def docker_config_auths(path: Path) -> dict[str, Credentials]:
    """Registry host -> credentials from a docker `config.json`'s `auths` (what `docker
    login` writes: base64 `user:password` in `auth`, or `username`/`password`). Credential
    helpers (`credsStore`, `credHelpers`) are not run. A missing file is no credentials."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot read docker credentials: {exc}") from None
    out: dict[str, Credentials] = {}
    for key, entry in (doc.get("auths") or {}).items():
        if not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise RegistryError(f"{path}: auths[{key!r}].auth is not base64 user:password") from None
        if user and password is not None:
            out[_host_key(key)] = Credentials(user, password)
    return out


def _host_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `registry-1.docker.io`; `https://h:5000/` -> `h:5000`."""
    if key in _HUB_KEYS:
        return DOCKER_HUB
    host = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    return DOCKER_HUB if host in _HUB_KEYS else host


class _Response:
    """A response whose connection closes with it."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, url: str):
        self.conn, self.resp, self.url = conn, resp, url
        self.status = resp.status

    def header(self, name: str) -> str | None:
        return self.resp.getheader(name)

    def read(self, limit: int) -> bytes:
        expected = self.resp.length  # Content-Length; None when chunked
        try:
            data = self.resp.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryUnavailable(f"{_host(self.url)}: the response broke off: {_why(exc)}") from exc
        finally:
            self.close()
        if len(data) > limit:
            raise RegistryError(f"{self.url}: response larger than {limit} bytes")
        if expected is not None and len(data) < expected:  # http.client reads a cut body as EOF
            raise RegistryUnavailable(f"{_host(self.url)}: the response broke off after "
                                      f"{len(data)} of {expected} bytes")
        return data

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


class _BlobStream(io.RawIOBase):
    """A blob's body; a broken stream is a RegistryUnavailable."""

    def __init__(self, response: _Response, digest: str, size: int | None) -> None:
        self._r, self._digest, self._done, self._size = response, digest, 0, size
        self._expected = response.resp.length  # Content-Length; None when chunked
        if size is not None and self._expected is not None and self._expected != size:
            response.close()
            raise RegistryError(f"blob {digest} from {_host(response.url)}: {self._expected} bytes "
                                f"served, its descriptor says {size}")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            n = self._r.resp.readinto(buf)
        except (OSError, http.client.HTTPException) as exc:
            raise self._broken(_why(exc)) from exc
        if n == 0 and len(buf) and self._expected is not None and self._done < self._expected:
            raise self._broken(f"{self._expected} bytes announced")  # http.client says EOF
        self._done += n
        if self._size is not None and self._done > self._size:  # a chunked body that never ends
            raise RegistryError(f"blob {self._digest} from {_host(self._r.url)} is longer than "
                                f"the {self._size} bytes its descriptor says")
        return n

    def _broken(self, why: str) -> RegistryUnavailable:
        return RegistryUnavailable(f"blob {self._digest} from {_host(self._r.url)}: the stream "
                                   f"broke after {self._done} bytes ({why})")

    def close(self) -> None:
        if not self.closed:
            self._r.close()
        super().close()


class Registry:
    """Resolve images and open blobs on OCI distribution registries (blocking)."""

    def __init__(self, *, plain_http: bool = False, credentials: Mapping[str, Credentials] | None = None,
                 timeout: float = 30.0, retries: int = 2, retry_delay: float = 0.5,
                 user_agent: str = "p2pfs") -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be positive and retries >= 0")
        self.plain_http = plain_http
        self.timeout, self.retries, self.retry_delay = timeout, retries, retry_delay
        self._credentials = {_host_key(k): v for k, v in (credentials or {}).items()}
        self._user_agent = user_agent
        self._ssl = ssl.create_default_context()
        self._auth: dict[tuple[str, str], str] = {}  # (host, scope) -> Authorization value
        self._lock = threading.Lock()

    # --- public ------------------------------------------------------------------------

    def resolve(self, ref: Reference | str, platform: Platform | None = None) -> ImageManifest:
        """The image manifest for `ref`; an index / manifest list picks `platform` (default:
        this machine's). A digest reference is verified against the bytes served."""
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        data, ctype = self._manifest(ref, ref.reference)
        kind, doc = manifest_kind(data, ctype)
        index_digest, picked = None, None
        if kind == "index":
            index_digest = sha256_digest(data)
            entry = select_platform(doc, platform or Platform.host())
            data, ctype = self._manifest(ref, entry.digest)
            kind, doc = manifest_kind(data, ctype)
            if kind != "manifest":
                raise RegistryError(f"{ref}: the index entry for {entry.platform} is another index")
            picked = entry.platform
        manifest = parse_manifest(ref, data, doc, ctype)
        config = self.read_blob(ref, manifest.config, MAX_CONFIG_BYTES)
        config_platform, diff_ids = parse_config(config)
        if diff_ids and len(diff_ids) != len(manifest.layers):
            raise RegistryError(f"{ref}: the config lists {len(diff_ids)} diff ids for "
                                f"{len(manifest.layers)} layers")
        if platform and not picked and config_platform and not platform.matches(config_platform):
            raise RegistryError(f"{ref} is a {config_platform} image, not {platform}")
        return replace(manifest, platform=picked or config_platform, index_digest=index_digest,
                       diff_ids=diff_ids)

    def open_blob(self, ref: Reference | str, digest: str, *, size: int | None = None) -> BinaryIO:
        """Stream a blob (following redirects). Its digest is not verified here (the reader
        hashes it); with `size` (the descriptor's), a longer body is refused as it comes."""
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        check_digest(digest, "blob digest")
        resp = self._retrying(lambda: self._get(ref, f"blobs/{digest}", f"blob {digest}"))
        return io.BufferedReader(_BlobStream(resp, digest, size), buffer_size=1 << 20)  # type: ignore[return-value]

    def manifest(self, ref: Reference | str, reference: str) -> tuple[bytes, str | None]:
        """The manifest or index bytes served for `reference` (a tag or a digest), verified
        as `resolve` verifies them, and the Content-Type they came with."""
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        return self._manifest(ref, reference)

    def read_blob(self, ref: Reference, desc: Descriptor, limit: int) -> bytes:
        """A small blob (a config), verified against its descriptor."""
        if desc.size > limit:
            raise RegistryError(f"{ref}: blob {desc.digest} is {desc.size} bytes (limit {limit})")

        def once() -> bytes:
            return self._get(ref, f"blobs/{desc.digest}", f"blob {desc.digest}").read(limit)
        data = self._retrying(once)
        if sha256_digest(data) != desc.digest:
            raise RegistryError(f"{ref}: blob {desc.digest} does not match its digest "
                                f"(got {sha256_digest(data)})")
        return data

    # --- requests ----------------------------------------------------------------------

    def _manifest(self, ref: Reference, reference: str) -> tuple[bytes, str | None]:
        def once() -> tuple[bytes, str | None, str | None]:
            resp = self._get(ref, f"manifests/{reference}", f"manifest {reference}", accept=ACCEPT)
            ctype, served = resp.header("Content-Type"), resp.header("Docker-Content-Digest")
            return resp.read(MAX_MANIFEST_BYTES), ctype, served
        data, ctype, served = self._retrying(once)
        actual = sha256_digest(data)
        if reference.startswith("sha256:") and actual != reference:
            raise RegistryError(f"{ref}: the manifest served for {reference} has digest {actual}")
        if served and served.startswith("sha256:") and served != actual:
            raise RegistryError(f"{ref}: the manifest's bytes ({actual}) differ from the "
                                f"Docker-Content-Digest the registry sent ({served})")
        return data, ctype

    def _retrying(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except RegistryUnavailable:
                if attempt == self.retries:
                    raise
                time.sleep(self.retry_delay * 2 ** attempt)
        raise AssertionError("unreachable")

    def _get(self, ref: Reference, path: str, what: str, accept: str | None = None) -> _Response:
        """GET /v2/<repo>/<path> with auth; any status but 200 becomes a RegistryError."""
        scheme = "http" if self.plain_http else "https"
        url = f"{scheme}://{ref.registry}/v2/{ref.repository}/{path}"
        scope = f"repository:{ref.repository}:pull"
        key = (ref.registry, scope)
        for attempt in range(2):
            headers = {"Accept": accept} if accept else {}
            with self._lock:
                auth = self._auth.get(key)
            if auth:
                headers["Authorization"] = auth
            resp = self._send(url, headers)
            if resp.status == 200:
                return resp
            if resp.status != 401:
                raise _status_error(resp, ref, what)
            challenge = parse_challenge(resp.header("WWW-Authenticate"))
            resp.close()
            if attempt == 1 or challenge is None:
                who = (f"as {self._credentials[ref.registry].username}"
                       if ref.registry in self._credentials else "anonymously")
                raise RegistryAuthError(f"{ref.registry}: not authorized to pull {ref.repository} "
                                        f"{who}; {_CRED_HINT}")
            value = self._authorize(ref, challenge, scope)
            with self._lock:
                self._auth[key] = value
        raise AssertionError("unreachable")

    def _authorize(self, ref: Reference, challenge: Challenge, scope: str) -> str:
        creds = self._credentials.get(ref.registry)
        if challenge.scheme == "basic":
            if creds is None:
                raise RegistryAuthError(f"{ref.registry} asks for a user name and password; {_CRED_HINT}")
            return creds.basic()
        if challenge.scheme != "bearer" or not challenge.params.get("realm"):
            raise RegistryAuthError(f"{ref.registry}: unsupported auth challenge {challenge.scheme!r}")
        realm = challenge.params["realm"]
        query = {k: v for k, v in (("service", challenge.params.get("service")),
                                   ("scope", challenge.params.get("scope") or scope)) if v}
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        resp = self._retrying(lambda: self._send(url, {"Authorization": creds.basic()} if creds else {}))
        if resp.status in (401, 403):
            resp.close()
            who = f"the credentials of {creds.username!r}" if creds else "an anonymous request"
            raise RegistryAuthError(f"{ref.registry}: the token service {_host(url)} refused {who} "
                                    f"for {query.get('scope')}; {_CRED_HINT}")
        if resp.status != 200:
            raise _status_error(resp, ref, "a token")
        try:
            doc = json.loads(resp.read(1 << 20))
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{ref.registry}: the token service {_host(url)} sent no token")
        return "Bearer " + token

    def _send(self, url: str, headers: Mapping[str, str], redirects: int = 5) -> _Response:
        """One GET, following redirects over http/https; Authorization stays on its host."""
        headers = {"User-Agent": self._user_agent, "Connection": "close", **headers}
        for _ in range(redirects + 1):
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise RegistryError(f"refusing to fetch {url!r}: only http and https URLs")
            if u.scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    u.hostname, u.port, timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=self.timeout)
            try:
                conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""), headers=headers)
                resp = conn.getresponse()
            except ssl.SSLError as exc:  # a certificate or a plain-HTTP server: permanent
                conn.close()
                raise RegistryError(_unreachable(u.netloc, exc, self.plain_http)) from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise RegistryUnavailable(_unreachable(u.netloc, exc, self.plain_http)) from exc
            location = resp.getheader("Location")
            if resp.status not in _REDIRECTS or not location:
                return _Response(conn, resp, url)
            resp.close()
            conn.close()
            target = urljoin(url, location)
            if urlsplit(target).netloc != u.netloc:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise RegistryError(f"{url}: more than {redirects} redirects")


_CRED_HINT = ("give credentials (p2pfs image convert --username/--password-stdin, "
              "P2PFS_REGISTRY_USERNAME/P2PFS_REGISTRY_PASSWORD, or `docker login`)")


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _why(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(exc) or type(exc).__name__


def _unreachable(netloc: str, exc: BaseException, plain_http: bool) -> str:
    msg = f"registry {netloc} is unreachable ({_why(exc)})"
    if isinstance(exc, ssl.SSLError) and not plain_http:
        return msg + "; if it serves plain HTTP (a local registry), use --plain-http"
    if isinstance(exc, (http.client.BadStatusLine, http.client.RemoteDisconnected)) and plain_http:
        return msg + "; if it serves HTTPS, drop --plain-http"
    return msg + "; check the host and port, and that the registry is running"


def _status_error(resp: _Response, ref: Reference, what: str) -> RegistryError:
    status = resp.status
    try:
        body = resp.read(64 << 10)
    except RegistryError:
        body = b""
    detail = ""
    try:
        errors = json.loads(body).get("errors") or []
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        pass
    detail = f" ({detail})" if detail else ""
    if status == 404:
        return RegistryNotFound(f"{ref}: {what} not found{detail}; check the repository name, "
                                "the tag or digest, and the registry")
    if status == 403:
        return RegistryAuthError(f"{ref}: access to {what} denied (403){detail}; {_CRED_HINT}")
    if status == 429 or status >= 500:
        return RegistryUnavailable(f"{ref}: the registry answered {status} for {what}{detail}; "
                                   "try again later")
    return RegistryError(f"{ref}: unexpected HTTP {status} for {what}{detail}")
