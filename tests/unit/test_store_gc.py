"""gc (roots, grace period, reflog expiry, pins, dry run) and fsck on real stores."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processfork.store import Manifest, SnapshotSequence, Store
from store_helpers import all_snapshot_objects, assert_intact, make_snapshot

HOUR = 3600.0


@contextlib.contextmanager
def raw_env(path) -> Iterator[tuple[lmdb.Environment, dict]]:
    """The store's LMDB environment opened directly (the Store must be closed)."""
    env = lmdb.open(str(path), max_dbs=16)
    names = ("pages", "blobs", "snapshots", "refs", "reflog", "meta", "pins", "journal")
    dbs = {n: env.open_db(n.encode(), create=False) for n in names}
    try:
        yield env, dbs
    finally:
        env.close()


def backdate(path, seconds: float, kinds: bytes = b"pbs") -> None:
    """Make every journal record (and reflog entry, pin) `seconds` older, as if written back then."""
    with raw_env(path) as (env, dbs), env.begin(write=True) as txn:
        for key, value in list(txn.cursor(db=dbs["journal"])):
            if key[:1] in kinds:
                t = struct.unpack("<Q", value)[0] - int(seconds * 1e6)
                txn.put(key, struct.pack("<Q", t), db=dbs["journal"])
        for key, value in list(txn.cursor(db=dbs["reflog"])):
            d = json.loads(value)
            d["time"] -= seconds
            txn.put(key, json.dumps(d).encode(), db=dbs["reflog"])
        for key, value in list(txn.cursor(db=dbs["pins"])):
            created, updated = struct.unpack_from("<QQ", value)
            delta = int(seconds * 1e6)
            txn.put(
                key,
                struct.pack("<QQ", created - delta, updated - delta) + value[16:],
                db=dbs["pins"],
            )


def counts(store: Store) -> tuple[int, int, int]:
    s = store.status()
    return s.num_snapshots, s.num_pages, s.num_blobs


# -- the property: gc never loses anything reachable ------------------------------------------
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), expire_all=st.booleans())
def test_gc_keeps_exactly_what_is_reachable(data, expire_all):
    with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
        pool = [os.urandom(64) for _ in range(12)]  # pages shared between snapshots
        cids: list[str] = []
        ever_named: set[str] = set()  # every cid a ref or HEAD ever held (reflog roots)
        refs: dict[str, str] = {}
        pinned: set[bytes] = set()
        for step in range(data.draw(st.integers(1, 14), label="steps")):
            op = data.draw(
                st.sampled_from(["snap", "snap", "ref", "unref", "head", "pin", "orphan"])
            )
            if op == "snap" or not cids:
                parents = (
                    data.draw(st.lists(st.sampled_from(cids), max_size=2, unique=True))
                    if cids
                    else []
                )
                picks = data.draw(st.lists(st.sampled_from(pool), min_size=2, max_size=2))
                cids.append(
                    make_snapshot(store, f"s{step}", parents=parents, tokens=range(10), pages=picks)
                )
            elif op == "ref":
                name, cid = (
                    data.draw(st.sampled_from(["a", "b", "c/d"])),
                    data.draw(st.sampled_from(cids)),
                )
                store.set_ref(name, cid)
                refs[name] = cid
                ever_named.add(cid)
            elif op == "unref" and refs:
                name = data.draw(st.sampled_from(sorted(refs)))
                store.delete_ref(name)
                del refs[name]
            elif op == "head":
                ever_named.add(store.checkout_head(data.draw(st.sampled_from(cids))).cid)
            elif op == "pin":
                pages = store.put_pages([os.urandom(64)], pin="w").digests
                pinned.update(pages)
            elif op == "orphan":
                store.put_pages([os.urandom(64)])
        head = store.head().cid
        roots = (
            set(refs.values()) | ({head} if head else set()) | (set() if expire_all else ever_named)
        )
        keep: set[str] = set()
        todo = list(roots)
        while todo:
            c = todo.pop()
            if c not in keep:
                keep.add(c)
                todo.extend(store.get_snapshot(c).parents)
        keep_pages, keep_blobs = set(pinned), set()
        for c in keep:
            pages, blobs = all_snapshot_objects(store, c)
            keep_pages |= pages
            keep_blobs |= blobs

        stats = store.gc(prune="now", expire="now" if expire_all else "never")

        assert {c for c, _ in store.iter_snapshots()} == keep
        for c in keep:
            assert_intact(store, c)
        assert all(store.has_pages(sorted(keep_pages)))
        assert counts(store) == (len(keep), len(keep_pages), len(keep_blobs))
        assert stats.removed_snapshots == len(cids) - len(keep)
        assert list(store.fsck()) == []


