"""Refs, HEAD, reflog, revision parsing, fork, log, graph and diff on a real store."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processfork.store import (
    AmbiguousRevision,
    InvalidCount,
    InvalidName,
    Manifest,
    MissingObject,
    RefConflict,
    RefIsHead,
    Store,
    UnknownRevision,
    canonical_json,
    validate_ref_name,
)
from store_helpers import add_sequence, make_snapshot

FIXED_TIME = "2026-01-01T00:00:00.000000Z"


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


def test_set_ref_is_compare_and_swap_with_reflog(store):
    a = make_snapshot(store, "a")
    b = make_snapshot(store, "b", parents=[a])
    store.set_ref("main", a, expected_old=None, message="create")
    with pytest.raises(RefConflict) as err:
        store.set_ref("main", b, expected_old=None)
    assert err.value.actual == a and err.value.expected is None
    with pytest.raises(RefConflict):
        store.set_ref("main", b, expected_old=b)
    store.set_ref("main", b, expected_old=a)
    assert store.get_ref("main") == b
    with pytest.raises(RefConflict):
        store.delete_ref("main", expected_old=a)
    store.delete_ref("main", expected_old=b)
    assert store.get_ref("main") is None
    log = store.reflog("main")
    assert [(e.seq, e.old, e.new, e.action) for e in log] == [
        (1, None, a, "update"),
        (2, a, b, "update"),
        (3, b, None, "delete"),
    ]
    assert log[0].message == "create" and log[0].time <= log[1].time <= log[2].time
    with pytest.raises(UnknownRevision):
        store.delete_ref("main")
    with pytest.raises(MissingObject):
        store.set_ref("main", "sha256:" + "0" * 64)


def test_head_follows_its_ref_and_can_be_detached(store):
    a = make_snapshot(store, "a", ref="main", move_head=True)
    assert store.head().ref == "main" and store.head().cid == a
    b = make_snapshot(store, "b", parents=[a])
    store.set_ref("main", b)
    assert store.head().cid == b  # symbolic: moves with main
    head_log = store.reflog("HEAD")
    assert [(e.old, e.new) for e in head_log] == [(None, a), (a, b)]
    info = store.checkout_head(a)
    assert info.ref is None and info.cid == a and info.detached
    store.set_ref("main", a)
    assert store.head().cid == a and store.head().ref is None
    assert store.checkout_head("main").ref == "main"
    c = make_snapshot(store, "c", parents=[a], move_head=True)  # no ref: detaches HEAD
    assert store.head() == type(store.head())(None, c)
    assert store.resolve("HEAD") == c
    assert store.get_ref("HEAD") == c
    assert "HEAD" not in store.list_refs()


def test_unborn_head(store):
    with pytest.raises(UnknownRevision):
        store.resolve("HEAD")
    assert store.log() == []
    a = make_snapshot(store, "a", ref="main", move_head=True)
    with pytest.raises(RefIsHead, match="HEAD points to 'main'"):
        store.delete_ref("main", allow_head=False)
    assert store.get_ref("main") == a
    assert store.delete_ref("main") == a
    assert store.head().ref == "main" and store.head().cid is None
    assert store.log("HEAD") == []
    assert store.log(a)[0].cid == a


@pytest.mark.parametrize(
    "name",
    ["", "HEAD", "-x", "a b", "a..b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b", "/a", "a/", "a//b",
     "a.", "a.lock", ".a", "a/.b", "@", "a@{1}", "x\x01", "é" * 200],
)  # fmt: skip
def test_invalid_ref_names(name):
    with pytest.raises(InvalidName):
        validate_ref_name(name)


@pytest.mark.parametrize("name", ["main", "base/0", "a-b_c.d", "feature/x/y", "deadbeef", "é"])
def test_valid_ref_names(name):
    assert validate_ref_name(name) == name


def _snapshot_without_pages(store, name: str, parents=()) -> str:
    return store.write_snapshot(
        Manifest(name=name, parents=list(parents), created=FIXED_TIME), move_head=False
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=12, unique=True))
def test_resolve_full_cids_and_prefixes(store, names):
    cids = [_snapshot_without_pages(store, n) for n in names]
    every = [c for c, _ in store.iter_snapshots()]
    for cid in cids:
        h = cid.removeprefix("sha256:")
        assert store.resolve(cid) == cid
        assert store.resolve(h) == cid
        assert store.resolve(h.upper()) == cid
        for length in (7, 8, 12, 40, 63):
            matches = [c for c in every if c.startswith("sha256:" + h[:length])]
            for rev in (h[:length], "sha256:" + h[:length]):
                if len(matches) == 1:
                    assert store.resolve(rev) == cid
                else:
                    with pytest.raises(AmbiguousRevision):
                        store.resolve(rev)
        with pytest.raises(UnknownRevision):
            store.resolve(h[:6])  # too short to be a prefix


def _colliding_names() -> tuple[str, str, int]:
    """Two names whose empty snapshots' cids share their first 7 hex digits (birthday search)."""
    seen: dict[str, str] = {}
    i = 0
    while True:
        name = f"n{i}"
        m = Manifest(name=name, created=FIXED_TIME)
        h = hashlib.sha256(canonical_json(m.stored_dict())).hexdigest()
        if h[:7] in seen:
            other = seen[h[:7]]
            oh = Manifest(name=other, created=FIXED_TIME).cid.removeprefix("sha256:")
            common = next(k for k in range(64) if oh[k] != h[k])
            return other, name, common
        seen[h[:7]] = name
        i += 1


