"""What a remote operation reads from the local store: the objects a set of snapshots needs,
and ancestry (for fast-forward checks). Read transactions only."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store.digest import cid_key
from processfork.store.errors import MissingObject
from processfork.store.manifest import decode_page_table, parse_head, stored_sequences
from processfork.store.snapshots import load_stored

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = ["Closure", "closure", "is_ancestor", "missing_snapshots"]


@dataclass
class Closure:
    """Every object the snapshots reach: themselves, their ancestors, blobs and pages (hex)."""

    snapshots: list[str] = field(default_factory=list)  # cids, parents before children
    blobs: set[str] = field(default_factory=set)
    pages: set[str] = field(default_factory=set)


def closure(env: Env, cids: Iterable[str]) -> Closure:
    def run(txn: lmdb.Transaction) -> Closure:
        out = Closure()
        seen: set[str] = set()
        order: list[str] = []
        stack = [(c, False) for c in cids]
        while stack:  # depth-first, emitting a snapshot after its parents
            cid, expanded = stack.pop()
            if expanded:
                order.append(cid)
                continue
            if cid in seen:
                continue
            seen.add(cid)
            d = load_stored(txn, env.dbs, cid)
            head = parse_head(d)
            stack.append((cid, True))
            stack.extend((p, False) for p in head["parents"] if p not in seen)
            for s in stored_sequences(d):
                out.blobs.add(s["tokens"]["digest"])
                table_hex = s["pages"]["digest"]
                out.blobs.add(table_hex)
                table = txn.get(bytes.fromhex(table_hex), db=env.dbs["blobs"])
                if table is None:
                    raise MissingObject("blob", table_hex)
                for k, v in decode_page_table(bytes(table)):
                    out.pages.add(k)
                    out.pages.add(v)
        out.snapshots = order
        return out

    return env.read(run, buffers=True)


def is_ancestor(env: Env, ancestor: str, cid: str) -> bool:
    """True when `ancestor` is `cid` or reachable from it through parents in the local store."""

    def run(txn: lmdb.Transaction) -> bool:
        seen: set[str] = set()
        stack = [cid]
        while stack:
            c = stack.pop()
            if c == ancestor:
                return True
            if c in seen:
                continue
            seen.add(c)
            raw = txn.get(cid_key(c), db=env.dbs["snapshots"])
            if raw is not None:
                stack.extend(parse_head(load_stored(txn, env.dbs, c))["parents"])
        return False

    return env.read(run, buffers=True)


def missing_snapshots(env: Env, cids: Iterable[str]) -> set[str]:
    """The cids the local store does not hold."""
    keys = list(cids)

    def run(txn: lmdb.Transaction) -> set[str]:
        return {c for c in keys if txn.get(cid_key(c), db=env.dbs["snapshots"]) is None}

    return env.read(run, buffers=True)


def present(env: Env, db: str, keys: Iterable[str]) -> set[str]:
    """The hex keys of `db` (pages or blobs) the local store holds."""
    wanted = list(keys)

    def run(txn: lmdb.Transaction) -> set[str]:
        cur = txn.cursor(db=env.dbs[db])
        return {k for k in wanted if cur.set_key(bytes.fromhex(k))}

    return env.read(run, buffers=True)


def read_raw(env: Env, db: str, keys: list[bytes]) -> list[Any]:
    """The bytes of `keys` in `db`, copied out of one read transaction."""

    def run(txn: lmdb.Transaction) -> list[bytes]:
        out = []
        for key in keys:
            value = txn.get(key, db=env.dbs[db])
            if value is None:
                raise MissingObject(db.rstrip("s"), key.hex())
            out.append(bytes(value))
        return out

    return env.read(run, buffers=True)
