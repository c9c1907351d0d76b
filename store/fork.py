"""`fork`: n children of a snapshot that share all its pages; metadata only, one transaction.

A child differs from its parent only in name, parents, fork index and creation time. Its sequences
name the same page tables, so each child costs one small manifest, one ref and one reflog entry.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import lmdb
from processfork.store import refs as _refs
from processfork.store.digest import canonical_json, cid_key, cid_of
from processfork.store.errors import InvalidCount, MissingObject
from processfork.store.manifest import ForkInfo, Manifest, utc_now
from processfork.store.prefix_index import inherit_partition
from processfork.store.revparse import resolve_in
from processfork.store.snapshots import load_manifest, write_manifest

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["MAX_FORK", "fork", "fork_named"]

MAX_FORK = 10_000


def _default_prefix(txn: lmdb.Transaction, dbs: dict, rev: str, cid: str) -> str:
    """The ref name the user typed (HEAD: the ref it follows); for a cid or any other revision,
    the one ref that points at that snapshot; else (none, or several) the 12-hex short cid."""
    if rev == _refs.HEAD:
        head = _refs.read_head(txn, dbs)
        if head.ref is not None:
            return head.ref
    elif "~" not in rev and "@{" not in rev and _refs.read_ref(txn, dbs, rev) is not None:
        return rev
    pointing = [name for name, target in _refs.list_refs(txn, dbs).items() if target == cid]
    if len(pointing) == 1:
        return pointing[0]
    return cid.removeprefix("sha256:")[:12]


def fork(
    env: Env, rev: str, n: int, *, prefix: str | None = None, message: str = ""
) -> list[str]:
    """The cids of `fork_named`'s children."""
    return [cid for _, cid in fork_named(env, rev, n, prefix=prefix, message=message)]


def fork_named(
    env: Env, rev: str, n: int, *, prefix: str | None = None, message: str = ""
) -> list[tuple[str, str]]:
    """Create refs `{prefix}/0` .. `{prefix}/{n-1}` naming n children of `rev`; returns each
    child's (ref name, cid), in fork order.

    Existing refs of those names are moved (their reflog keeps the old value).
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_FORK:
        raise InvalidCount("fork count", n, 1, MAX_FORK)
    dbs = env.dbs

    def prepare(txn: lmdb.Transaction) -> tuple[str, Manifest, str]:
        cid = resolve_in(txn, dbs, rev)
        parent = load_manifest(txn, dbs, cid)
        return cid, parent, prefix or _default_prefix(txn, dbs, rev.strip(), cid)

    parent_cid, parent, base = env.read(prepare, buffers=True)
    names = [f"{base}/{i}" for i in range(n)]
    for name in names:
        _refs.validate_ref_name(name)
    created = utc_now()
    children = [
        dataclasses.replace(
            parent,
            name=name,
            parents=[parent_cid],
            fork=ForkInfo(i, n),
            created=created,
            sequences=parent.sequences,
        )
        for i, name in enumerate(names)
    ]
    tables = parent.page_tables()
    # Children differ from the parent only in four top-level fields: encode the shared stored form
    # (page tables hashed) once, not once per child.
    stored = parent.stored_dict()
    encoded = [(c, canonical_json({**stored, **c.head_dict()})) for c in children]
    page_keys = parent.page_keys()
    text = message or f"fork {n} of {parent_cid[:19]}"

    def run(txn: lmdb.Transaction) -> list[tuple[str, str]]:
        if txn.get(cid_key(parent_cid), db=dbs["snapshots"]) is None:
            raise MissingObject("snapshot", parent_cid)
        now = time.time()
        t_us = int(now * 1e6)
        cids = []
        for i, (child, data) in enumerate(encoded):
            cid = cid_of(data)
            # The parent's pages and page tables are checked (and the tables re-stamped) once, for
            # the first child: every child shares them.
            first = i == 0
            write_manifest(
                txn,
                dbs,
                child,
                data,
                cid,
                tables if first else {},
                page_keys,
                t_us,
                check_pages=first,
            )
            inherit_partition(txn, dbs, cid, parent_cid)
            _refs.set_ref(txn, dbs, names[i], cid, action="fork", message=text, now=now)
            cids.append((names[i], cid))
        return cids

    return env.write(run)
