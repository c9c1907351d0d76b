"""Manifests: canonical bytes, cids, the stored form with page tables, validation, ages."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processfork.store import (
    FORMAT,
    ForkInfo,
    InvalidAge,
    InvalidManifest,
    Manifest,
    MissingObject,
    SnapshotSequence,
    Store,
    TokenRef,
    UnsupportedFormat,
    canonical_json,
    parse_age,
)

hex32 = st.binary(min_size=16, max_size=16).map(bytes.hex)
cids = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=12))
fingerprints = st.dictionaries(st.text(max_size=10), json_leaf, max_size=6)
sequences = st.builds(
    SnapshotSequence,
    tokens=st.builds(TokenRef, digest=hex32, count=st.integers(0, 10_000)),
    pages=st.lists(st.tuples(hex32, hex32), max_size=20),
)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    of = draw(st.integers(1, 20))
    fork = draw(st.one_of(st.none(), st.integers(0, of - 1).map(lambda i: ForkInfo(i, of))))
    return Manifest(
        name=draw(st.text(min_size=1, max_size=20)),
        parents=draw(st.lists(cids, max_size=3, unique=True)),
        fork=fork,
        created=draw(st.text(min_size=1, max_size=30)),
        fingerprint=draw(fingerprints),
        sequences=draw(st.lists(sequences, max_size=4)),
    )


@settings(max_examples=100, deadline=None)
@given(m=manifests())
def test_manifest_dict_round_trip_and_cid(m):
    m.validate()
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    data = m.canonical_bytes()
    assert data == canonical_json(json.loads(data))
    assert m.cid == "sha256:" + hashlib.sha256(data).hexdigest()
    assert Manifest.from_stored(data, m.page_tables()) == m
    assert m.num_tokens == sum(s.tokens.count for s in m.sequences)
    assert m.page_digests() == {d for s in m.sequences for pair in s.pages for d in pair}


def test_canonical_json_rules():
    assert canonical_json({"b": 1, "a": [1, "é", None]}) == '{"a":[1,"é",null],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


def test_stored_form_names_page_tables_not_pages():
    seq = SnapshotSequence(TokenRef("ab" * 16, 20), [("01" * 16, "02" * 16), ("03" * 16, "04" * 16)])
    m = Manifest(name="n", created="2026-01-01T00:00:00.000000Z", sequences=[seq])
    stored = json.loads(m.canonical_bytes())
    table = bytes.fromhex("01" * 16 + "02" * 16 + "03" * 16 + "04" * 16)
    assert stored["sequences"] == [
        {
            "pages": {"count": 2, "digest": next(iter(m.page_tables()))},
            "tokens": {"count": 20, "digest": "ab" * 16},
        }
    ]
    assert m.page_tables() == {next(iter(m.page_tables())): table}
    assert list(stored) == sorted(stored)


def test_a_fork_child_shares_page_tables_so_its_manifest_stays_small():
    pages = [(f"{i:032x}", f"{i + 1:032x}") for i in range(0, 4000, 2)]
    parent = Manifest(name="p", sequences=[SnapshotSequence(TokenRef("ab" * 16, 32000), pages)])
    child = Manifest(
        name="p/0", parents=[parent.cid], fork=ForkInfo(0, 12), sequences=parent.sequences
    )
    assert child.page_tables() == parent.page_tables()
    assert len(child.canonical_bytes()) < 600


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda d: d.update(format="paged-other-v9"), UnsupportedFormat),
        (lambda d: d.pop("created"), InvalidManifest),
        (lambda d: d.update(extra=1), InvalidManifest),
        (lambda d: d.update(parents=["sha256:abc"]), InvalidManifest),
        (lambda d: d.update(fork={"index": 3, "of": 3}), InvalidManifest),
        (lambda d: d["sequences"][0]["pages"].append(["zz", "yy"]), InvalidManifest),
        (lambda d: d["sequences"][0]["tokens"].update(count=-1), InvalidManifest),
    ],
)
def test_invalid_manifests_are_refused(mutate, error):
    seq = SnapshotSequence(TokenRef("ab" * 16, 1), [("01" * 16, "02" * 16)])
    d = Manifest(name="n", sequences=[seq]).to_dict()
    mutate(d)
    with pytest.raises(error):
        Manifest.from_dict(d)


def test_unknown_format_is_refused_by_write_snapshot(store):
    m = Manifest(name="x", format="paged-future-v2")
    with pytest.raises(UnsupportedFormat):
        store.write_snapshot(m)
    assert store.status().num_snapshots == 0


def test_write_snapshot_refuses_missing_objects_and_writes_nothing(store):
    page = store.put_pages([b"k" * 64]).digests[0].hex()
    tokens = store.put_tokens([1, 2, 3])
    missing_page = SnapshotSequence(tokens, [(page, "ff" * 16)])
    with pytest.raises(MissingObject, match="missing page"):
        store.write_snapshot(Manifest(name="a", sequences=[missing_page]), ref="a")
    missing_tokens = SnapshotSequence(TokenRef("ee" * 16, 3), [(page, page)])
    with pytest.raises(MissingObject, match="missing blob"):
        store.write_snapshot(Manifest(name="b", sequences=[missing_tokens]), ref="b")
    orphan = Manifest(name="c", parents=["sha256:" + "0" * 64], sequences=[])
    with pytest.raises(MissingObject, match="missing snapshot"):
        store.write_snapshot(orphan, ref="c")
    wrong_count = SnapshotSequence(TokenRef(tokens.digest, 4), [(page, page)])
    with pytest.raises(InvalidManifest):
        store.write_snapshot(Manifest(name="d", sequences=[wrong_count]))
    st_ = store.status()
    assert (st_.num_snapshots, st_.num_refs, st_.head.cid) == (0, 0, None)
    assert store.reflog("a") == [] and store.reflog("HEAD") == []


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("now", 0.0),
        ("0", 0.0),
        (90, 90.0),
        ("90", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("2.weeks", 1209600.0),
        ("2.weeks.ago", 1209600.0),
        ("30d", 2592000.0),
        ("1.5h", 5400.0),
        ("3 days", 259200.0),
        ("never", math.inf),
    ],
)
def test_parse_age(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "-5", "m10", "1h 2", True, -1])
def test_parse_age_rejects_garbage(text):
    with pytest.raises(InvalidAge):
        parse_age(text)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tokens=st.lists(st.integers(0, 50_000), min_size=1, max_size=100))
def test_snapshot_round_trip_through_the_store(store, tokens):
    pages = [
        bytes([len(tokens) % 256]) * 32 + bytes(str(i), "ascii")
        for i in range(2 * -(-len(tokens) // 16))
    ]
    r = store.put_pages(pages)
    ref = store.put_tokens(tokens)
    hexes = [d.hex() for d in r.digests]
    seq = SnapshotSequence(ref, [(hexes[i], hexes[i + 1]) for i in range(0, len(hexes), 2)])
    m = Manifest(name="rt", fingerprint={"block_size": 16, "format": FORMAT}, sequences=[seq, seq])
    cid = store.write_snapshot(m, move_head=False)
    assert cid == m.cid
    assert store.get_snapshot(cid) == m
    assert store.get_snapshot(cid.removeprefix("sha256:")) == m
    assert store.get_tokens(store.get_snapshot(cid).sequences[1].tokens) == tokens
    assert dict(store.iter_snapshots())[cid] == m


@pytest.mark.parametrize(
    "bad, named",
    [
        (["01" * 16, "0A" * 16], "0A0A"),  # upper case
        (["01" * 16, "02" * 15], "0202"),  # 30 digits
        (["01" * 16, "02" * 17], "0202"),  # 34 digits, beside a 30-digit one below
        (["01" * 16, 7], "7"),  # not a string
        (["01" * 16], "a page entry is a"),  # not a pair
        ("ab", "a page entry is a"),  # a string of two characters
        (["01" * 15 + "zz", "02" * 16], "zz"),
    ],
)
def test_a_bad_page_entry_among_thousands_is_named(bad, named):
    """The digests are checked in one pass when they are all well formed; the entry at fault is
    still named, wherever it is, whatever is wrong with it."""
    pages = [("%032x" % (2 * i), "%032x" % (2 * i + 1)) for i in range(4096)]
    pages[2711] = bad
    if bad == ["01" * 16, "02" * 17]:
        pages[2712] = ("03" * 16, "04" * 15)  # the lengths add up to whole digests
    with pytest.raises(InvalidManifest, match=named):
        SnapshotSequence(TokenRef("ab" * 16, 1), pages).validate()
    pages[2711], pages[2712] = ("05" * 16, "06" * 16), ("07" * 16, "08" * 16)
    SnapshotSequence(TokenRef("ab" * 16, 1), pages).validate()
