"""Grouped manifests (several KV-cache groups per sequence): stored form, checks, the format
record's upgrade, and that gc, fsck and forks follow them like any manifest."""

from __future__ import annotations

import json

import pytest
from processfork.plugin.fingerprint import Fingerprint, describe_groups
from processfork.plugin.kv_groups import FULL_ATTENTION, SLIDING_WINDOW, GroupLayout, GroupSpec
from processfork.store import InvalidManifest, Manifest, SnapshotSequence, Store
from processfork.store.manifest import FORMAT, FORMAT_GROUPED, FORMAT_STATE, PageGroup
from store_helpers import BLOCK, make_snapshot, random_pages

FINGERPRINT = {"block_size": BLOCK, "model": "sw", "kv_groups": [
    {"kind": "sliding_window", "layers": [0, 2], "window": 20},
    {"kind": "full_attention", "layers": [1, 3]},
]}


def _grouped_sequence(store: Store, tokens: list[int]) -> SnapshotSequence:
    """Tokens whose full-attention group stores every block and whose sliding-window group
    stores the blocks from its window on, as the layout says."""
    layout = GroupLayout.from_fingerprint(FINGERPRINT["kv_groups"])
    ranges = layout.stored_ranges(len(tokens), BLOCK)
    count = sum(end - first for first, end in ranges)
    digests = [d.hex() for d in store.put_pages(random_pages(2 * count)).digests]
    pages = [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)]
    ref = store.put_tokens(tokens)
    return SnapshotSequence(ref, pages, [PageGroup(f, e - f) for f, e in ranges])


def _format_version(store: Store) -> int:
    return store.meta_get("format")["version"]


def test_stored_ranges_keep_the_window_of_the_checkout_split():
    layout = GroupLayout((GroupSpec(SLIDING_WINDOW, (0,), 64), GroupSpec(FULL_ATTENTION, (1,))))
    # 300 tokens, blocks of 32: a checkout resumes after block 8 (288 tokens); the window of
    # the next token covers tokens 225.. (blocks 7 and 8), and the partial block 9 is stored.
    assert layout.stored_ranges(300, 32) == [(7, 10), (0, 10)]
    # Shorter than the window: every block.
    assert layout.stored_ranges(40, 32) == [(0, 2), (0, 2)]
    # Block-aligned: the checkout split is one block earlier.
    assert layout.stored_ranges(320, 32) == [(7, 10), (0, 10)]
    assert layout.to_fingerprint() == [
        {"kind": "sliding_window", "layers": [0], "window": 64},
        {"kind": "full_attention", "layers": [1]},
    ]
    assert GroupLayout((GroupSpec(FULL_ATTENTION, (0, 1)),)).to_fingerprint() is None


def test_a_plain_fingerprint_is_what_it_was_and_a_layout_change_is_named():
    base = {"backend": "CPU_ATTN", "batch_invariant": False, "block_size": 32, "device": "cpu",
            "head_dim": 64, "isa": "vec", "kv_dtype": "float32", "layout": "cpu_attn",
            "model": "m", "model_config_hash": "abc", "num_kv_heads": 2, "num_layers": 2,
            "threads": 1, "tp_size": 1, "vllm_version": "0.32.0"}
    plain = Fingerprint(**base)
    assert "kv_groups" not in plain.to_json()
    assert Fingerprint.from_json(plain.to_json()) == plain
    grouped = Fingerprint(**base, kv_groups=FINGERPRINT["kv_groups"])
    assert Fingerprint.from_json(grouped.to_json()) == grouped
    mismatch = plain.first_mismatch(grouped.to_json())
    assert mismatch is not None and mismatch.field == "kv_groups"
    assert mismatch.stored == "sliding_window(20) layers [0, 2] + full_attention layers [1, 3]"
    assert mismatch.engine == describe_groups(None) == "one full_attention group"
    assert grouped.first_mismatch(grouped.to_json()) is None


