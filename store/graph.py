"""History: `log` walks parents from refs or a revision; `graph_lines` draws it like `git log --graph`."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb
from processfork.store.errors import MissingObject, StoreError
from processfork.store.manifest import Manifest
from processfork.store.refs import HEAD, list_refs, read_head
from processfork.store.revparse import resolve_in
from processfork.store.snapshots import load_manifest

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["LogEntry", "graph_lines", "log", "order_newest_first"]


@dataclass
class LogEntry:
    """One snapshot of a log; `refs` names the refs at it ("HEAD" first when HEAD is here)."""

    cid: str
    manifest: Manifest
    refs: list[str] = field(default_factory=list)


def order_newest_first(manifests: dict[str, Manifest]) -> list[str]:
    """Children always before their parents; among the ready ones, newest `created` first, then
    fork children by fork index (they share one `created`), then by cid."""
    children_left = {cid: 0 for cid in manifests}
    for m in manifests.values():
        for p in set(m.parents):
            if p in children_left:
                children_left[p] += 1
    ready = [_key(manifests, c) for c, k in children_left.items() if k == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        cid = heapq.heappop(ready)[-1]
        out.append(cid)
        for p in set(manifests[cid].parents):
            if p in children_left:
                children_left[p] -= 1
                if children_left[p] == 0:
                    heapq.heappush(ready, _key(manifests, p))
    return out


def _key(manifests: dict[str, Manifest], cid: str) -> tuple[tuple[int, ...], int, tuple[int, ...], str]:
    m = manifests[cid]
    return (_neg(m.created), m.fork.index if m.fork is not None else -1, _neg(cid), cid)


def _neg(text: str) -> tuple[int, ...]:
    """A key that sorts strings in reverse on a min-heap."""
    return tuple(-ord(ch) for ch in text) + (1,)


def log(
    env: Env, rev: str | None = HEAD, *, limit: int | None = None, all_refs: bool = False
) -> list[LogEntry]:
    """Snapshots reachable from `rev` (or from every ref and HEAD), newest first.

    An unborn HEAD gives an empty log; a missing parent (see fsck) ends that line of history.
    """
    dbs = env.dbs

    def run(txn: lmdb.Transaction) -> list[LogEntry]:
        refs = list_refs(txn, dbs)
        head = read_head(txn, dbs)
        starts: list[str] = []
        if all_refs:
            starts = sorted(set(refs.values()) | ({head.cid} if head.cid else set()))
        elif rev is None or rev == HEAD:
            if head.cid is None:
                return []
            starts = [head.cid]
        else:
            starts = [resolve_in(txn, dbs, rev)]
        manifests: dict[str, Manifest] = {}
        todo = list(starts)
        while todo:
            cid = todo.pop()
            if cid in manifests:
                continue
            try:
                manifests[cid] = load_manifest(txn, dbs, cid)
            except (MissingObject, StoreError):
                continue
            todo.extend(p for p in manifests[cid].parents if p not in manifests)
        order = order_newest_first(manifests)
        if limit is not None:
            order = order[: max(0, limit)]
        at: dict[str, list[str]] = {}
        for name, cid in sorted(refs.items()):
            at.setdefault(cid, []).append(name)
        entries = []
        for cid in order:
            names = at.get(cid, [])
            if head.cid == cid:
                names = [HEAD, *names]
            entries.append(LogEntry(cid, manifests[cid], names))
        return entries

    return env.read(run, buffers=True)


def graph_lines(entries: Sequence[LogEntry]) -> list[tuple[str, LogEntry | None]]:
    """ASCII lanes for `entries` (newest first): `(prefix, entry)` for each snapshot line and
    `(prefix, None)` for connector lines such as `|/` (lanes joining) and `|\\` (a merge)."""
    known = {e.cid for e in entries}
    cols: list[str] = []
    out: list[tuple[str, LogEntry | None]] = []
    freed: int | None = None  # the column a root just left empty
    for e in entries:
        if e.cid in cols:
            c = cols.index(e.cid)
        else:
            if freed is not None and freed == len(cols):
                # A new history would start right under an unrelated root, in the lane the root
                # left: a blank line keeps the two from reading as parent and child.
                out.append((("| " * len(cols)).rstrip(), None))
            cols.append(e.cid)
            c = len(cols) - 1
        freed = None
        out.append(("".join("* " if i == c else "| " for i in range(len(cols))).rstrip(), e))
        parents = [p for p in dict.fromkeys(e.manifest.parents) if p in known]
        after = len(cols) - c - 1
        if not parents:
            del cols[c]
            if after:
                out.append((("| " * c + " /" * after).rstrip(), None))
            freed = c if not after else None
            continue
        cols[c : c + 1] = parents
        if len(parents) > 1:
            line = "| " * c + "|\\" + " \\" * (len(parents) - 2) + " \\" * after
            out.append((line.rstrip(), None))
        out.extend(_collapse(cols))
    return out


def _collapse(cols: list[str]) -> list[tuple[str, LogEntry | None]]:
    """Merge lanes waiting for the same snapshot into the leftmost one, one connector line each."""
    lines: list[tuple[str, LogEntry | None]] = []
    j = 1
    while j < len(cols):
        if cols[j] in cols[:j]:
            i = cols.index(cols[j])
            rest = len(cols) - 1 - j
            line = "| " * i + "|" + "_|" * (j - i - 1) + "/" + " /" * rest
            lines.append((line.rstrip(), None))
            del cols[j]
        else:
            j += 1
    return lines