def test_ambiguous_prefix_lists_candidates(store):
    first, second, common = _colliding_names()
    a = _snapshot_without_pages(store, first)
    b = _snapshot_without_pages(store, second)
    prefix = a.removeprefix("sha256:")[:common]
    with pytest.raises(AmbiguousRevision) as err:
        store.resolve(prefix)
    assert sorted(err.value.candidates) == sorted([a, b])
    assert "ambiguous" in str(err.value) and "\n" not in str(err.value)
    longer = a.removeprefix("sha256:")[: common + 1]
    assert store.resolve(longer) == a


def test_resolve_refs_and_ancestry(store):
    c0 = _snapshot_without_pages(store, "c0")
    c1 = _snapshot_without_pages(store, "c1", [c0])
    side = _snapshot_without_pages(store, "side", [c0])
    c2 = _snapshot_without_pages(store, "c2", [c1, side])
    store.set_ref("main", c2)
    store.checkout_head("main")
    assert store.resolve("main") == c2
    assert store.resolve("main~") == c1
    assert store.resolve("main~1") == c1
    assert store.resolve("main~2") == c0
    assert store.resolve("main~1~1") == c0
    assert store.resolve("HEAD~2") == c0
    assert store.resolve(c2[:20] + "~1") == c1
    for bad in ("main~3", "nope", "main~x", "", "  ", "sha256:" + "f" * 64):
        with pytest.raises(UnknownRevision):
            store.resolve(bad)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(1, 12), blocks=st.integers(1, 5))
def test_fork_children_share_every_page(store, n, blocks):
    parent = make_snapshot(store, "p", tokens=range(16 * blocks - 3), ref="p", move_head=True)
    head_before = store.head()
    kids = store.fork("p", n)
    assert len(set(kids)) == n
    pm = store.get_snapshot(parent)
    for i, cid in enumerate(kids):
        m = store.get_snapshot(cid)
        assert m.name == f"p/{i}" and m.parents == [parent]
        assert (m.fork.index, m.fork.of) == (i, n)
        assert m.sequences == pm.sequences and m.fingerprint == pm.fingerprint
        assert m.page_keys() == pm.page_keys()
        assert store.resolve(f"p/{i}") == cid and store.resolve(f"p/{i}~1") == parent
        store.read_pages_into(
            [bytes.fromhex(d) for d in m.page_digests()], bytearray(256 * 2 * blocks), 256
        )
    assert store.head() == head_before


