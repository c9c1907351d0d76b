"""Revision names to cids, as git reads them: full cid, unique hex prefix, ref, HEAD, `REF@{N}`
(where REF pointed N moves ago, 0 the newest, from its reflog) and `REV~N`."""

from __future__ import annotations

import json
import re
from typing import Any

import lmdb
from processfork.store.digest import CID_PREFIX, cid_key
from processfork.store.errors import AmbiguousRevision, UnknownRevision
from processfork.store.refs import FETCH_HEAD, HEAD, read_head, read_ref, read_reflog

__all__ = ["MIN_PREFIX", "resolve_in", "stored_parents"]

MIN_PREFIX = 7
_FULL = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_PREFIX = re.compile(r"^(?:sha256:)?([0-9a-f]{" + str(MIN_PREFIX) + r",63})$")
_ANCESTRY = re.compile(r"^(.+?)((?:~\d*)+)$")
_REFLOG = re.compile(r"^(.*)@\{(\d+)\}$")
_MAX_CANDIDATES = 20


def stored_parents(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str) -> list[str] | None:
    """The parents a stored manifest lists, or None if the snapshot is absent or unreadable."""
    raw = txn.get(cid_key(cid), db=dbs["snapshots"])
    if raw is None:
        return None
    try:
        parents = json.loads(bytes(raw)).get("parents")
    except (ValueError, AttributeError):
        return None
    return parents if isinstance(parents, list) else None


def _has_snapshot(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str) -> bool:
    cur = txn.cursor(db=dbs["snapshots"])
    return bool(cur.set_key(cid_key(cid)))


def _by_prefix(txn: lmdb.Transaction, dbs: dict[str, Any], rev: str, prefix: str) -> str:
    low = bytes.fromhex(prefix + "0" * (len(prefix) % 2))
    cur = txn.cursor(db=dbs["snapshots"])
    found: list[str] = []
    if cur.set_range(low):
        for key in cur.iternext(keys=True, values=False):
            h = bytes(key).hex()
            if not h.startswith(prefix):
                break
            found.append(CID_PREFIX + h)
            if len(found) >= _MAX_CANDIDATES:
                break
    if not found:
        raise UnknownRevision(rev)
    if len(found) > 1:
        raise AmbiguousRevision(rev, found)
    return found[0]


def _by_reflog(txn: lmdb.Transaction, dbs: dict[str, Any], ref: str, n: int, whole: str) -> str:
    """`REF@{N}`: the snapshot REF pointed to N moves ago, numbered as `pf reflog` shows them."""
    entries = sorted(read_reflog(txn, dbs, ref or HEAD), key=lambda e: e.seq, reverse=True)
    if n >= len(entries) or entries[n].new is None or not _has_snapshot(txn, dbs, entries[n].new):
        raise UnknownRevision(whole)
    return entries[n].new


def _resolve_base(txn: lmdb.Transaction, dbs: dict[str, Any], rev: str, whole: str) -> str:
    reflog = _REFLOG.match(rev)
    if reflog:
        return _by_reflog(txn, dbs, reflog.group(1), int(reflog.group(2)), whole)
    if rev == HEAD:
        head = read_head(txn, dbs)
        if head.cid is None:
            raise UnknownRevision(whole)
        return head.cid
    if rev == FETCH_HEAD:  # the snapshot fetched by cid last, as FETCH_HEAD@{0}
        return _by_reflog(txn, dbs, FETCH_HEAD, 0, whole)
    low = rev.lower()
    full = _FULL.match(low)
    if full:
        cid = CID_PREFIX + full.group(1)
        if _has_snapshot(txn, dbs, cid):
            return cid
        raise UnknownRevision(whole)
    try:
        ref = read_ref(txn, dbs, rev)
    except UnicodeError:
        ref = None
    if ref is not None:
        return ref
    prefix = _PREFIX.match(low)
    if prefix:
        return _by_prefix(txn, dbs, whole, prefix.group(1))
    raise UnknownRevision(whole)


def resolve_in(txn: lmdb.Transaction, dbs: dict[str, Any], rev: str) -> str:
    """Resolve inside one read transaction, so the answer is from one consistent state."""
    if not isinstance(rev, str) or not rev.strip():
        raise UnknownRevision(str(rev))
    whole = rev.strip()
    m = _ANCESTRY.match(whole)
    if not m:
        return _resolve_base(txn, dbs, whole, whole)
    cid = _resolve_base(txn, dbs, m.group(1), whole)
    steps = sum(int(part) if part else 1 for part in m.group(2).split("~")[1:])
    for _ in range(steps):
        parents = stored_parents(txn, dbs, cid)
        if not parents:
            raise UnknownRevision(whole)
        cid = parents[0]
    if not _has_snapshot(txn, dbs, cid):
        raise UnknownRevision(whole)
    return cid
