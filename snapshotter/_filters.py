"""containerd's filter language (github.com/containerd/containerd/filters), for List.

    filters   := one string per alternative; a snapshot matches if ANY string matches
    selectors := selector ("," selector)*          every selector must match (AND)
    selector  := fieldpath [operator value]        no operator: the field is present
    fieldpath := field ("." field)*                field: [A-Za-z0-9_]+ or "quoted"
    operator  := "==" | "!=" | "~="                ~= is a regular expression search
    value     := "quoted" | [^\\s,]+                (~= also takes /re/ and |re|)

What containerd 1.6 actually sends a proxy snapshotter: the remote-snapshot lookup
`labels."containerd.io/snapshot.ref"==sha256:...,parent=="ns/3/sha256:..."` and, from
`ctr snapshots ls` / GC, no filter at all. Fields as containerd's snapshot adaptor
answers them: kind (active|view|committed), name, parent (always present, even empty),
labels.<key> (absent when the label is). Pure: strings in, a predicate out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ._errors import InvalidArgument

#: Field lookup: the path -> (value, present).
Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]

_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "", "==", "!=", "~="
    value: str = ""

    def match(self, field: Adaptor) -> bool:
        value, present = field(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return re.search(self.value, value) is not None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r} at {self.pos}: {msg}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, pattern: str) -> str:
        m = re.compile(pattern).match(self.text, self.pos)
        if not m or not m.group(0):
            raise self.error("unexpected input")
        self.pos = m.end()
        return m.group(0)

    def quoted(self, quotes: str) -> str:
        quote = self.text[self.pos]
        if quote not in quotes:
            raise self.error("invalid quote")
        out, i = [], self.pos + 1
        while True:
            if i >= len(self.text) or self.text[i] == "\n":
                raise self.error("quoted literal not terminated")
            ch = self.text[i]
            if ch == quote:
                break
            if ch == "\\":
                nxt = self.text[i + 1:i + 2]
                if nxt in _ESCAPES or nxt == quote:
                    out.append(_ESCAPES.get(nxt, nxt))
                    i += 2
                    continue
                m = re.compile(r"x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|([0-7]{3})"
                               ).match(self.text, i + 1)
                if not m:
                    raise self.error("illegal escape sequence")
                hexa = m.group(1) or m.group(2) or m.group(3)
                out.append(chr(int(hexa, 16)) if hexa else chr(int(m.group(4), 8)))
                i = m.end()
                continue
            out.append(ch)
            i += 1
        self.pos = i + 1
        return "".join(out)


def _field(s: _Scanner) -> str:
    if s.peek() == '"':
        return s.quoted('"')
    return s.take(r"[A-Za-z0-9_]+")


def _selector(s: _Scanner) -> Selector:
    path = [_field(s)]
    while s.peek() == ".":
        s.pos += 1
        path.append(_field(s))
    if s.peek() in ("", ","):
        return Selector(tuple(path), "")
    op = s.take(r"[=!~]+")
    if op not in ("==", "!=", "~="):
        raise s.error(f"unsupported operator {op!r}")
    if s.peek() == "":
        raise s.error("expected a value")
    if s.peek() in ('"', "/", "|"):
        value = s.quoted('"/|' if op == "~=" else '"')
    else:
        value = s.take(r"[^\s,]+")
    if op == "~=":
        try:
            re.compile(value)
        except re.error as exc:
            raise s.error(f"bad regular expression: {exc}") from None
    return Selector(tuple(path), op, value)


def parse(text: str) -> tuple[Selector, ...]:
    """One filter string -> its selectors (all must match). "" matches everything."""
    if text == "":
        return ()
    s = _Scanner(text)
    selectors = [_selector(s)]
    while (ch := s.peek()) != "":
        if ch != ",":
            raise s.error(f"unexpected {ch!r}")
        s.pos += 1
        selectors.append(_selector(s))
    return tuple(selectors)


def compile_filters(filters: Iterable[str]) -> Callable[[Adaptor], bool]:
    """containerd's ParseAll: no strings match everything, else any string's selectors all match."""
    alternatives = [parse(f) for f in filters]
    if not alternatives:
        return lambda field: True
    return lambda field: any(all(sel.match(field) for sel in alt) for alt in alternatives)


def snapshot_adaptor(*, name: str, parent: str, kind: str,
                     labels: Mapping[str, str]) -> Adaptor:
    """Fields of one snapshot as containerd's snapshot adaptor reports them."""

    def field(path: tuple[str, ...]) -> tuple[str, bool]:
        head = path[0] if path else ""
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels" and labels:
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return field