def test_fork_prefix_defaults(store):
    base = make_snapshot(store, "b", ref="base", move_head=True)
    assert store.get_snapshot(store.fork("HEAD", 1)[0]).name == "base/0"
    kids = store.fork(base, 2)  # by cid: named after the one ref that points at it
    assert store.list_refs()["base/1"] == kids[1]
    store.set_ref("also-base", base)  # two refs: neither is the name, the short cid is
    short = base.removeprefix("sha256:")[:12]
    kids = store.fork(base, 2)
    assert store.list_refs()[f"{short}/1"] == kids[1]
    assert store.fork(base, 1, prefix="try")[0] == store.get_ref("try/0")
    with pytest.raises(InvalidCount, match="fork count must be an integer from 1 to"):
        store.fork(base, 0)
    with pytest.raises(UnknownRevision):
        store.fork("missing", 2)


def test_log_walks_parents_newest_first_and_marks_refs(store):
    a = make_snapshot(store, "a", ref="main", move_head=True)
    b = make_snapshot(store, "b", parents=[a], ref="main", move_head=True)
    kids = store.fork("main", 2)
    entries = store.log(all_refs=True)
    assert [e.cid for e in entries][-2:] == [b, a]
    assert {e.cid for e in entries[:2]} == set(kids)
    by_cid = {e.cid: e for e in entries}
    assert by_cid[b].refs == ["HEAD", "main"] and by_cid[a].refs == []
    assert [e.cid for e in store.log()] == [b, a]
    assert [e.cid for e in store.log("main/1")] == [kids[1], b, a]
    assert len(store.log(limit=1)) == 1


def test_graph_lines_draw_forks_and_merges(store):
    a = _snapshot_without_pages(store, "a")
    store.set_ref("base", a)
    kids = store.fork("base", 3)
    merge = store.write_snapshot(
        Manifest(name="m", parents=[kids[0], kids[1]], created="2099-01-01T00:00:00.000000Z"),
        ref="merged",
        move_head=False,
    )
    lines = store.graph_lines(store.log(all_refs=True))
    text = [(line, e.manifest.name if e else None) for line, e in lines]
    assert text[0] == ("*", "m")
    assert ("|\\", None) in text
    assert text[-1] == ("*", "a")
    assert sum(1 for line, e in lines if e is not None) == 5
    for line, _ in lines:
        assert set(line) <= set("*|/\\_ ")
    entries = [e for _, e in lines if e is not None]
    assert entries[0].cid == merge


def test_graph_of_a_fork_matches_git(store):
    a = _snapshot_without_pages(store, "a")
    store.set_ref("base", a)
    store.fork("base", 3)
    lines = [line for line, _ in store.graph_lines(store.log(all_refs=True))]
    assert lines == ["*", "| *", "|/", "| *", "|/", "*"]


def test_diff_finds_the_divergence_and_shared_pages(store):
    shared = [bytes([i]) * 256 for i in range(2)]
    seq_a = add_sequence(store, list(range(20)), shared + [b"a" * 256, b"A" * 256])
    seq_b = add_sequence(store, list(range(18)) + [99, 100], shared + [b"b" * 256, b"B" * 256])
    a = store.write_snapshot(Manifest(name="a", sequences=[seq_a]), ref="a", move_head=False)
    b = store.write_snapshot(Manifest(name="b", sequences=[seq_b]), ref="b", move_head=False)
    d = store.diff("a", "b")
    assert (d.a, d.b) == (a, b)
    assert d.common_prefix_tokens == 18 and d.first_divergent_index == 18
    assert (d.token_a, d.token_b) == (18, 99)
    assert (d.shared_pages, d.unique_a, d.unique_b) == (2, 2, 2)
    assert (d.shared_bytes, d.unique_a_bytes, d.unique_b_bytes) == (512, 512, 512)
    same = store.diff("a", a[:19])
    assert same.first_divergent_index is None and same.common_prefix_tokens == 20
