"""A snapshot fetched by cid (a server's transparent restore, a checkout of a cid) has no local
ref. Its fetch records it in the FETCH_HEAD reflog, in the transaction that commits it, so a
local gc keeps it (and its history) until that entry expires, as any reflog entry; the remote
still has it, and the next fetch brings it back."""

from __future__ import annotations

from pathlib import Path

import pytest
from processfork.store import Store
from processfork.store.errors import InvalidName
from processfork.store.remote import open_remote
from processfork.store.remote.fetch import fetch
from processfork.store.remote.porcelain import fetch_revision
from processfork.store.remote.push import push
from remote_helpers import BLOCK, content, make_snapshot, pf


def _pushed(tmp_path: Path, remote_url: str) -> tuple[str, str, dict[str, tuple]]:
    """A parent and its child pushed from store A; their contents, to compare with."""
    with Store(tmp_path / "a") as a:
        parent = make_snapshot(a, "ctx", tokens=range(3 * BLOCK))
        child = make_snapshot(a, "ctx/turn", parents=[parent], tokens=range(5 * BLOCK))
        push(a.env, open_remote(remote_url, env=a.env), {"ctx/turn": child})
        return parent, child, {c: content(a, c) for c in (parent, child)}


def test_a_snapshot_fetched_for_a_restore_survives_gc_until_its_entry_expires(
    tmp_path: Path, remote_url: str
) -> None:
    parent, child, want = _pushed(tmp_path, remote_url)
    with Store(tmp_path / "b") as b:
        fetch(b.env, open_remote(remote_url, env=b.env), cids=[child],
              reason="a transparent restore")
        assert b.list_refs() == {} and b.head().cid is None  # nothing but the entry names it

        # No grace period: only the FETCH_HEAD entry keeps the snapshot and its parent.
        kept = b.gc(prune="now")
        assert kept.removed_snapshots == kept.removed_pages == kept.removed_blobs == 0
        assert {c: content(b, c) for c in (parent, child)} == want
        assert b.resolve("FETCH_HEAD") == b.resolve("FETCH_HEAD@{0}") == child
        [entry] = b.reflog("FETCH_HEAD")
        assert (entry.old, entry.new, entry.action) == (None, child, "fetch")
        assert entry.message == f"from {remote_url} for a transparent restore"
        assert list(b.fsck()) == []

        # The entry expires like any reflog entry; then gc drops what only it kept.
        dropped = b.gc(prune="now", expire="now")
        assert dropped.removed_snapshots == 2 and dropped.expired_reflog == 1
        assert not b.has_snapshot(child) and not b.has_snapshot(parent)
        assert b.reflog("FETCH_HEAD") == [] and list(b.fsck()) == []

        # The remote still has it: the next restore fetches it again, and records it again.
        again = fetch(b.env, open_remote(remote_url, env=b.env), cids=[child])
        assert again.snapshots == 2 and b.resolve("FETCH_HEAD") == child
        assert content(b, child) == want[child]


def test_a_checkout_from_the_remote_records_what_it_fetched(tmp_path: Path, remote_url: str) -> None:
    parent, child, _ = _pushed(tmp_path, remote_url)
    with Store(tmp_path / "b") as b:
        assert fetch_revision(b, remote_url, parent) == parent  # by cid: no ref
        assert fetch_revision(b, remote_url, "ctx/turn") == child  # by ref: the ref, too
        assert b.list_refs() == {"ctx/turn": child}
        log = b.reflog("FETCH_HEAD")
        assert [(e.new, e.message) for e in log] == [
            (parent, f"from {remote_url} for a checkout"),
            (child, f"from {remote_url} for a checkout of ctx/turn"),
        ]
        # A snapshot the store holds already is not fetched, and not recorded again.
        assert fetch_revision(b, remote_url, parent) == parent
        assert len(b.reflog("FETCH_HEAD")) == 2

        b.delete_ref("ctx/turn")
        assert b.gc(prune="now").removed_snapshots == 0  # the entries keep both

    shown = pf(tmp_path / "b", "reflog", "FETCH_HEAD")
    assert shown.exit_code == 0, shown.stderr
    assert f"FETCH_HEAD@{{0}}: fetch: from {remote_url} for a checkout of ctx/turn" in shown.stdout
    assert pf(tmp_path / "b", "log", "FETCH_HEAD").exit_code == 0
    refused = pf(tmp_path / "b", "ref", "set", "FETCH_HEAD", child)
    assert refused.exit_code != 0 and "FETCH_HEAD is reserved" in refused.stderr
    with Store(tmp_path / "b") as b, pytest.raises(InvalidName):
        b.set_ref("FETCH_HEAD", child)
