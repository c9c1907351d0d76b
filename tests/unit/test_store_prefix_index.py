"""The prefix index: longest stored whole-block prefix of a token list, by partition."""

from __future__ import annotations

import lmdb
from processfork.store import Store
from processfork.store.prefix_index import (
    INDEX_DB,
    INDEX_META_KEY,
    entries_of,
    partition_root,
)
from store_helpers import BLOCK, make_snapshot

FP = {"block_size": BLOCK, "model": "test"}
ROOT = partition_root(FP)


def seq(n: int, seed: int = 0) -> list[int]:
    return [5 + (seed * 7919 + i * 31) % 997 for i in range(n)]


def lookup(store: Store, tokens: list[int], *, first: int = 0, root: bytes = ROOT):
    return store.longest_prefix(root, tokens, BLOCK, first=first, limit=len(tokens) // BLOCK)


def entries(store: Store, cid: str) -> int:
    return len(store._read(lambda txn: entries_of(txn, store.dbs, cid)))


def test_finds_the_longest_stored_prefix_and_its_snapshot(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(100)
        cid = make_snapshot(store, "a", tokens=base)
        hit = lookup(store, base[:80] + seq(40, seed=3))
        assert (hit.cid, hit.seq, hit.blocks) == (cid, 0, 5)
        # The partial last block (100 = 6 * 16 + 4) is never a prefix hit: only whole blocks.
        assert lookup(store, base + seq(30, seed=4)).blocks == 6
        assert lookup(store, seq(64, seed=9)) is None
        # A request that differs in its first block shares nothing, even if later blocks match.
        assert lookup(store, [base[0] + 1] + base[1:]) is None


def test_lookup_starts_where_the_prefix_cache_ends(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(96)
        make_snapshot(store, "a", tokens=base)
        assert lookup(store, base, first=4).blocks == 6
        assert lookup(store, base[:64] + seq(32, seed=2), first=4) is None


def test_partitions_never_mix(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(64)
        make_snapshot(store, "a", tokens=base)
        assert lookup(store, base, root=partition_root(FP, "tenant-1")) is None
        assert lookup(store, base, root=partition_root({**FP, "model": "other"})) is None


def test_a_salted_snapshot_is_found_only_under_its_salt(tmp_path):
    from processfork.store import Manifest
    from store_helpers import add_sequence

    with Store(tmp_path / "s") as store:
        base = seq(64)
        m = Manifest(name="s", parents=[], fingerprint=FP, sequences=[add_sequence(store, base)])
        cid = store.write_snapshot(m, cache_salt="tenant-1")
        assert lookup(store, base) is None
        assert lookup(store, base, root=partition_root(FP, "tenant-1")).cid == cid


def test_a_child_indexes_only_the_blocks_its_parent_lacks(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(64)
        parent = make_snapshot(store, "a", tokens=base)
        longer = base + seq(40, seed=5)  # 6 whole blocks, 4 of them the parent's
        child = make_snapshot(store, "b", tokens=longer, parents=[parent])
        assert (entries(store, parent), entries(store, child)) == (4, 2)
        hit = lookup(store, longer)
        assert (hit.cid, hit.blocks) == (child, 6)
        assert lookup(store, base).cid == parent
        # Turns chained by parent stay linear in size: the third writes only its own blocks.
        third = make_snapshot(store, "c", tokens=longer[:96] + seq(32, seed=6), parents=[child])
        assert entries(store, third) == 2


def test_a_fork_writes_no_entries_and_its_blocks_stay_found(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(64)
        parent = make_snapshot(store, "a", tokens=base, ref="a")
        children = store.fork("a", 3)
        assert all(entries(store, c) == 0 for c in children)
        store.delete_ref("a")
        store.gc(prune="now", expire="now")
        assert lookup(store, base).cid == parent  # kept: the children's parent


def test_gc_deletes_the_entries_of_the_snapshots_it_removes(tmp_path):
    with Store(tmp_path / "s") as store:
        shared = seq(32)
        keep = make_snapshot(store, "keep", tokens=shared + seq(32, seed=1), ref="keep")
        drop = make_snapshot(store, "drop", tokens=shared + seq(32, seed=2), ref="drop")
        store.delete_ref("drop")
        store.gc(prune="now", expire="now")
        assert not store.has_snapshot(drop)
        assert entries(store, drop) == 0
        assert lookup(store, shared + seq(32, seed=2)).cid == keep  # the shared blocks
        assert lookup(store, shared + seq(32, seed=2)).blocks == 2


def test_an_entry_whose_snapshot_is_gone_is_never_served(tmp_path):
    """A writer that does not keep the index (an older version) may delete a snapshot and leave
    its entries."""
    with Store(tmp_path / "s") as store:
        base = seq(64)
        cid = make_snapshot(store, "a", tokens=base)
        key = bytes.fromhex(cid.removeprefix("sha256:"))
        store.env.write(lambda txn: txn.delete(key, db=store.dbs["snapshots"]))
        assert lookup(store, base) is None


def test_gc_deletes_the_entries_a_deleted_snapshot_left(tmp_path):
    """Entries of a snapshot that went without them (a gc on a full disk, or a writer that does
    not know the index) go with the next gc."""
    with Store(tmp_path / "s") as store:
        cid = make_snapshot(store, "a", tokens=seq(64))
        key = bytes.fromhex(cid.removeprefix("sha256:"))
        store.env.write(lambda txn: txn.delete(key, db=store.dbs["snapshots"]))
        assert entries(store, cid) == 4
        assert [i for i in store.fsck() if i.kind == "dangling-index"]
        store.gc(prune="now", expire="now")
        assert entries(store, cid) == 0
        assert not [i for i in store.fsck() if "index" in i.kind]


def test_an_older_store_gets_its_index_built_on_first_open(tmp_path):
    path = tmp_path / "s"
    with Store(path) as store:
        base = seq(80)
        parent = make_snapshot(store, "a", tokens=base[:48])
        child = make_snapshot(store, "b", tokens=base, parents=[parent])
    # Take the store back to before the index: no prefix database, no build record.
    env = lmdb.open(str(path), max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(INDEX_DB.encode(), txn=txn), delete=True)
        txn.delete(INDEX_META_KEY, db=env.open_db(b"meta", txn=txn))
    env.close()
    with Store(path) as store:
        assert lookup(store, base[:48]).cid == parent
        assert lookup(store, base).cid == child
        assert (entries(store, parent), entries(store, child)) == (3, 2)
        assert store.meta_get(INDEX_META_KEY.decode())["entries"] == 5


def test_a_continued_fork_child_indexes_only_its_own_blocks(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(64)
        make_snapshot(store, "a", tokens=base, ref="a")
        child = store.fork("a", 2)[0]
        grandchild = make_snapshot(store, "c", tokens=base + seq(32, seed=8), parents=[child])
        assert entries(store, grandchild) == 2


def test_fsck_checks_the_index(tmp_path):
    with Store(tmp_path / "s") as store:
        base = seq(64)
        cid = make_snapshot(store, "a", tokens=base, ref="a")
        store.fork("a", 2)
        make_snapshot(store, "b", tokens=base + seq(32, seed=1), parents=[cid])
        assert list(store.fsck()) == []
        chain = store._read(lambda txn: entries_of(txn, store.dbs, cid))[0]
        key = bytes.fromhex(cid.removeprefix("sha256:"))
        # An entry its snapshot does not list, and a lost one.
        store.env.write(lambda txn: txn.put(b"h" + b"\1" * 16 + key, b"\0" * 8,
                                            db=store.dbs[INDEX_DB]))
        store.env.write(lambda txn: txn.delete(b"h" + chain + key, db=store.dbs[INDEX_DB]))
        kinds = sorted((i.kind, i.message.split(" ")[0]) for i in store.fsck())
        assert kinds == [("bad-index", "block"), ("bad-index", "entry")]
