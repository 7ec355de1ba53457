"""Layered settings, shared by p2pfs and p2pfs-scaler (one implementation of both).

A command's settings are frozen, keyword-only dataclasses, one per TOML table. `build`
fills one from layers, lowest first: the dataclass defaults, a TOML file's table, the
environment where a command reads one, command-line flags. A `None` in a layer means "not
given" and leaves the value below it. Values are coerced by the field's annotation (sizes
such as "512MiB" for ints, str for Path, a list or "a,b,c" for tuple[str, ...]), and each
dataclass checks its ranges in `__post_init__` with `check` against the bounds declared
by `setting(...)`, so a value out of range fails when the settings are built, naming the
key and the range, never deep inside the code that uses it.

Each package passes its own ConfigError class (`error=`), so errors stay in its tree.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True)
class Bounds:
    """Allowed range of a numeric setting (either end may be open or absent)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    size: bool = False  # say 64MiB rather than 67108864


    def admits(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and not math.isnan(v))

    def __str__(self) -> str:
        n = self._num
        lo = f">= {n(self.ge)}" if self.ge is not None else f"> {n(self.gt)}" if self.gt is not None else ""
        if self.le is None:
            return lo
        if self.ge is not None:
            return f"between {n(self.ge)} and {n(self.le)}"
        return f"{lo} and <= {n(self.le)}" if lo else f"<= {n(self.le)}"

    def _num(self, v: float | None) -> str:
        if self.size and isinstance(v, int) and v >= KiB:
            for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
                if v % size == 0:
                    return f"{v // size}{unit}"
        return f"{v:g}" if isinstance(v, float) else str(v)


def setting(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, size: bool = False) -> Any:
    """A dataclass field with a default and the range `check` enforces (`size`: the
    bounds are byte counts, shown as 64MiB)."""
    return dataclasses.field(default=default,
                             metadata={"bounds": Bounds(ge=ge, gt=gt, le=le, size=size)})


def section_of(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return getattr(cls, "SECTION", cls.__name__)


def check(obj: Any, error: type[Exception]) -> None:
    """Raise `error` naming the first field of `obj` whose type or range is wrong."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind, optional = _kind(hints[f.name])
        if value is None and optional:
            continue
        if not _is(value, kind):
            raise error(f"[{section_of(obj)}] {f.name} = {value!r}: expected {_name(kind)}")
        bounds = f.metadata.get("bounds")
        if bounds is not None and not bounds.admits(value):
            raise error(f"[{section_of(obj)}] {f.name} = {value!r}: must be {bounds}")


def build(cls: type[T], *layers: Mapping[str, Any] | None, error: type[Exception],
          base: T | None = None, section: str | None = None, where: str = "") -> T:
    """`cls` from `base` (or its defaults) overlaid by each layer in turn.

    Keys may use '-' for '_'. Unknown keys, values of the wrong type and values out of
    range raise `error`; `section` names the table in messages (default: the class's
    SECTION), `where` (e.g. a file name) prefixes them."""
    section = section or section_of(cls)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            name = key.replace("-", "_")
            if name not in names:
                raise error(f"{where}[{section}] unknown setting {key!r} (known: {', '.join(sorted(names))})")
            if value is None:
                continue
            try:
                merged[name] = coerce(value, hints[name])
            except (TypeError, ValueError, OverflowError) as exc:
                raise error(f"{where}[{section}] {key} = {value!r} is not a valid value: {exc}") from None
    try:
        return dataclasses.replace(base, **merged) if base is not None else cls(**merged)
    except TypeError as exc:  # a required field without a value
        raise error(f"{where}[{section}] {exc}") from None
    except error as exc:  # a range check: say which file the value came from
        if not where:
            raise
        raise error(f"{where}{exc}") from None


def read_toml(path: Path | None, tables: typing.Iterable[str], *, error: type[Exception]
              ) -> dict[str, dict[str, Any]]:
    """The tables of a TOML settings file ({} without one); unknown tables are errors."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"config file {path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"config file {path}: {exc}") from None
    known = list(tables)
    for name, value in doc.items():
        if name not in known or not isinstance(value, dict):
            raise error(f"config file {path}: unknown section [{name}] (known: {', '.join(known)})")
    return doc


# -- values ------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str | int) -> int:
    """'200GiB', '512M', '4096' -> bytes (binary units; 'GB' is read as GiB too)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError("not a size (examples: 4096, 512MiB, 200GiB)")
    number, unit = m.group(1), _UNITS[(m.group(2) or "").lower()[:1]]
    if "." not in number:  # exact, however large (a range check then refuses it)
        return int(number) * unit
    whole, frac = number.split(".")
    return int(whole) * unit + int(frac) * unit // 10 ** len(frac)


def coerce(value: Any, hint: Any) -> Any:
    """`value` (from TOML, a flag or the environment) as the annotated type; strict: a
    string is not a boolean, a boolean is not a number."""
    kind, _ = _kind(hint)
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if isinstance(value, bool):
        raise TypeError(f"expected {_name(kind)}, not a boolean")
    if kind is int:
        return parse_size(value) if isinstance(value, str) else _exact_int(value)
    if kind is float:
        if isinstance(value, (int, float, str)):
            return float(value)
        raise TypeError("expected a number")
    if _is_strings(kind):  # a TOML list, or "a,b,c" from a flag or the environment
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return tuple(value)
    if kind is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise TypeError("expected a non-empty path")
    if kind is str and not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _exact_int(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def parse_host_port(text: str, *, allow_zero: bool = True) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port), checked without touching the network.

    Port 0 asks the kernel for a free port (the caller reports the one it got). Raises
    ValueError with what is wrong: an empty host, a port that is not 0..65535 (getaddrinfo
    would silently take 99999 modulo 65536), a bracketed host that is not an IPv6 address."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: [{host}] is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 host in brackets, e.g. [::1]:9464")
    elif not re.fullmatch(r"[A-Za-z0-9.\-_]+", host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    lo = 0 if allow_zero else 1
    if not port.isascii() or not port.isdigit() or not lo <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from {lo} to 65535")
    return host, int(port)


# -- annotations -------------------------------------------------------------------------
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation like `float | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else object), True
    return hint, False


def _is_strings(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple and typing.get_args(kind) == (str, ...)


def _is(value: Any, kind: Any) -> bool:
    if _is_strings(kind):
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(kind, type) or isinstance(value, kind)


def _name(kind: Any) -> str:
    if _is_strings(kind):
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path"}.get(kind, getattr(kind, "__name__", str(kind)))

