"""Prefix records on a real S3 endpoint (SeaweedFS): a push writes one per snapshot it sends, a
fetch files what it brings under the partition the record names (salted or not), and a
server-side catalog of them answers prefix lookups in memory, without a request per lookup."""

from __future__ import annotations

import os
from pathlib import Path

from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.prefix_index import partition_root
from processfork.store.remote import layout, open_remote
from processfork.store.remote.fetch import fetch
from processfork.store.remote.gc import gc_remote
from processfork.store.remote.prefix import PrefixCatalog, PrefixRecord
from processfork.store.remote.push import push
from remote_helpers import BLOCK, make_snapshot

FINGERPRINT = {"block_size": BLOCK, "model": "t"}


def _salted_snapshot(store: Store, ref: str, tokens: list[int], salt: str) -> str:
    blocks = -(-len(tokens) // BLOCK)
    digests = [d.hex() for d in store.put_pages([os.urandom(512) for _ in range(2 * blocks)]).digests]
    seq = SnapshotSequence(store.put_tokens(tokens),
                           [(digests[i], digests[i + 1]) for i in range(0, len(digests), 2)])
    manifest = Manifest(name=ref, parents=[], fingerprint=FINGERPRINT, sequences=[seq])
    return store.write_snapshot(manifest, ref=ref, move_head=False, cache_salt=salt)


def test_push_writes_records_and_fetch_keeps_the_partition(tmp_path: Path, remote_url: str) -> None:
    tokens = list(range(1000, 1000 + 5 * BLOCK + 3))
    with Store(tmp_path / "a") as a:
        plain = make_snapshot(a, "plain", tokens=range(3 * BLOCK))
        salted = _salted_snapshot(a, "salted", tokens, "tenant-1")
        children = a.fork("plain", 3)
        remote = open_remote(remote_url, env=a.env)
        first = push(a.env, remote, {"plain": plain, "salted": salted})
        assert first.prefix_records == 2
        forked = push(a.env, remote, {f"plain/{i}": c for i, c in enumerate(children)})
        assert forked.prefix_records == 0  # the parent's record serves fork children
        raw = remote.store.get(layout.prefix_path(salted))
        assert raw is not None
        record = PrefixRecord.decode(salted, raw.data)
        assert record.root == partition_root(FINGERPRINT, "tenant-1") and record.blocks(0) == 5
        assert a.longest_prefix(record.root, tokens, BLOCK, first=0, limit=5).blocks == 5

    with Store(tmp_path / "b") as b:
        fetch(b.env, open_remote(remote_url, env=b.env), remote_name="origin")
        salt_root = partition_root(FINGERPRINT, "tenant-1")
        hit = b.longest_prefix(salt_root, tokens, BLOCK, first=0, limit=5)
        assert hit is not None and (hit.cid, hit.blocks) == (salted, 5)
        # Filed under its own salt only: an unsalted request finds nothing of it.
        assert b.longest_prefix(partition_root(FINGERPRINT), tokens, BLOCK, first=0, limit=5) is None
        plain_hit = b.longest_prefix(partition_root(FINGERPRINT), list(range(3 * BLOCK)), BLOCK,
                                     first=0, limit=2)
        assert plain_hit is not None and plain_hit.blocks == 2
        assert list(b.fsck()) == []


def test_a_snapshot_without_a_record_is_fetched_but_not_indexed(
    tmp_path: Path, remote_url: str
) -> None:
    """Remotes written before prefix records: their snapshots fetch and check out as before."""
    with Store(tmp_path / "a") as a:
        cid = make_snapshot(a, "old", tokens=range(4 * BLOCK))
        remote = open_remote(remote_url, env=a.env)
        push(a.env, remote, {"old": cid})
        remote.store.delete(layout.prefix_path(cid))
    with Store(tmp_path / "b") as b:
        result = fetch(b.env, open_remote(remote_url, env=b.env), remote_name="origin")
        assert result.snapshots == 1 and b.get_snapshot(cid).num_tokens == 4 * BLOCK
        root = partition_root(FINGERPRINT)
        assert b.longest_prefix(root, list(range(4 * BLOCK)), BLOCK, first=0, limit=3) is None
        assert list(b.fsck()) == []


def test_catalog_answers_in_memory_and_follows_the_remote(tmp_path: Path, remote_url: str) -> None:
    root = partition_root(FINGERPRINT)
    long_tokens = list(range(6 * BLOCK))
    with Store(tmp_path / "a") as a:
        remote = open_remote(remote_url, env=a.env)
        catalog = PrefixCatalog(open_remote(remote_url), cache_dir=str(tmp_path / "cache"))
        assert catalog.refresh() == 0  # an empty remote
        short = make_snapshot(a, "short", tokens=long_tokens[: 2 * BLOCK])
        push(a.env, remote, {"short": short})
        assert catalog.refresh() == 1
        before = catalog.remote.store.requests
        hit = catalog.longest(root, long_tokens, BLOCK, first=0, limit=5)
        assert hit is not None and (hit.cid, hit.seq, hit.blocks) == (short, 0, 2)
        assert catalog.longest(root, long_tokens, BLOCK, first=2, limit=5) is None
        assert catalog.longest(root, [7] * 6 * BLOCK, BLOCK, first=0, limit=5) is None
        other = partition_root({**FINGERPRINT, "model": "u"})
        assert catalog.longest(other, long_tokens, BLOCK, first=0, limit=5) is None
        assert catalog.remote.store.requests == before  # lookups ask the remote nothing

        longer = make_snapshot(a, "longer", tokens=long_tokens)
        push(a.env, remote, {"longer": longer})
        catalog.refresh()
        hit = catalog.longest(root, long_tokens, BLOCK, first=1, limit=5)
        assert hit is not None and (hit.cid, hit.blocks) == (longer, 5)

        remote.store.delete(layout.ref_path("short"))
        stats = gc_remote(remote, grace=0)
        assert stats.removed_prefix_records == 1
        assert catalog.refresh() == 1 and catalog.record(short) is None
        hit = catalog.longest(root, long_tokens, BLOCK, first=0, limit=2)
        assert hit is not None and hit.cid == longer

        # Records are cached on disk: a new catalog reads none of them again.
        fresh = PrefixCatalog(open_remote(remote_url), cache_dir=str(tmp_path / "cache"))
        fresh.refresh()
        assert fresh.remote.store.requests == 2  # the format record and the listing
