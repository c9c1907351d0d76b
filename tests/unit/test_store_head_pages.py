"""Manifests of pages of one KV head each (`paged-batchinvariant-v4`): stored form, checks, the
format record's upgrade to 4, and that fsck, gc, forks and `pf show` count blocks, not pairs."""

from __future__ import annotations

import json

import pytest
from processfork.store import InvalidManifest, Manifest, SnapshotSequence, Store, TokenRef
from processfork.store.documents import snapshot_doc
from processfork.store.manifest import FORMAT, FORMAT_HEADS, FORMAT_STATE, PageGroup
from store_helpers import BLOCK, make_snapshot, random_pages

HEADS = 4
FINGERPRINT = {"block_size": BLOCK, "model": "tp", "num_kv_heads": HEADS, "tp_size": 2}


def _head_sequence(store: Store, tokens: list[int], heads: int = HEADS) -> SnapshotSequence:
    """Tokens with one K and one V page per block and per head, head by head in each block."""
    blocks = -(-len(tokens) // BLOCK)
    digests = [d.hex() for d in store.put_pages(random_pages(2 * heads * blocks)).digests]
    pages = [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)]
    return SnapshotSequence(store.put_tokens(tokens), pages, heads=heads)


def _format_version(store: Store) -> int:
    return store.meta_get("format")["version"]


def test_a_head_page_snapshot_round_trips_and_raises_the_format_to_4(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        plain = make_snapshot(store, "plain", ref="plain")
        assert _format_version(store) == 1
        seq = _head_sequence(store, list(range(40)))  # 3 blocks of 16, 4 heads: 12 pairs
        m = Manifest(format=FORMAT_HEADS, name="tp", fingerprint=FINGERPRINT, sequences=[seq])
        cid = store.write_snapshot(m, ref="tp")
        assert _format_version(store) == 4
        stored = json.loads(m.canonical_bytes())["sequences"][0]
        assert stored["heads"] == HEADS and stored["pages"]["count"] == 12
        back = store.get_snapshot(cid)
        assert back == m and back.sequences[0].num_blocks == 3
        assert back.sequences[0].block_pages()[1] == seq.pages[4:8]  # block 1: heads 0..3
        assert back.sequences[0].group_pages(0) == (0, seq.pages)
        doc = snapshot_doc(store, cid, back)
        assert doc["num_blocks"] == 3 and doc["sequences"][0]["blocks"] == 3
        assert doc["num_pages"] == 24
        assert list(store.fsck()) == []
        children = store.fork_named("tp", 2)
        assert all(store.get_snapshot(c).sequences == back.sequences for _, c in children)
        store.delete_ref("plain")
        store.gc(prune="now")
        assert store.get_snapshot(cid) == m
        assert list(store.fsck()) == []
    with Store(path) as store:  # a version-4 store opens again, its older manifests too
        assert store.get_snapshot(cid) == m
        assert store.get_snapshot(plain).format == FORMAT


def test_a_head_page_sequence_may_have_groups_counted_in_blocks(tmp_path):
    with Store(tmp_path / "s") as store:
        seq = _head_sequence(store, list(range(70)), heads=2)  # 5 blocks, 10 pairs
        seq.groups = [PageGroup(2, 3), PageGroup(0, 2)]
        seq.pages = seq.pages[:10]
        m = Manifest(format=FORMAT_HEADS, name="sw", fingerprint=FINGERPRINT, sequences=[seq])
        m.validate()
        assert seq.group_pages(0) == (2, seq.pages[:6])
        assert seq.group_pages(1) == (0, seq.pages[6:])
        d = json.loads(m.canonical_bytes())
        assert d["sequences"][0]["groups"] == [{"count": 3, "first": 2},
                                               {"count": 2, "first": 0}]


def test_head_page_manifests_are_checked():
    page = ("aa" * 16, "bb" * 16)
    tokens = TokenRef("cc" * 16, 40)
    with pytest.raises(InvalidManifest, match="not whole blocks of 4 heads"):
        Manifest(format=FORMAT_HEADS, name="x",
                 sequences=[SnapshotSequence(tokens, [page] * 6, heads=4)]).validate()
    with pytest.raises(InvalidManifest, match="have heads in"):
        Manifest(format=FORMAT_HEADS, name="x",
                 sequences=[SnapshotSequence(tokens, [page] * 3)]).validate()
    with pytest.raises(InvalidManifest, match="have heads in"):
        Manifest(format=FORMAT, name="x",
                 sequences=[SnapshotSequence(tokens, [page] * 3, heads=1)]).validate()
    with pytest.raises(InvalidManifest, match="positive integer"):
        Manifest(format=FORMAT_HEADS, name="x",
                 sequences=[SnapshotSequence(tokens, [], heads=0)]).validate()
    state = SnapshotSequence(tokens, [page] * 4, [PageGroup(1, 1, True), PageGroup(0, 1)], heads=2)
    with pytest.raises(InvalidManifest, match=f"belong in {FORMAT_STATE}"):
        Manifest(format=FORMAT_HEADS, name="x", sequences=[state]).validate()
    grouped = SnapshotSequence(tokens, [page] * 4, [PageGroup(0, 1), PageGroup(0, 2)], heads=2)
    with pytest.raises(InvalidManifest, match="groups count 3 blocks, the sequence has 2"):
        Manifest(format=FORMAT_HEADS, name="x", sequences=[grouped]).validate()
    good = Manifest(format=FORMAT_HEADS, name="x",
                    sequences=[SnapshotSequence(tokens, [page] * 6, heads=2)])
    assert Manifest.from_dict(good.to_dict()) == good
    stored = json.loads(good.canonical_bytes())
    tables = {stored["sequences"][0]["pages"]["digest"]: good.sequences[0].page_table()}
    assert Manifest.from_stored(stored, tables) == good
    stored["sequences"][0]["pages"]["count"] = 5
    with pytest.raises(InvalidManifest, match="not whole blocks of 2 heads"):
        Manifest.from_stored(stored, tables)
    del stored["sequences"][0]["heads"]
    with pytest.raises(InvalidManifest, match="a stored sequence is"):
        Manifest.from_stored(stored, tables)


def test_fsck_counts_a_head_page_sequence_in_blocks(tmp_path):
    with Store(tmp_path / "s") as store:
        seq = _head_sequence(store, list(range(40)))
        seq.pages = seq.pages[:8]  # two blocks' heads for three blocks of tokens
        store.write_snapshot(Manifest(format=FORMAT_HEADS, name="tp", fingerprint=FINGERPRINT,
                                      sequences=[seq]), ref="tp")
        issues = [i for i in store.fsck() if i.kind == "bad-block-count"]
        assert len(issues) == 1
        assert "need 3 blocks of 16, found 2 (8 page pairs of 4 heads)" in issues[0].message
