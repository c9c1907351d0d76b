"""A snapshot's damaged objects, and clearing damaged pages so that a recomputation restores them.

Writers skip a page whose digest is already stored (that is the deduplication), so a page whose
bytes were damaged on disk would never be written again by a later snapshot of the same KV: its
digest is present. `clear_damaged_pages` deletes such records, re-checking each one's hash in the
deleting transaction. A later write of the right bytes (a server recomputing the sequence, see
plugin/repair.py) then stores the page again, for every snapshot that names it.

Token ids and page tables cannot be recomputed (they are what names the KV), so damage to them is
reported, never cleared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store.digest import page_digest
from processfork.store.manifest import stored_sequences
from processfork.store.objects import JOURNAL_PAGE
from processfork.store.snapshots import load_stored

if TYPE_CHECKING:
    from collections.abc import Iterable

    from processfork.store.env import Env

__all__ = ["SnapshotDamage", "clear_damaged_pages", "find_damage"]


@dataclass(frozen=True)
class SnapshotDamage:
    """What of one snapshot is missing or fails its hash (hex digests, each once)."""

    cid: str
    pages: tuple[str, ...] = ()
    """Pages: a server can recompute them from the token ids."""
    sequences: tuple[int, ...] = ()
    """The sequences whose pages are damaged, in manifest order."""
    tokens: tuple[str, ...] = ()
    """Token-id blobs: not recomputable."""
    tables: tuple[str, ...] = ()
    """Page tables: not recomputable."""

    @property
    def intact(self) -> bool:
        return not (self.pages or self.tokens or self.tables)

    @property
    def recomputable(self) -> bool:
        """Every damaged object is a page whose sequence's token ids and page table are sound."""
        return bool(self.pages) and not (self.tokens or self.tables)


def _sound(cursor: lmdb.Cursor, key: bytes) -> bool:
    return bool(cursor.set_key(key)) and page_digest(cursor.value()) == key


def find_damage(env: Env, cid: str) -> SnapshotDamage:
    """Hash every object `cid` names (one read transaction; reads every page of the snapshot)."""

    def run(txn: lmdb.Transaction) -> SnapshotDamage:
        pages_cur = txn.cursor(db=env.dbs["pages"])
        blobs_cur = txn.cursor(db=env.dbs["blobs"])
        pages: dict[str, None] = {}
        tokens: dict[str, None] = {}
        tables: dict[str, None] = {}
        sequences: list[int] = []
        checked: dict[bytes, bool] = {}
        for index, seq in enumerate(stored_sequences(load_stored(txn, env.dbs, cid))):
            tok, tab = seq["tokens"]["digest"], seq["pages"]["digest"]
            if not _sound(blobs_cur, bytes.fromhex(tok)):
                tokens[tok] = None
            if not _sound(blobs_cur, bytes.fromhex(tab)):
                tables[tab] = None
                continue
            table = bytes(blobs_cur.value())
            bad = False
            for i in range(0, len(table) - len(table) % 16, 16):
                key = table[i : i + 16]
                if key not in checked:
                    checked[key] = _sound(pages_cur, key)
                if not checked[key]:
                    pages[key.hex()] = None
                    bad = True
            if bad:
                sequences.append(index)
        return SnapshotDamage(cid, tuple(pages), tuple(sequences), tuple(tokens), tuple(tables))

    return env.read(run, buffers=True)


def clear_damaged_pages(env: Env, digests: Iterable[str]) -> list[str]:
    """Delete the page records among `digests` whose bytes do not hash to their digest (and
    their journal records); return those deleted. Sound and absent pages are left alone, so a
    concurrent repair that already restored a page keeps it."""
    keys = [bytes.fromhex(d) for d in digests]

    def run(txn: lmdb.Transaction) -> list[str]:
        db: Any = env.dbs["pages"]
        deleted = []
        for key in keys:
            value = txn.get(key, db=db)
            if value is None or page_digest(value) == key:
                continue
            txn.delete(key, db=db)
            txn.delete(JOURNAL_PAGE + key, db=env.dbs["journal"])
            deleted.append(key.hex())
        return deleted

    return env.write(run)
