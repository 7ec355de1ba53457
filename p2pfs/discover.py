"""Finding the models under a prefix and loading their manifests."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import trio

from ._perms import private_dir, write_private
from .errors import ManifestError, ManifestNotFound, ObjectNotFound, OriginUnavailable
from .manifest import MANIFEST_KEY, MAX_MANIFEST_BYTES, Manifest, parse
from .origin import Location, Origin

log = logging.getLogger("p2pfs.discover")


async def load_manifest(origin: Origin, model_prefix: str, *, url: str,
                        size: int | None = None) -> Manifest:
    """Fetch and parse one model's manifest. Its size (from a listing, else a HEAD) is
    checked against MAX_MANIFEST_BYTES before anything is downloaded, and the download
    is a ranged read of exactly that size, so a huge object costs one small request."""
    key = model_prefix + MANIFEST_KEY
    source = f"{origin.name}/{key}"
    try:
        if size is None:
            size = (await origin.head(key)).size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{source}: {size} bytes is over the {MAX_MANIFEST_BYTES}-byte "
                                "manifest limit; not downloaded")
        data = bytes(await origin.get_range(key, 0, size)) if size else b""
    except ObjectNotFound:
        raise ManifestNotFound(
            f"{url}: no manifest at {key}; run `p2pfs index {url}` or `p2pfs publish`") from None
    return parse(data, source=source)


async def discover(origin: Origin, loc: Location, *, allow_empty: bool = False
                   ) -> tuple[list[tuple[str, Manifest, str]], list[str]]:
    """Models at or under `loc`: ([(mount dir, manifest, blob prefix)], [problems]).

    A prefix that is itself a model mounts as the root, and a bad manifest there is an
    error. Under a prefix of many models, a bad one is skipped and reported, so one broken
    upload does not take every other model away; if none is usable that is an error."""
    try:
        m = await load_manifest(origin, loc.prefix, url=str(loc))
        return [("", m, m.blob_prefix(loc.prefix))], []
    except ManifestNotFound:
        pass
    objs = await origin.list(loc.prefix)
    suffix = "/" + MANIFEST_KEY
    sizes = {o.key: o.size for o in objs if o.key.endswith(suffix)}
    keys = sorted(sizes)
    if not keys:
        if allow_empty:
            return [], []
        raise ManifestNotFound(
            f"{loc}: no p2pfs manifest at or under this prefix; run `p2pfs index URL` for "
            "objects already there, or `p2pfs publish DIR URL`")
    found: list[tuple[str, Manifest, str]] = []
    problems: list[str] = []

    async def one(key: str) -> None:
        model_prefix = key[: -len(MANIFEST_KEY)]
        try:
            m = await load_manifest(origin, model_prefix, url=f"{loc}", size=sizes[key])
        except (ManifestError, ObjectNotFound) as exc:  # gone since the listing: skip too
            problems.append(str(exc))
            log.error("skipping model %s: %s", model_prefix, exc)
            return
        except OriginUnavailable:
            raise  # the store, not the model: discover_cached may fall back
        except Exception as exc:  # noqa: BLE001 - one model must not take the others down
            problems.append(f"{model_prefix}: unexpected {type(exc).__name__}: {exc}")
            log.error("skipping model %s: unexpected %s: %s (please report)", model_prefix,
                      type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return
        found.append((model_prefix[len(loc.prefix):].rstrip("/"), m, m.blob_prefix(model_prefix)))

    limiter = trio.CapacityLimiter(16)

    async def bounded(key: str) -> None:
        async with limiter:
            await one(key)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(bounded, key)
    if not found:
        raise ManifestError(f"{loc}: no usable manifest: " + "; ".join(problems))
    found.sort(key=lambda t: t[0])
    return found, problems


async def find_models(origin: Origin, loc: Location, known: dict[str, str],
                      paths: tuple[str, ...] | None) -> tuple[list[tuple[str, Manifest, str]], list[str]]:
    """Models at `paths` under `loc` (each a directory that may now hold a manifest), or
    all models under `loc` when `paths` is None, leaving out those already in `known`
    (mount dir -> digest) with the same digest. One HEAD and one GET per named path, so a
    snapshotter asking for one new layer does not pay for listing the whole prefix."""
    if paths is None:
        models, problems = await discover(origin, loc, allow_empty=True)
    else:
        models, problems = [], []
        limiter = trio.CapacityLimiter(16)

        async def one(path: str) -> None:
            prefix = loc.prefix + path + "/"
            async with limiter:
                try:
                    m = await load_manifest(origin, prefix, url=f"{loc}/{path}")
                except (ManifestNotFound, ObjectNotFound):
                    problems.append(f"{path}: no manifest at {prefix}{MANIFEST_KEY}")
                    return
                except ManifestError as exc:
                    problems.append(str(exc))
                    return
            models.append((path, m, m.blob_prefix(prefix)))

        async with trio.open_nursery() as nursery:
            for path in dict.fromkeys(paths):
                if path not in known:
                    nursery.start_soon(one, path)
        models.sort(key=lambda t: t[0])
    return [m for m in models if known.get(m[0]) != m[1].digest], problems


class ManifestCache:
    """The manifests a mount last used, kept in the cache dir so that a daemon restarted
    while the object store is unreachable still mounts and serves what is cached.

    Layout: `<cache>/manifests/<url-hash>.json` = {"url", "models": [[dir, prefix, digest]]}
    and `<cache>/manifests/sha256-<hex>.json` = the manifest bytes (verified by digest)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory) / "manifests"

    def _index(self, loc: Location) -> Path:
        return self.dir / (hashlib.sha256(str(loc).encode()).hexdigest()[:32] + ".json")

    def save(self, loc: Location, models: list[tuple[str, Manifest, str]]) -> None:
        private_dir(self.dir)  # 0700, files 0600: manifests name what is mounted
        for _, m, _ in models:
            p = self.dir / (m.digest.replace(":", "-") + ".json")
            if not p.exists():
                _atomic_write(p, m.encode())
        doc = {"url": str(loc), "models": [[d, prefix, m.digest] for d, m, prefix in models]}
        _atomic_write(self._index(loc), json.dumps(doc).encode())

    def load(self, loc: Location) -> list[tuple[str, Manifest, str]]:
        try:
            doc = json.loads(self._index(loc).read_bytes())
        except (OSError, ValueError):
            return []
        out = []
        for d, prefix, digest in doc.get("models", []):
            data = (self.dir / (digest.replace(":", "-") + ".json")).read_bytes()
            out.append((d, parse(data, expected_digest=digest, source=f"cached manifest {digest}"), prefix))
        return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, data)
    os.replace(tmp, path)


async def discover_cached(origin: Origin, loc: Location, cache: ManifestCache, *,
                          allow_empty: bool = False) -> tuple[list[tuple[str, Manifest, str]], list[str]]:
    """`discover`, falling back to the manifests last used for `loc` when the store is
    unreachable (never when it answers: a store that says 'not found' is believed)."""
    try:
        models, problems = await discover(origin, loc, allow_empty=allow_empty)
    except OriginUnavailable as exc:
        models = await trio.to_thread.run_sync(cache.load, loc)
        if not models:
            raise
        log.warning("object store unreachable (%s); mounting the %d cached manifest(s) of %s",
                    exc, len(models), loc)
        return models, [f"object store unreachable at mount time, using cached manifests: {exc}"]
    await trio.to_thread.run_sync(cache.save, loc, models)
    return models, problems
