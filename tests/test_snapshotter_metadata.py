"""The pure snapshot rules (snapshotter/_metadata.py) and containerd's filter language
(snapshotter/_filters.py): no files, no sqlite, no containerd."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from snapshotter import _metadata as core
from snapshotter._errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                                 SnapshotterError)
from snapshotter._filters import compile_filters, parse, snapshot_adaptor
from snapshotter._metadata import Kind, MemoryTable, Mount, ServeRemote, Snapshot

REF = core.REF_LABEL


def _do_prepare(t: MemoryTable, kind: Kind, key: str, parent: str = "", labels=None,
                now: int = 1, remote: str | None = None):
    plan = core.prepare(t, kind=kind, key=key, parent=parent, labels=labels, now_ns=now,
                        remote_lower=remote)
    if isinstance(plan, ServeRemote):
        if plan.snapshot:
            t.insert(plan.snapshot)
        return plan
    return t.insert(plan)


def _do_commit(t: MemoryTable, name: str, key: str, labels=None, now: int = 2):
    old, new = core.commit(t, name=name, key=key, labels=labels, now_ns=now)
    t.replace(old.key, new)
    return new


def _base(t: MemoryTable, name: str = "ns/2/base") -> Snapshot:
    _do_prepare(t, Kind.ACTIVE, "ns/1/extract-1 base")
    return _do_commit(t, name, "ns/1/extract-1 base")


# -- the rules, one by one ------------------------------------------------------------

def test_prepare_view_and_commit():
    t = MemoryTable()
    a = _do_prepare(t, Kind.ACTIVE, "ns/1/a", labels={"x": "1", "empty": ""}, now=5)
    assert (a.kind, a.parent, dict(a.labels), a.created_ns, a.updated_ns) == (Kind.ACTIVE, "", {"x": "1"}, 5, 5)
    c = _do_commit(t, "ns/2/c", "ns/1/a", labels={"y": "2"}, now=7)
    assert t.get("ns/1/a") is None
    assert (c.kind, c.id, dict(c.labels), c.created_ns) == (Kind.COMMITTED, a.id, {"y": "2"}, 7)
    v = _do_prepare(t, Kind.VIEW, "ns/3/v", parent="ns/2/c")
    assert (v.kind, v.parent) == (Kind.VIEW, "ns/2/c")


@pytest.mark.parametrize("case, error", [
    ("empty key", InvalidArgument), ("parent missing", NotFound),
    ("parent active", InvalidArgument), ("parent a view", InvalidArgument),
    ("key taken by active", AlreadyExists), ("key taken by committed", AlreadyExists),
    ("huge label", InvalidArgument), ("committed kind", InvalidArgument),
])
def test_prepare_refuses(case, error):
    t = MemoryTable()
    _base(t)
    _do_prepare(t, Kind.ACTIVE, "ns/5/active")
    _do_prepare(t, Kind.VIEW, "ns/6/view", parent="ns/2/base")
    args = {"empty key": dict(key=""), "parent missing": dict(key="k", parent="nope"),
            "parent active": dict(key="k", parent="ns/5/active"),
            "parent a view": dict(key="k", parent="ns/6/view"),
            "key taken by active": dict(key="ns/5/active"),
            "key taken by committed": dict(key="ns/2/base"),
            "huge label": dict(key="k", labels={"a": "x" * 4096}),
            "committed kind": dict(key="k", kind=Kind.COMMITTED)}[case]
    kind = args.pop("kind", Kind.ACTIVE)
    with pytest.raises(error):
        _do_prepare(t, kind, **args)


def test_label_size_bound_is_key_plus_value_bytes():
    t = MemoryTable()
    _do_prepare(t, Kind.ACTIVE, "ok", labels={"k": "x" * 4095})
    with pytest.raises(InvalidArgument):
        _do_prepare(t, Kind.ACTIVE, "bad", labels={"k": "é" * 2048})  # 4097 bytes


def test_commit_rules():
    t = MemoryTable()
    _base(t)
    _do_prepare(t, Kind.ACTIVE, "ns/3/a", parent="ns/2/base")
    _do_prepare(t, Kind.VIEW, "ns/4/v", parent="ns/2/base")
    with pytest.raises(AlreadyExists):
        _do_commit(t, "ns/2/base", "ns/3/a")
    with pytest.raises(AlreadyExists):  # names and keys share one namespace
        _do_commit(t, "ns/4/v", "ns/3/a")
    with pytest.raises(NotFound):
        _do_commit(t, "ns/9/x", "missing")
    with pytest.raises(FailedPrecondition):
        _do_commit(t, "ns/9/x", "ns/4/v")
    with pytest.raises(FailedPrecondition):
        _do_commit(t, "ns/9/x", "ns/2/base")
    with pytest.raises(InvalidArgument):
        _do_commit(t, "", "ns/3/a")
    c = _do_commit(t, "ns/9/x", "ns/3/a")
    assert c.parent == "ns/2/base"


def test_remove_refuses_parents_and_missing():
    t = MemoryTable()
    _base(t)
    _do_prepare(t, Kind.VIEW, "ns/3/v", parent="ns/2/base")
    with pytest.raises(FailedPrecondition):
        core.remove(t, "ns/2/base")
    with pytest.raises(NotFound):
        core.remove(t, "missing")
    t.delete(core.remove(t, "ns/3/v").key)
    t.delete(core.remove(t, "ns/2/base").key)
    assert list(t) == []


def test_update_changes_labels_only():
    t = MemoryTable()
    _do_prepare(t, Kind.ACTIVE, "a", labels={"x": "1", "y": "2"})
    u = core.update(t, key="a", labels={"x": "9", "z": "3"}, paths=["labels.x"], now_ns=8)
    assert dict(u.labels) == {"x": "9", "y": "2"} and u.updated_ns == 8 and u.created_ns == 1
    u = core.update(t, key="a", labels={"z": "3"}, paths=["labels.y"], now_ns=8)
    assert dict(u.labels) == {"x": "1"}  # labels.K absent from the request deletes K
    assert dict(core.update(t, key="a", labels={"z": "3"}, paths=["labels"], now_ns=8).labels) == {"z": "3"}
    assert dict(core.update(t, key="a", labels={"w": "4"}, paths=[], now_ns=8).labels) == {"w": "4"}
    for path in ("name", "parent", "kind", "created_at"):
        with pytest.raises(InvalidArgument):
            core.update(t, key="a", labels={}, paths=[path], now_ns=8)
    with pytest.raises(NotFound):
        core.update(t, key="b", labels={}, paths=[], now_ns=8)


def test_chain_is_nearest_first():
    t = MemoryTable()
    _base(t, "n/2/l1")
    _do_prepare(t, Kind.ACTIVE, "n/3/k2", parent="n/2/l1")
    _do_commit(t, "n/4/l2", "n/3/k2")
    top = _do_prepare(t, Kind.ACTIVE, "n/5/top", parent="n/4/l2")
    assert [p.key for p in core.chain(t, top)] == ["n/4/l2", "n/2/l1"]


def test_keys_and_layers():
    assert core.split_key("k8s.io/12/extract-1 sha256:ab") == ("k8s.io", "extract-1 sha256:ab")
    assert core.split_key("k8s.io/12/a/b") == ("k8s.io", "a/b")
    assert core.split_key("plain") == ("", "plain")
    assert core.remote_name("k8s.io/3/x", "sha256:c") == "k8s.io/sha256:c"
    assert core.remote_name("x", "sha256:c") == "sha256:c"
    assert core.is_layer("default/4/extract-77 sha256:aa", {})
    assert core.is_layer("k8s.io/4/whatever", {REF: "sha256:aa"})
    assert not core.is_layer("k8s.io/4/ctr1", {})


# -- the remote-layer rule ------------------------------------------------------------

def test_remote_layer_is_committed_under_the_chain_id_with_its_parent():
    t = MemoryTable()
    base = _base(t, "k8s.io/2/sha256:p")
    labels = {REF: "sha256:c1", "containerd.io/snapshot/cri.layer-digest": "sha256:d1"}
    plan = _do_prepare(t, Kind.ACTIVE, "k8s.io/3/extract-1 sha256:c1", parent=base.key,
                       labels=labels, now=9, remote="/layers/d1")
    assert isinstance(plan, ServeRemote) and plan.name == "k8s.io/sha256:c1"
    snap = t.get("k8s.io/sha256:c1")
    assert (snap.kind, snap.parent, snap.remote, snap.created_ns) == (Kind.COMMITTED, base.key, "/layers/d1", 9)
    assert snap.labels[REF] == "sha256:c1" and snap.labels[core.REMOTE_LABEL] == "/layers/d1"
    assert t.get("k8s.io/3/extract-1 sha256:c1") is None  # the active key is never created
    # containerd's lookup filter finds it
    f = f'labels."containerd.io/snapshot.ref"==sha256:c1,parent=="{base.key}"'
    assert _matches([f], snap)
    # Prepared again (same parent): served, nothing new stored
    again = _do_prepare(t, Kind.ACTIVE, "k8s.io/4/extract-2 sha256:c1", parent=base.key,
                        labels=labels, remote="/layers/d1")
    assert again == ServeRemote("k8s.io/sha256:c1", None)


def test_remote_rule_needs_an_active_prepare_a_ref_and_a_found_layer():
    t = MemoryTable()
    assert isinstance(_do_prepare(t, Kind.ACTIVE, "n/1/a", labels={REF: "sha256:x"}), Snapshot)
    assert isinstance(_do_prepare(t, Kind.ACTIVE, "n/2/b", remote="/l/x"), Snapshot)
    assert isinstance(_do_prepare(t, Kind.VIEW, "n/3/c", labels={REF: "sha256:x"}, remote="/l/x"), Snapshot)


def test_remote_name_taken_otherwise_falls_back_to_a_normal_snapshot():
    t = MemoryTable()
    _base(t, "n/2/p1")
    _do_prepare(t, Kind.ACTIVE, "n/3/k", parent="n/2/p1")
    _do_commit(t, "n/4/p2", "n/3/k")
    labels = {REF: "sha256:c"}
    _do_prepare(t, Kind.ACTIVE, "n/5/x", parent="n/2/p1", labels=labels, remote="/l/c")
    # the same chain id over another parent: not the same layer chain, unpack normally
    plan = _do_prepare(t, Kind.ACTIVE, "n/6/y", parent="n/4/p2", labels=labels, remote="/l/c")
    assert isinstance(plan, Snapshot) and plan.kind == Kind.ACTIVE and plan.key == "n/6/y"


def test_remote_rule_still_checks_the_parent():
    t = MemoryTable()
    with pytest.raises(NotFound):
        _do_prepare(t, Kind.ACTIVE, "n/1/x", parent="n/0/missing", labels={REF: "sha256:c"}, remote="/l/c")


# -- mounts ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, lowers, expected", [
    (Kind.ACTIVE, [], [Mount("bind", "/s/1/fs", ("rw", "rbind"))]),
    (Kind.VIEW, [], [Mount("bind", "/s/1/fs", ("ro", "rbind"))]),
    (Kind.VIEW, ["/s/0/fs"], [Mount("bind", "/s/0/fs", ("ro", "rbind"))]),
    (Kind.ACTIVE, ["/s/0/fs"], [Mount("overlay", "overlay", (
        "workdir=/s/1/work", "upperdir=/s/1/fs", "lowerdir=/s/0/fs"))]),
    (Kind.VIEW, ["/s/2/fs", "/s/0/fs"], [Mount("overlay", "overlay", ("lowerdir=/s/2/fs:/s/0/fs",))]),
    (Kind.ACTIVE, ["/s/2/fs", "/s/0/fs"], [Mount("overlay", "overlay", (
        "workdir=/s/1/work", "upperdir=/s/1/fs", "lowerdir=/s/2/fs:/s/0/fs"))]),
])
def test_mounts_like_containerds_overlay_snapshotter(kind, lowers, expected):
    snap = Snapshot(key="k", kind=kind)
    assert core.mounts(snap, fs_dir="/s/1/fs", work_dir="/s/1/work", lower_dirs=lowers) == expected


# -- a state machine over random operation sequences -----------------------------------

KEYS = ["n/1/a", "n/2/b", "n/3/extract-1 sha256:c", "m/4/d", "e", ""]
NAMES = ["n/10/sha256:l1", "n/11/sha256:l2", "m/12/x", "e", "n/1/a"]
PARENTS = ["", "n/10/sha256:l1", "n/11/sha256:l2", "m/12/x", "n/1/a", "n/sha256:r", "missing"]
label_maps = st.dictionaries(st.sampled_from(["a", "b", REF]), st.sampled_from(["", "1", "sha256:r"]),
                             max_size=2)


class Rules(RuleBasedStateMachine):
    """Every operation against a model of what containerd's bolt storage would answer."""

    def __init__(self) -> None:
        super().__init__()
        self.t = MemoryTable()
        self.model: dict[str, tuple[Kind, str]] = {}  # key -> (kind, parent)
        self.now = 0

    def _expect(self, fn, expected):
        self.now += 1
        if expected is None:
            return fn()
        with pytest.raises(expected):
            fn()
        return None

    @initialize(depth=st.integers(0, 3))
    def layers(self, depth):
        """Start from a committed chain, as after an image pull."""
        parent = ""
        for i in range(depth):
            _do_prepare(self.t, Kind.ACTIVE, f"n/{i}/extract-{i}", parent)
            parent = _do_commit(self.t, f"n/{i}/sha256:base{i}", f"n/{i}/extract-{i}").key
            self.model[parent] = (Kind.COMMITTED, "" if i == 0 else f"n/{i - 1}/sha256:base{i - 1}")

    def _some(self, data, pool, known=None):
        """Mostly a key the table holds (of `known` kinds), sometimes any from `pool`."""
        held = sorted(k for k, (kind, _) in self.model.items() if known is None or kind in known)
        return data.draw(st.sampled_from(held) if held and data.draw(st.integers(0, 3)) != 3 else
                         st.sampled_from(pool))

    @rule(data=st.data(), kind=st.sampled_from([Kind.ACTIVE, Kind.VIEW]), key=st.sampled_from(KEYS),
          labels=label_maps, remote=st.sampled_from([None, "/l/r"]))
    def prepare(self, data, kind, key, labels, remote):
        self._prepare(kind, key, self._some(data, PARENTS, {Kind.COMMITTED}), labels, remote)

    @rule(data=st.data(), chain_id=st.sampled_from(["sha256:r", "sha256:s"]))
    def prepare_layer(self, data, chain_id):
        """A layer Prepare as CRI sends it, for a layer found on the mount."""
        parent = self._some(data, [""], {Kind.COMMITTED})
        self._prepare(Kind.ACTIVE, f"n/{self.now + 200}/extract-{self.now} {chain_id}", parent,
                      {REF: chain_id}, "/l/" + chain_id)

    @rule(data=st.data())
    def prepare_served_layer_again(self, data):
        served = [s for s in self.t if s.remote]
        if served:
            s = data.draw(st.sampled_from(served))
            ns, _, target = s.key.rpartition("/")
            key = f"{ns}/{self.now + 300}/extract-again" if ns else f"extract-again-{self.now}"
            self._prepare(Kind.ACTIVE, key, s.parent, {REF: target}, s.remote)

    def _prepare(self, kind, key, parent, labels, remote):
        p = self.model.get(parent)
        expected = (InvalidArgument if not key else NotFound if parent and p is None
                    else InvalidArgument if parent and p[0] != Kind.COMMITTED
                    else AlreadyExists if key in self.model else None)
        got = self._expect(lambda: _do_prepare(self.t, kind, key, parent, labels, self.now, remote), expected)
        if got is None:
            return
        clean = {k: v for k, v in labels.items() if v}
        name = core.remote_name(key, clean.get(REF, ""))
        if kind == Kind.ACTIVE and clean.get(REF) and remote and (
                name not in self.model or self.model[name] == (Kind.COMMITTED, parent)
                and self.t.get(name).remote):
            assert isinstance(got, ServeRemote) and got.name == name
            if name in self.model:  # served again: nothing new
                assert got.snapshot is None
            else:
                assert (got.snapshot.key, got.snapshot.parent, got.snapshot.remote) == (name, parent, remote)
                assert dict(got.snapshot.labels) == {**clean, core.REMOTE_LABEL: remote}
                self.model[name] = (Kind.COMMITTED, parent)
        else:
            assert isinstance(got, Snapshot) and dict(got.labels) == clean
            self.model[key] = (kind, parent)

    @rule(data=st.data(), name=st.sampled_from(NAMES), labels=label_maps)
    def commit(self, data, name, labels):
        key = self._some(data, KEYS, {Kind.ACTIVE})
        if data.draw(st.booleans()):  # layer-like names: a new one, unique
            name = f"n/{self.now + 100}/sha256:l"
        expected = (InvalidArgument if not name else AlreadyExists if name in self.model
                    else NotFound if key not in self.model
                    else FailedPrecondition if self.model[key][0] != Kind.ACTIVE else None)
        before = self.t.get(key)
        got = self._expect(lambda: _do_commit(self.t, name, key, labels, self.now), expected)
        if got is not None:
            assert got.id == before.id and got.parent == before.parent
            assert dict(got.labels) == {k: v for k, v in labels.items() if v}  # not inherited
            self.model[name] = (Kind.COMMITTED, self.model.pop(key)[1])

    @rule(data=st.data())
    def remove(self, data):
        key = self._some(data, KEYS + NAMES + PARENTS)
        expected = (NotFound if key not in self.model
                    else FailedPrecondition if any(p == key for _, p in self.model.values()) else None)
        got = self._expect(lambda: self.t.delete(core.remove(self.t, key).key), expected)
        if expected is None:
            assert got is None and self.t.get(key) is None
            del self.model[key]

    @rule(data=st.data(), labels=label_maps,
          paths=st.lists(st.sampled_from(["labels", "labels.a", "labels.b", "name"]), max_size=2))
    def update(self, data, labels, paths):
        key = self._some(data, KEYS + NAMES)
        expected = NotFound if key not in self.model else InvalidArgument if "name" in paths else None
        got = self._expect(lambda: core.update(self.t, key=key, labels=labels, paths=paths,
                                               now_ns=self.now), expected)
        if got is not None:
            assert (got.kind, got.parent) == self.model[key]
            assert all(v for v in got.labels.values())
            self.t.replace(key, got)

    @invariant()
    def table_matches_model(self):
        assert {s.key: (s.kind, s.parent) for s in self.t} == self.model

    @invariant()
    def parents_are_committed_and_ids_unique(self):
        rows = list(self.t)
        assert len({s.id for s in rows}) == len(rows)
        for s in rows:
            if s.parent:
                assert self.t.get(s.parent).kind == Kind.COMMITTED
            if s.remote:
                assert s.kind == Kind.COMMITTED  # labels may change (Update), the kind never
            assert [p.key for p in core.chain(self.t, s)] or not s.parent


