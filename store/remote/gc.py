"""Remote gc: delete packs that no remote ref reaches, after a grace period.

Mark: walk every remote ref's snapshots through their parents, page tables and pages, reading
the manifests and page tables from the packs (verified like any read). Sweep: a pack is kept if
any of its objects is marked or if it is younger than the grace period; otherwise its index is
deleted, then the pack (a reader never sees an index whose pack is gone). Uploads that never got
an index (a push killed between the two) go once they are older than the grace period too, and
so do the prefix records of snapshots no ref reaches.

Concurrent pushers: a push uploads its packs before it moves any ref, so its packs are young
while it runs; the grace period (default one day) must outlast the longest push. A push that
re-uses objects it found in an old pack checks, right before moving its refs, that the pack is
still there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from processfork.store.manifest import decode_page_table, parse_head, stored_sequences
from processfork.store.remote import layout
from processfork.store.remote.pack import KIND_BLOB, KIND_PAGE, KIND_SNAPSHOT
from processfork.store.remote.remote import Remote

__all__ = ["RemoteGcStats", "gc_remote"]

DEFAULT_GRACE = 24 * 3600.0


@dataclass
class RemoteGcStats:
    dry_run: bool
    refs: int = 0
    reachable_snapshots: int = 0
    reachable_objects: int = 0
    kept_packs: int = 0
    kept_young: int = 0  # unreferenced packs kept by the grace period
    removed_packs: int = 0
    removed_bytes: int = 0
    removed_uploads: int = 0  # pack bodies without an index (killed pushes)
    removed_prefix_records: int = 0  # prefix records of snapshots no ref reaches
    seconds: float = 0.0


def gc_remote(remote: Remote, *, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> RemoteGcStats:
    t0 = time.perf_counter()
    stats = RemoteGcStats(dry_run)
    if not remote.check_format(create=False):
        return stats
    listed = {o.key: o for o in remote.store.list("packs")}
    indexes = remote.load_indexes()
    refs = remote.list_refs()
    stats.refs = len(refs)
    marked = _mark(remote, [v.cid for v in refs.values()], stats)
    now = time.time()
    for name, index in sorted(indexes.items()):
        idx = listed.get(layout.idx_path(name))
        pack = listed.get(layout.pack_path(name))
        if any((e.kind, e.key) in marked for e in index.entries):
            stats.kept_packs += 1
            continue
        newest = max(o.modified for o in (idx, pack) if o is not None)
        if now - newest < grace:
            stats.kept_young += 1
            continue
        stats.removed_packs += 1
        stats.removed_bytes += (pack.size if pack else 0) + (idx.size if idx else 0)
        if not dry_run:
            remote.store.delete(layout.idx_path(name))
            remote.store.delete(layout.pack_path(name))
    for key, obj in sorted(listed.items()):
        unindexed = key.endswith(".pack") and key[: -len(".pack")] + ".idx" not in listed
        if unindexed and now - obj.modified >= grace:
            stats.removed_uploads += 1
            stats.removed_bytes += obj.size
            if not dry_run:
                remote.store.delete(key)
    for obj in remote.store.list(layout.PREFIXES):
        cid = layout.prefix_cid_of(obj.key)
        if cid is None or (KIND_SNAPSHOT, cid[7:]) in marked or now - obj.modified < grace:
            continue
        stats.removed_prefix_records += 1
        stats.removed_bytes += obj.size
        if not dry_run:
            remote.store.delete(obj.key)
    stats.seconds = time.perf_counter() - t0
    return stats


def _mark(remote: Remote, cids: list[str], stats: RemoteGcStats) -> set[tuple[str, str]]:
    marked: set[tuple[str, str]] = set()
    frontier = {c[7:] for c in cids}
    tables: set[str] = set()
    while frontier:
        frontier = {k for k in frontier if (KIND_SNAPSHOT, k) not in marked}
        present = [k for k in frontier if remote.has(KIND_SNAPSHOT, k)]
        next_frontier: set[str] = set()
        for _, key, data in remote.read_objects((KIND_SNAPSHOT, k) for k in present):
            marked.add((KIND_SNAPSHOT, key))
            stats.reachable_snapshots += 1
            d = json.loads(data)
            next_frontier.update(p[7:] for p in parse_head(d)["parents"])
            for s in stored_sequences(d):
                marked.add((KIND_BLOB, s["tokens"]["digest"]))
                marked.add((KIND_BLOB, s["pages"]["digest"]))
                tables.add(s["pages"]["digest"])
        frontier = next_frontier
    present_tables = [(KIND_BLOB, k) for k in sorted(tables) if remote.has(KIND_BLOB, k)]
    for _, _, data in remote.read_objects(present_tables):
        for k, v in decode_page_table(data):
            marked.add((KIND_PAGE, k))
            marked.add((KIND_PAGE, v))
    stats.reachable_objects = len(marked)
    return marked
