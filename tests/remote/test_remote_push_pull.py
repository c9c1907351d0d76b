"""Push, clone, fetch and pull against a real S3 endpoint (SeaweedFS): only missing objects
move, everything read is verified, refs move only forward unless forced."""

from __future__ import annotations

from pathlib import Path

import pytest
from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.remote import NonFastForward, layout, open_remote
from processfork.store.remote.fetch import fetch, tracking_ref, update_refs
from processfork.store.remote.pack import PackIndex, pack_name, verify
from processfork.store.remote.porcelain import fetch_revision
from processfork.store.remote.push import push
from remote_helpers import content, make_snapshot


def _push(store: Store, url: str, refs: dict[str, str], **kw: object):
    return push(store.env, open_remote(url, env=store.env), refs, **kw)


def _clone(url: str, path: Path) -> Store:
    store = Store(path)
    result = fetch(store.env, open_remote(url, env=store.env), remote_name="origin")
    update_refs(store.env, result.refs, message="clone")
    return store


def test_push_then_clone_gives_the_same_snapshots(tmp_path: Path, remote_url: str) -> None:
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "base", tokens=range(100))
        child = make_snapshot(a, "main", parents=[base], tokens=range(130))
        result = _push(a, remote_url, {"base": base, "main": child})
        assert [r.status for r in result.refs] == ["created", "created"]
        assert result.snapshots == 2 and result.pages == 2 * (7 + 9)
        with _clone(remote_url, tmp_path / "b") as b:
            assert b.list_refs()["base"] == base and b.list_refs()["main"] == child
            assert b.list_refs()[tracking_ref("origin", "main")] == child
            assert content(b, child) == content(a, child)
            assert content(b, base) == content(a, base)
            assert list(b.fsck()) == []


def test_a_pack_is_named_by_its_object_list_and_holds_what_that_list_says(
    tmp_path: Path, remote_url: str
) -> None:
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "base", tokens=range(100))
        child = make_snapshot(a, "main", parents=[base], tokens=range(130))
        _push(a, remote_url, {"base": base, "main": child}, pack_size=64 * 1024)
        objects = open_remote(remote_url, env=a.env).store
        names = [n for n in (layout.pack_name_of(o.key) for o in objects.list("packs")) if n]
        assert len(names) > 1  # small packs: the objects span several
        listed = set()
        for name in names:
            index = PackIndex.decode(name, objects.get(layout.idx_path(name)).data)
            assert name == pack_name(index.entries, index.size)
            body = objects.get(layout.pack_path(name)).data
            assert len(body) == index.size
            for e in index.entries:
                assert verify(e.kind, e.key, body[e.offset : e.end]) is None
                listed.add((e.kind, e.key))
        assert sum(k == "s" for k, _ in listed) == 2


def test_second_push_sends_nothing_and_fork_sends_metadata_only(
    tmp_path: Path, remote_url: str
) -> None:
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "base", tokens=range(200))
        first = _push(a, remote_url, {"base": base})
        again = _push(a, remote_url, {"base": base})
        assert again.refs[0].status == "up-to-date" and again.objects == 0
        children = a.fork("base", 12)
        forked = _push(a, remote_url, {f"base/{i}": c for i, c in enumerate(children)})
        assert forked.pages == 0 and forked.blobs == 0 and forked.snapshots == 12
        assert forked.packs == 1
        assert forked.bytes <= 12 * 1024 < first.bytes
        with _clone(remote_url, tmp_path / "b") as b:
            assert [b.list_refs()[f"base/{i}"] for i in range(12)] == children


def test_fetch_brings_only_what_is_missing(tmp_path: Path, remote_url: str) -> None:
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "main", tokens=range(64))
        _push(a, remote_url, {"main": base})
        with _clone(remote_url, tmp_path / "b") as b:
            child = make_snapshot(a, "main", parents=[base], tokens=range(80))
            _push(a, remote_url, {"main": child})
            got = fetch(b.env, open_remote(remote_url, env=b.env), remote_name="origin")
            # The child has fresh pages for its 5 blocks; its parent is already there.
            assert got.snapshots == 1 and got.pages == 10
            moves = update_refs(b.env, got.refs, message="pull")
            assert [m.status for m in moves] == ["fast-forward"]
            assert b.list_refs()["main"] == child
            assert content(b, child) == content(a, child)


