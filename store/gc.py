"""Garbage collection: find reachable, find unreachable, prune (with a grace period), expire reflogs.

Roots are every ref, HEAD, every reflog entry younger than `expire`, every live pin (extended within
a day, and its owner process not known to have exited: owners.py), and every snapshot younger than
`prune` (a young snapshot keeps what it names, so no kept manifest can point to a pruned page).
An abandoned pin is deleted with the job record of the same name (`job:<pin>` in `meta`), and a
snapshot with its prefix-index entries; on a disk too full for both in one transaction, the
snapshot goes first (which frees its space) and its entries in one more transaction after the
sweep, which also deletes entries any earlier gc or older writer left of missing snapshots.

The mark runs in one read transaction so writers are not blocked. The sweep then runs in short write
transactions, each of which first re-reads the roots and walks whatever appeared since the mark
(new refs, new pins, new snapshots): writers that committed, or pinned, in between never lose an
object, even with `prune=0`. Deletion is decided inside the same transaction that deletes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store.digest import cid_key, is_cid
from processfork.store.errors import StoreFull
from processfork.store.meta import replaced_key
from processfork.store.objects import (
    JOURNAL_BLOB,
    JOURNAL_PAGE,
    JOURNAL_SNAPSHOT,
    PIN_STALE_SECONDS,
    journal_seconds,
    journal_time,
    read_pins,
)
from processfork.store.prefix_index import count_dangling, drop_dangling, drop_snapshot
from processfork.store.refs import (
    iter_reflog,
    list_refs,
    read_head,
    read_reflog,
    set_ref,
)
from processfork.store.sessions import session_prefixes as recorded_prefixes
from processfork.store.timeparse import parse_age

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["GcStats", "gc"]

SWEEP_CHUNK = 50_000  # deletions per write transaction: bounded writer stalls, few commits
JOB_RECORD_PREFIX = b"job:"  # meta key of a job's record; the job's pin is named by the job id
RANK_RECORD_INFIX = b".r"  # `job:<id>.r<rank>`: the part of a job that a TP rank > 0 saved
Progress = Callable[[str, int, int], None]


@dataclass
class GcStats:
    """What gc removed (or, with `dry_run`, would remove), and what it kept."""

    dry_run: bool
    reachable_snapshots: int = 0
    reachable_pages: int = 0
    reachable_blobs: int = 0
    removed_snapshots: int = 0
    removed_pages: int = 0
    removed_blobs: int = 0
    removed_page_bytes: int = 0
    removed_bytes: int = 0
    expired_reflog: int = 0
    removed_pins: int = 0
    expired_sessions: int = 0
    kept_young: int = 0
    seconds: float = 0.0


@dataclass
class _Mark:
    """Everything found reachable so far; it only grows, so re-running a transaction stays safe."""

    snapshots: set[bytes] = field(default_factory=set)
    pages: set[bytes] = field(default_factory=set)
    blobs: set[bytes] = field(default_factory=set)
    tables: set[bytes] = field(default_factory=set)

    def walk(self, txn: lmdb.Transaction, dbs: dict[str, Any], roots: Iterable[bytes]) -> None:
        stack = [k for k in roots if k not in self.snapshots]
        snaps, blobs_db = dbs["snapshots"], dbs["blobs"]
        while stack:
            key = stack.pop()
            if key in self.snapshots:
                continue
            raw = txn.get(key, db=snaps)
            if raw is None:
                continue  # a dangling root keeps nothing
            self.snapshots.add(key)
            try:
                d = json.loads(bytes(raw))
                parents, sequences = d["parents"], d["sequences"]
                refs = [(s["tokens"]["digest"], s["pages"]["digest"]) for s in sequences]
            except (ValueError, KeyError, TypeError):
                continue  # unreadable manifest: kept as it is, fsck reports it
            stack.extend(cid_key(p) for p in parents if is_cid(p))
            for tokens_hex, table_hex in refs:
                self.blobs.add(bytes.fromhex(tokens_hex))
                table_key = bytes.fromhex(table_hex)
                self.blobs.add(table_key)
                if table_key in self.tables:
                    continue
                table = txn.get(table_key, db=blobs_db)
                if table is None:
                    continue
                self.tables.add(table_key)
                t = bytes(table)
                self.pages.update(t[i : i + 16] for i in range(0, len(t), 16))


@dataclass(frozen=True)
class _Roots:
    """What gc must keep, and the records it may drop, as of one transaction."""

    snapshots: list[bytes]
    """Keys of the snapshots refs, HEAD and unexpired reflog entries name."""
    pinned: set[bytes]
    """Digests that live pins protect."""
    abandoned_pins: list[str]
    """Pins that are malformed, a day old, or whose owner has exited (owners.py)."""
    expired_reflog: list[bytes]
    """Keys of reflog entries older than the expiry."""


def _roots(
    txn: lmdb.Transaction, dbs: dict[str, Any], expire_cut: float, pin_cut: float
) -> _Roots:
    """The roots as of this transaction. A writer killed mid-snapshot never drops its pin
    itself: its pin is abandoned as soon as its owner is known to have exited."""
    cids = set(list_refs(txn, dbs).values())
    head = read_head(txn, dbs).cid
    if head:
        cids.add(head)
    expired = []
    for key, _name, entry in iter_reflog(txn, dbs):
        if entry is None:
            continue  # malformed: left for fsck, never silently deleted
        if entry.time < expire_cut:
            expired.append(key)
            continue
        cids.update(c for c in (entry.old, entry.new) if c)
    pinned: set[bytes] = set()
    abandoned = []
    for name, info in read_pins(txn, dbs).items():
        if info is None or info.updated < pin_cut or info.owner_dead():
            abandoned.append(name)
        else:
            pinned.update(info.digests)
    return _Roots([cid_key(c) for c in cids], pinned, abandoned, expired)


def _keys(txn: lmdb.Transaction, db: Any, *, views: bool) -> list[bytes]:
    """All keys of `db`; `views`: the transaction hands out memoryviews, which must be copied."""
    keys = txn.cursor(db=db).iternext(keys=True, values=False)
    return [bytes(k) for k in keys] if views else list(keys)


def _expire_sessions(env: Env, cut: float, prefixes: Sequence[str] | None, *,
                     dry_run: bool) -> int:
    """Delete (or, dry, count) the session refs whose last move is older than `cut`; one write
    transaction, each deletion a compare-and-swap with its reflog entry. The ref HEAD follows
    stays. Session refs are those under `prefixes`, or by default under every prefix a server
    recorded in the store (`session-prefixes` in `meta`: a server's `session_prefix`)."""

    def run(txn: lmdb.Transaction) -> int:
        head = read_head(txn, env.dbs)
        under = tuple(prefixes) if prefixes else tuple(recorded_prefixes(txn, env.dbs))
        count = 0
        for name, cid in sorted(list_refs(txn, env.dbs).items()):
            if not name.startswith(under) or name == head.ref:
                continue
            log = read_reflog(txn, env.dbs, name)
            if log and log[-1].time >= cut:
                continue
            count += 1
            if not dry_run:
                set_ref(txn, env.dbs, name, None, expected_old=cid, action="delete",
                        message="session expired")
        return count

    return env.read(run) if dry_run else env.write(run)


#: Deletions per transaction when the disk is full: each dirties a handful of pages, which the
#: space the previous ones freed can hold.
FULL_DISK_STEP = 8


def _sweep_on_a_full_disk(
    env: Env, chunk: list[tuple[str, bytes, bytes]], first: bool,
    sweep: Callable[[lmdb.Transaction, list, bool, bool], GcStats],
) -> list[GcStats]:
    """A sweep that a full disk refused as one transaction, in many small ones.

    A write transaction copies every B-tree page it changes into free space; on a full disk the
    only free space is what earlier transactions freed. A few deletions at a time fit there, and
    each frees the space its objects held (a page's value is many disk pages) for the next. The
    order stays the sweep's (snapshots before the pages they name); prefix-index entries, which
    would add many changed pages, wait for the end of the sweep (`drop_dangling`)."""
    parts = []
    for i in range(0, max(1, len(chunk)), FULL_DISK_STEP):
        piece = chunk[i : i + FULL_DISK_STEP]
        parts.append(env.write(
            lambda txn, piece=piece, head=first and i == 0: sweep(txn, piece, head, False)))
    return parts


def gc(
    env: Env,
    *,
    dry_run: bool = False,
    prune: float | str = 600.0,
    expire: float | str = 30 * 86400.0,
    progress: Progress | None = None,
    session_ttl: float | str | None = None,
    session_prefixes: Sequence[str] | None = None,
) -> GcStats:
    """Mark and sweep; `prune` is the grace period and `expire` the reflog age, both in seconds
    (or ages such as "now", "10m", "2.weeks").

    With `session_ttl`, session refs (under `session_prefixes`, by default those the servers
    recorded) that have not moved for longer than that are
    deleted first, each with a reflog entry; what they reached then goes the way of any deleted
    ref's snapshots: once the reflog entries that name it expire (`expire`)."""
    start = time.perf_counter()
    prune_s, expire_s = parse_age(prune), parse_age(expire)
    now = time.time()
    expired_sessions = 0
    if session_ttl is not None:
        expired_sessions = _expire_sessions(env, now - parse_age(session_ttl), session_prefixes,
                                            dry_run=dry_run)
    grace_cut = now - prune_s
    expire_cut = -math.inf if math.isinf(expire_s) else now - expire_s
    pin_cut = now - PIN_STALE_SECONDS
    dbs = env.dbs
    mark = _Mark()
    report = progress or (lambda phase, done, total: None)

    def plan(txn: lmdb.Transaction) -> tuple[set[bytes], list[bytes], list[bytes], list[bytes]]:
        roots = _roots(txn, dbs, expire_cut, pin_cut).snapshots
        all_snaps = _keys(txn, dbs["snapshots"], views=False)
        young = [k for k in all_snaps if journal_time(txn, dbs, JOURNAL_SNAPSHOT, k) > grace_cut]
        report("mark", 0, len(all_snaps))
        mark.walk(txn, dbs, roots + young)
        report("mark", len(mark.snapshots), len(all_snaps))
        dead_snaps = [k for k in all_snaps if k not in mark.snapshots]
        dead_pages = [k for k in _keys(txn, dbs["pages"], views=False) if k not in mark.pages]
        dead_blobs = [k for k in _keys(txn, dbs["blobs"], views=False) if k not in mark.blobs]
        return set(all_snaps), dead_snaps, dead_pages, dead_blobs

    seen_snaps, dead_snaps, dead_pages, dead_blobs = env.read(plan)
    work = [("snapshots", JOURNAL_SNAPSHOT, k) for k in dead_snaps]
    work += [("blobs", JOURNAL_BLOB, k) for k in dead_blobs]
    work += [("pages", JOURNAL_PAGE, k) for k in dead_pages]
    chunks = [work[i : i + SWEEP_CHUNK] for i in range(0, len(work), SWEEP_CHUNK)] or [[]]

    def sweep(txn: lmdb.Transaction, chunk: list[tuple[str, bytes, bytes]], first: bool,
              index: bool = True) -> GcStats:
        s = GcStats(dry_run)
        found = _roots(txn, dbs, expire_cut, pin_cut)
        roots, pinned = found.snapshots, found.pinned
        # New since the mark, or re-stamped young since: both keep everything they name.
        fresh = [k for k in _keys(txn, dbs["snapshots"], views=True) if k not in seen_snaps]
        young = [k for k in dead_snaps if journal_time(txn, dbs, JOURNAL_SNAPSHOT, k) > grace_cut]
        mark.walk(txn, dbs, roots + fresh + young)
        if first:
            s.removed_pins, s.expired_reflog = len(found.abandoned_pins), len(found.expired_reflog)
            if not dry_run:
                for name in found.abandoned_pins:
                    txn.delete(name.encode("utf-8"), db=dbs["pins"])
                    # A snapshot job's pin is named by its job id, and its final record
                    # commits with its last pages: once the writer has exited, nothing will
                    # read that record (format.md, "meta: job records").
                    txn.delete(JOB_RECORD_PREFIX + name.encode("utf-8"), db=dbs["meta"])
                    _delete_rank_records(txn, dbs, name)
                for key in found.expired_reflog:
                    txn.delete(key, db=dbs["reflog"])
        marked = {"snapshots": mark.snapshots, "pages": mark.pages, "blobs": mark.blobs}
        cursors = {name: txn.cursor(db=dbs[name]) for name in marked}
        jcur = txn.cursor(db=dbs["journal"])
        # Work items are in key order per database (they came from cursors), so each lookup
        # lands next to the previous one; one cursor lookup serves both the read and the delete.
        for db_name, kind, key in chunk:
            if key in marked[db_name] or (db_name != "snapshots" and key in pinned):
                continue
            journaled = jcur.set_key(kind + key)
            if journaled and journal_seconds(jcur.value()) > grace_cut:
                s.kept_young += 1
                continue
            cur = cursors[db_name]
            if not cur.set_key(key):
                continue
            size = len(cur.value())
            if db_name == "pages":
                s.removed_pages += 1
                s.removed_page_bytes += size
            elif db_name == "blobs":
                s.removed_blobs += 1
            else:
                s.removed_snapshots += 1
            s.removed_bytes += size
            if not dry_run:
                if index and db_name == "snapshots":
                    drop_snapshot(txn, dbs, bytes(key))
                if db_name == "snapshots":
                    txn.delete(replaced_key(bytes(key)).encode("utf-8"), db=dbs["meta"])
                cur.delete()
                if journaled:
                    jcur.delete()
        return s

    total = GcStats(dry_run, expired_sessions=expired_sessions)
    done = 0
    for n, chunk in enumerate(chunks):

        def run(txn: lmdb.Transaction, chunk: list = chunk, first: bool = n == 0,
                index: bool = True) -> GcStats:
            return sweep(txn, chunk, first, index)

        if dry_run:
            parts = [env.read(run, buffers=True)]
        else:
            try:
                parts = [env.write(run)]
            except StoreFull:
                parts = _sweep_on_a_full_disk(env, chunk, n == 0, sweep)
        for part in parts:
            for name in (
                "removed_snapshots", "removed_pages", "removed_blobs", "removed_page_bytes",
                "removed_bytes", "expired_reflog", "removed_pins", "kept_young",
            ):  # fmt: skip
                setattr(total, name, getattr(total, name) + getattr(part, name))
        done += len(chunk)
        report("sweep", done, len(work))
    if not dry_run and env.read(lambda txn: count_dangling(txn, dbs)):
        env.write(lambda txn: drop_dangling(txn, dbs))
    total.reachable_snapshots = len(mark.snapshots)
    total.reachable_pages = len(mark.pages)
    total.reachable_blobs = len(mark.blobs)
    total.seconds = time.perf_counter() - start
    return total


def _delete_rank_records(txn: lmdb.Transaction, dbs: dict[str, Any], pin: str) -> None:
    """Delete the records ``job:<pin>.r<rank>`` of a tensor-parallel engine's other ranks, which
    share the job's pin (format.md, "meta: job records")."""
    prefix = JOB_RECORD_PREFIX + pin.encode("utf-8") + RANK_RECORD_INFIX
    cur = txn.cursor(db=dbs["meta"])
    keys = []
    if cur.set_range(prefix):
        for key in cur.iternext(keys=True, values=False):
            if not bytes(key).startswith(prefix):
                break
            keys.append(bytes(key))
    for key in keys:
        rank = key[len(prefix):]
        if rank.isdigit():
            txn.delete(key, db=dbs["meta"])