def test_grace_period_protects_young_objects_and_what_young_snapshots_name(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        kept = make_snapshot(store, "kept", ref="main")
        loose = make_snapshot(store, "loose")  # no ref, no HEAD: unreachable but young
        store.put_pages([b"orphan" * 10])
        stats = store.gc(prune="10m")
        assert stats.removed_snapshots == stats.removed_pages == 0
        # Only the orphan page is "kept young": a young snapshot is a root, so its pages are reachable.
        assert stats.kept_young == 1 and stats.reachable_snapshots == 2
        assert store.has_snapshot(loose)
        assert_intact(store, loose)
    backdate(path, 2 * HOUR)
    with Store(path) as store:
        fresh_orphan = store.put_pages([b"fresh" * 10]).digests[0]
        stats = store.gc(prune="1h")
        assert stats.removed_snapshots == 1 and stats.removed_pages == 7  # loose's 6 pages + orphan
        assert stats.kept_young == 1 and store.has_pages([fresh_orphan]) == [True]
        assert not store.has_snapshot(loose)
        assert_intact(store, kept)
        assert list(store.fsck()) == []


def test_reusing_an_old_orphan_page_refreshes_its_grace(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        page = store.put_pages([b"reused" * 20]).digests[0]
    backdate(path, 2 * HOUR)
    with Store(path) as store:
        again = store.put_pages([b"reused" * 20])
        assert again.new == [False]  # not copied again ...
        assert store.gc(prune="1h").removed_pages == 0  # ... but its write time is now
        assert store.has_pages([page]) == [True]


def test_reflog_entries_are_roots_until_they_expire(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        old = make_snapshot(store, "old", ref="main")
        new = make_snapshot(store, "new", ref="main")
        assert store.gc(prune="now").removed_snapshots == 0  # `old` is in main's reflog
        assert store.gc(prune="now", expire="1h").expired_reflog == 0
    backdate(path, 2 * HOUR)
    with Store(path) as store:
        stats = store.gc(prune="now", expire="1h")
        assert stats.expired_reflog == 2  # main's two entries
        assert not store.has_snapshot(old) and store.has_snapshot(new)
        assert store.reflog("main") == []
        assert list(store.fsck()) == []


def test_dry_run_reports_what_the_real_run_removes(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        base = make_snapshot(store, "base", ref="main")
        for i in range(4):
            make_snapshot(store, f"gone{i}", parents=[base])
        store.put_pages([os.urandom(100) for _ in range(5)])
        store.put_pages([os.urandom(100)], pin="stale-writer")
        make_snapshot(store, "moved", ref="tmp")
        store.delete_ref("tmp")
    backdate(path, 2 * 86400)
    with Store(path) as store:
        dry = store.gc(dry_run=True, prune="now", expire="1d")
        assert counts(store) == (6, 42, 7)  # nothing removed by the dry run
        real = store.gc(prune="now", expire="1d")
        fields = ["removed_snapshots", "removed_pages", "removed_blobs", "removed_page_bytes",
                  "removed_bytes", "expired_reflog", "removed_pins", "kept_young",
                  "reachable_snapshots", "reachable_pages", "reachable_blobs"]  # fmt: skip
        assert [getattr(dry, f) for f in fields] == [getattr(real, f) for f in fields]
        assert dry.dry_run and not real.dry_run
        # 5 snapshots of 3 blocks (6 pages of 256 bytes, one page table each); tokens are shared
        assert (real.removed_snapshots, real.removed_pages, real.removed_blobs) == (5, 36, 5)
        assert real.removed_pins == 1 and real.expired_reflog == 3
        assert real.removed_page_bytes == 5 * 6 * 256 + 5 * 100 + 100
        again = store.gc(dry_run=True, prune="now", expire="1d")
        assert again.removed_snapshots == again.removed_pages == again.removed_blobs == 0
        assert_intact(store, base)


def test_fresh_pins_are_roots_and_stale_pins_are_dropped(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        stale = store.put_pages([b"stale" * 10], pin="crashed-writer").digests[0]
    backdate(path, 25 * HOUR)
    with Store(path) as store:
        live = store.put_pages([b"live" * 10], pin="live-writer").digests[0]
        token = store.put_blob(b"tokens", pin="live-writer")
        stats = store.gc(prune="now")
        assert stats.removed_pins == 1 and stats.removed_pages == 1
        assert store.has_pages([live, stale]) == [True, False]
        assert store.has_blob(token)
        assert set(store.list_pins()) == {"live-writer"}


def test_progress_is_reported(tmp_path):
    seen = []
    with Store(tmp_path / "s") as store:
        make_snapshot(store, "a", ref="a")
        store.gc(progress=lambda phase, done, total: seen.append((phase, done, total)))
        list(store.fsck(progress=lambda phase, done, total: seen.append((phase, done, total))))
    assert {p for p, _, _ in seen} >= {"mark", "sweep", "pages", "blobs"}


# -- fsck ----------------------------------------------------------------------------------------
def test_fsck_finds_corrupt_and_missing_pages_and_broken_refs(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        cid = make_snapshot(store, "a", ref="main", move_head=True)
        keys = sorted(store.get_snapshot(cid).page_keys())
        assert list(store.fsck()) == []
    with raw_env(path) as (env, dbs), env.begin(write=True) as txn:
        txn.put(keys[0], b"not the page", db=dbs["pages"])
        txn.delete(keys[1], db=dbs["pages"])
        txn.put(b"ghost", b"sha256:" + b"1" * 64, db=dbs["refs"])
        txn.put(b"p" + b"\0" * 3, b"junk", db=dbs["journal"])
    with Store(path) as store:
        issues = list(store.fsck())
    found = {(i.kind, i.object) for i in issues}
    assert ("corrupt-page", keys[0].hex()) in found
    assert ("missing-page", keys[1].hex()) in found
    assert ("dangling-ref", "ghost") in found
    assert any(kind == "bad-journal" for kind, _ in found)
    assert all("\n" not in i.message for i in issues)


def test_fsck_finds_tampered_manifests_and_missing_tables(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        cid = make_snapshot(store, "a", ref="main")
        m = store.get_snapshot(cid)
    key = bytes.fromhex(cid.removeprefix("sha256:"))
    table = bytes.fromhex(next(iter(m.page_tables())))
    with raw_env(path) as (env, dbs), env.begin(write=True) as txn:
        raw = json.loads(txn.get(key, db=dbs["snapshots"]))
        raw["name"] = "tampered"
        txn.put(key, json.dumps(raw).encode(), db=dbs["snapshots"])
        txn.delete(table, db=dbs["blobs"])
    with Store(path) as store:
        kinds = {i.kind for i in store.fsck()}
    assert {"cid-mismatch", "non-canonical", "missing-blob"} <= kinds


def test_fsck_checks_block_count_against_block_size(tmp_path):
    with Store(tmp_path / "s") as store:
        pages = store.put_pages([b"k" * 8, b"v" * 8]).digests
        tokens = store.put_tokens(list(range(40)))  # 40 tokens need 3 blocks of 16, not 1
        seq = SnapshotSequence(tokens, [(pages[0].hex(), pages[1].hex())])
        store.write_snapshot(Manifest(name="x", fingerprint={"block_size": 16}, sequences=[seq]))
        assert [i.kind for i in store.fsck()] == ["bad-block-count"]


def test_session_refs_idle_longer_than_the_ttl_are_deleted_then_collected(tmp_path):
    from store_helpers import make_snapshot

    with Store(tmp_path / "ttl") as store:
        idle = make_snapshot(store, "sessions/a", ref="sessions/a")
        make_snapshot(store, "sessions/b", ref="sessions/b", move_head=True)  # HEAD follows it
        make_snapshot(store, "main", ref="main")
        assert store.gc(session_ttl="1h").expired_sessions == 0
        assert store.gc(session_ttl="now", dry_run=True).expired_sessions == 1
        assert store.get_ref("sessions/a") == idle
        assert store.gc(session_ttl="now", prune="now").expired_sessions == 1
        assert store.get_ref("sessions/a") is None
        assert store.get_ref("sessions/b") is not None and store.get_ref("main") is not None
        last = store.reflog("sessions/a")[-1]
        assert (last.action, last.new, last.message) == ("delete", None, "session expired")
        assert store.has_snapshot(idle)  # its reflog entries still protect it
        store.gc(prune="now", expire="now")
        assert not store.has_snapshot(idle)


def test_session_ttl_expires_the_refs_under_the_prefixes_servers_recorded(tmp_path):
    from store_helpers import make_snapshot

    with Store(tmp_path / "prefixes") as store:
        assert store.session_prefixes() == ["sessions/"]  # nothing recorded: the default
        for ref in ("sessions/a", "agents/a", "main"):
            make_snapshot(store, ref, ref=ref)
        store.record_session_prefix("agents/")  # a server with session_prefix "agents/"
        store.record_session_prefix("agents/")
        assert store.session_prefixes() == ["agents/"]
        assert store.gc(session_ttl="now", prune="now").expired_sessions == 1
        assert store.get_ref("agents/a") is None
        assert store.get_ref("sessions/a") is not None and store.get_ref("main") is not None
        # An explicit prefix overrides the record.
        assert store.gc(session_ttl="now", session_prefixes=["sessions/"]).expired_sessions == 1
        assert store.get_ref("sessions/a") is None and store.get_ref("main") is not None
        with pytest.raises(ValueError):
            store.record_session_prefix("")