TestRules = Rules.TestCase
TestRules.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


# -- filters --------------------------------------------------------------------------

def _matches(filters, snap: Snapshot) -> bool:
    return compile_filters(filters)(snapshot_adaptor(
        name=snap.key, parent=snap.parent, kind=snap.kind.filter_name, labels=snap.labels))


SNAP = Snapshot(key="k8s.io/5/sha256:c", kind=Kind.COMMITTED, parent="k8s.io/2/sha256:p",
                labels={REF: "sha256:c", "a.b": "x y", "n": "1"})


@pytest.mark.parametrize("filters, hit", [
    ([], True), ([""], True),
    ([f'labels."{REF}"==sha256:c,parent=="k8s.io/2/sha256:p"'], True),  # what containerd 1.6 sends
    ([f'labels."{REF}"==sha256:c,parent=="other"'], False),
    (['kind==committed'], True), (['kind==active'], False), (['kind!=active'], True),
    (['name=="k8s.io/5/sha256:c"'], True), (['name==k8s.io/5/sha256:c'], True),
    (['labels."a.b"=="x y"'], True), (['labels.n==1'], True), (['labels.n==2'], False),
    (['labels.n'], True), (['labels.missing'], False), (['labels.missing!=x'], True),
    (['parent'], True), (['name~=^k8s\\.io/'], True), (['name~=/sha256:[cd]$/'], True),
    (['name~=|^m|'], False),
    (['kind==active', 'labels.n==1'], True),  # strings are alternatives (OR)
    (['kind==active,labels.n==1'], False),    # commas are AND
    ([' kind == committed , labels.n == 1 '], True),
    (['labels."a\\x2eb"=="x\\u0020y"'], True),  # Go escapes in quoted fields and values
])
def test_filters(filters, hit):
    assert _matches(filters, SNAP) is hit