def test_push_that_is_not_a_fast_forward_is_refused_unless_forced(
    tmp_path: Path, remote_url: str
) -> None:
    with Store(tmp_path / "a") as a, Store(tmp_path / "c") as c:
        root_a = make_snapshot(a, "main")
        _push(a, remote_url, {"main": root_a})
        root_c = make_snapshot(c, "main")
        with pytest.raises(NonFastForward, match="lacks"):
            _push(c, remote_url, {"main": root_c})
        other = make_snapshot(a, "side")
        with pytest.raises(NonFastForward, match="not a fast-forward"):
            _push(a, remote_url, {"main": other})
        forced = _push(a, remote_url, {"main": other}, force=True)
        assert forced.refs[0].status == "forced"
        assert open_remote(remote_url).read_ref("main").cid == other


def test_pull_leaves_a_diverged_ref_alone(tmp_path: Path, remote_url: str) -> None:
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "main")
        _push(a, remote_url, {"main": base})
        with _clone(remote_url, tmp_path / "b") as b:
            mine = make_snapshot(b, "main", parents=[base], tokens=range(50))
            theirs = make_snapshot(a, "main", parents=[base], tokens=range(60))
            _push(a, remote_url, {"main": theirs})
            got = fetch(b.env, open_remote(remote_url, env=b.env), remote_name="origin")
            moves = update_refs(b.env, got.refs, message="pull")
            assert [m.status for m in moves] == ["diverged"]
            assert b.list_refs()["main"] == mine
            assert b.list_refs()[tracking_ref("origin", "main")] == theirs


def test_fetch_revision_brings_one_snapshot_after_the_accept_check(
    tmp_path: Path, remote_url: str
) -> None:
    """What a server's checkout does with a snapshot its store lacks (`pf serve --remote`)."""
    with Store(tmp_path / "a") as a:
        base = make_snapshot(a, "main", tokens=range(64))
        child = make_snapshot(a, "main", parents=[base], tokens=range(96))
        side = make_snapshot(a, "side", tokens=range(32))
        _push(a, remote_url, {"main": child, "side": side})
        with Store(tmp_path / "b") as b:
            seen: list[set[str]] = []

            def refuse(manifests: dict) -> None:
                seen.append(set(manifests))
                raise ValueError("incompatible")

            with pytest.raises(ValueError, match="incompatible"):
                fetch_revision(b, remote_url, "main", accept=refuse)
            assert seen == [{base, child}]
            assert b.status().num_pages == 0 and b.list_pins() == {} and b.list_refs() == {}

            assert fetch_revision(b, remote_url, "main") == child
            assert b.list_refs() == {"main": child}
            assert content(b, child) == content(a, child)
            assert fetch_revision(b, remote_url, side) == side  # by cid: no ref made
            assert b.list_refs() == {"main": child} and content(b, side) == content(a, side)
            assert fetch_revision(b, remote_url, "nope") is None
            assert fetch_revision(b, remote_url, "sha256:" + "0" * 64) is None
            assert fetch_revision(b, remote_url, "0123456") is None  # a prefix: not looked up
            assert list(b.fsck()) == []


def test_a_session_turn_without_its_tail_page_travels_as_it_is(
    tmp_path: Path, remote_url: str
) -> None:
    """Push and clone copy the pages a manifest names: a turn's whole blocks, and no page for
    its partial last block; the clone's format record becomes version 2 with it."""
    with Store(tmp_path / "a") as a:
        tokens = list(range(5 * 16 + 7))
        whole = make_snapshot(a, "whole", tokens=tokens[: 5 * 16])
        pages = a.get_snapshot(whole).sequences[0].pages
        seq = SnapshotSequence(a.put_tokens(tokens), pages, paged_tokens=5 * 16)
        turn = a.write_snapshot(Manifest(name="sessions/a", fingerprint={"block_size": 16},
                                         sequences=[seq]), ref="sessions/a")
        result = _push(a, remote_url, {"sessions/a": turn})
        assert result.pages == 2 * 5
        with _clone(remote_url, tmp_path / "b") as b:
            assert b.meta_get("format")["version"] == 2
            assert content(b, turn) == content(a, turn)
            assert b.get_snapshot(turn).sequences[0].paged_tokens == 5 * 16
            assert list(b.fsck()) == []