def test_grouped_snapshot_round_trips_and_upgrades_the_format_record(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        plain = make_snapshot(store, "plain", ref="plain")
        assert _format_version(store) == 1  # single-group snapshots leave version 1 readable
        seq = _grouped_sequence(store, list(range(70)))
        m = Manifest(format=FORMAT_GROUPED, name="sw", fingerprint=FINGERPRINT, sequences=[seq])
        cid = store.write_snapshot(m, ref="sw")
        assert _format_version(store) == 2
        back = store.get_snapshot(cid)
        assert back == m and back.format == FORMAT_GROUPED
        stored = json.loads(m.canonical_bytes())
        # 70 tokens in blocks of 16: a checkout resumes after 64; the window of 20 then starts
        # at token 45, in block 2.
        assert stored["sequences"][0]["groups"] == [{"count": 3, "first": 2},
                                                    {"count": 5, "first": 0}]
        assert back.sequences[0].group_pages(0) == (2, seq.pages[:3])
        assert back.sequences[0].group_pages(1) == (0, seq.pages[3:])
        assert store.get_snapshot(plain).format == FORMAT
        assert list(store.fsck()) == []
        children = store.fork_named("sw", 2)
        assert all(store.get_snapshot(c).sequences == back.sequences for _, c in children)
        store.delete_ref("plain")
        store.gc(prune="now")
        assert store.get_snapshot(cid) == m
        assert list(store.fsck()) == []
    with Store(path) as store:  # a version-2 store opens again
        assert store.get_snapshot(cid) == m


def test_grouped_manifests_are_checked():
    page = ("aa" * 16, "bb" * 16)
    seq = SnapshotSequence(_token_ref(), [page] * 3, [PageGroup(0, 2), PageGroup(0, 2)])
    with pytest.raises(InvalidManifest, match="groups count 4"):
        Manifest(format=FORMAT_GROUPED, name="x", sequences=[seq]).validate()
    ungrouped = SnapshotSequence(_token_ref(), [page])
    with pytest.raises(InvalidManifest, match="must have groups"):
        Manifest(format=FORMAT_GROUPED, name="x", sequences=[ungrouped]).validate()
    grouped = SnapshotSequence(_token_ref(), [page], [PageGroup(0, 1)])
    with pytest.raises(InvalidManifest, match="must not have groups"):
        Manifest(format=FORMAT, name="x", sequences=[grouped]).validate()
    d = Manifest(format=FORMAT_GROUPED, name="x", sequences=[grouped]).to_dict()
    assert Manifest.from_dict(d).sequences[0].groups == [PageGroup(0, 1)]
    d["sequences"][0]["groups"] = [{"first": 0}]
    with pytest.raises(InvalidManifest):
        Manifest.from_dict(d)


def test_fsck_names_a_group_that_does_not_end_with_the_sequence(tmp_path):
    with Store(tmp_path / "s") as store:
        seq = _grouped_sequence(store, list(range(70)))
        seq.groups = [PageGroup(1, 3), PageGroup(0, 5)]  # the window group ends a block early
        m = Manifest(format=FORMAT_GROUPED, name="sw", fingerprint=FINGERPRINT, sequences=[seq])
        store.write_snapshot(m, ref="sw")
        issues = [i for i in store.fsck() if i.kind == "bad-block-count"]
        assert len(issues) == 1 and "groups end at [4, 5]" in issues[0].message


STATE_FINGERPRINT = {"block_size": BLOCK, "model": "hy", "kv_groups": [
    {"kind": "mamba", "layers": [0, 2], "state": [{"dtype": "float32", "shape": [3, 8]}]},
    {"kind": "full_attention", "layers": [1, 3]},
]}


def _state_sequence(store: Store, tokens: list[int]) -> SnapshotSequence:
    layout = GroupLayout.from_fingerprint(STATE_FINGERPRINT["kv_groups"])
    ranges = layout.stored_ranges(len(tokens), BLOCK)
    count = sum(end - first for first, end in ranges)
    digests = [d.hex() for d in store.put_pages(random_pages(2 * count)).digests]
    pages = [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)]
    groups = [PageGroup(f, e - f, g.is_state) for (f, e), g in zip(ranges, layout.groups)]
    return SnapshotSequence(store.put_tokens(tokens), pages, groups)


def test_a_state_snapshot_stores_one_state_and_raises_the_format_to_3(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        seq = _grouped_sequence(store, list(range(70)))
        store.write_snapshot(Manifest(format=FORMAT_GROUPED, name="sw", fingerprint=FINGERPRINT,
                                      sequences=[seq]), ref="sw")
        assert _format_version(store) == 2
        # 70 tokens in blocks of 16: the split is 64, the state after it is block 3.
        long = _state_sequence(store, list(range(70)))
        short = _state_sequence(store, list(range(10)))  # within one block: no state
        m = Manifest(format=FORMAT_STATE, name="hy", fingerprint=STATE_FINGERPRINT,
                     sequences=[long, short])
        cid = store.write_snapshot(m, ref="hy")
        assert _format_version(store) == 3
        stored = json.loads(m.canonical_bytes())["sequences"]
        assert stored[0]["groups"] == [{"count": 1, "first": 3, "state": True},
                                       {"count": 5, "first": 0}]
        assert stored[1]["groups"] == [{"count": 0, "first": 0, "state": True},
                                       {"count": 1, "first": 0}]
        assert store.get_snapshot(cid) == m
        assert store.get_snapshot(cid).sequences[0].group_pages(0) == (3, long.pages[:1])
        assert list(store.fsck()) == []
    with Store(path) as store:  # a version-3 store opens again, its older manifests too
        assert store.get_snapshot(cid) == m
        assert store.get_snapshot(store.get_ref("sw")).format == FORMAT_GROUPED


def test_state_groups_are_checked(tmp_path):
    page = ("aa" * 16, "bb" * 16)
    seq = SnapshotSequence(_token_ref(), [page] * 2, [PageGroup(3, 1, True), PageGroup(0, 1)])
    with pytest.raises(InvalidManifest, match="state groups belong in"):
        Manifest(format=FORMAT_GROUPED, name="x", sequences=[seq]).validate()
    Manifest(format=FORMAT_STATE, name="x", sequences=[seq]).validate()
    d = Manifest(format=FORMAT_STATE, name="x", sequences=[seq]).to_dict()
    d["sequences"][0]["groups"][0] = {"count": 2, "first": 3, "state": True}
    with pytest.raises(InvalidManifest, match="at most one block"):
        Manifest.from_dict(d)
    d["sequences"][0]["groups"][0] = {"count": 1, "first": 3, "state": False}
    with pytest.raises(InvalidManifest, match="true or absent"):
        Manifest.from_dict(d)
    with Store(tmp_path / "s") as store:
        wrong = _state_sequence(store, list(range(70)))
        wrong.groups = [PageGroup(2, 1, True), wrong.groups[1]]  # the state of another split
        store.write_snapshot(Manifest(format=FORMAT_STATE, name="hy",
                                      fingerprint=STATE_FINGERPRINT, sequences=[wrong]), ref="hy")
        issues = [i for i in store.fsck() if i.kind == "bad-block-count"]
        assert len(issues) == 1 and "groups end at [3, 5]" in issues[0].message


def _token_ref():
    from processfork.store import TokenRef

    return TokenRef("cc" * 16, 70)