def test_parent_filter_matches_an_empty_parent():
    # containerd's adaptor reports parent as present even when empty: a base layer's lookup
    # sends parent=="" and must find the remote snapshot.
    base = Snapshot(key="n/sha256:b", kind=Kind.COMMITTED, labels={REF: "sha256:b"})
    assert _matches([f'labels."{REF}"==sha256:b,parent==""'], base)


@pytest.mark.parametrize("bad", ["kind==", "kind=", "kind===x", '"unterminated', "a.", ",",
                                 "kind==x y", 'name=="x\\q"', "name==/re/", "name~=/(/",
                                 "labels.a==1,", "1a b"])
def test_bad_filters_are_invalid_argument(bad):
    with pytest.raises(InvalidArgument):
        compile_filters([bad])


def test_bad_filter_is_a_snapshotter_error():
    assert issubclass(InvalidArgument, SnapshotterError)
    assert parse("") == ()


@given(value=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\x00"),
                     max_size=20),
       other=st.text(max_size=5))
def test_any_label_value_round_trips_through_a_quoted_filter(value, other):
    snap = Snapshot(key="k", kind=Kind.ACTIVE, labels={"key.with.dots": value} if value else {})
    quoted = json.dumps(value, ensure_ascii=False)  # Go quoting: UTF-8 kept, controls escaped
    assert _matches([f'labels."key.with.dots"=={quoted}'], snap) is bool(value)
    assert _matches([f'labels."key.with.dots"=={json.dumps(value + other + "z")}'], snap) is False
