"""Committing one turn of a session: an ordinary snapshot on the session's ref.

A session turn is a one-sequence snapshot whose first blocks may be pages an earlier snapshot
already holds (found through the prefix index) and whose other blocks were saved by the engine
while it computed them, each engine step's pages pinned under a pin of their own. The turn's
parent is the snapshot the ref points to when that snapshot's tokens are a prefix of the turn's;
otherwise the turn starts a new line of history, and the reflog says so.

A model with several KV-cache groups commits a grouped manifest: per group, a run of blocks
whose first ones may be pages of the same group of the stored prefix, the others saved by the
engine (a sliding-window group stores only its window, a state group the one state at the
split point, or none: docs/format.md).

Everything happens in ONE write transaction, like `write_snapshot`: the token blob, the page
table, the manifest, its index entries, the ref (compare-and-swap against what the transaction
read) with its reflog entry, and the removal of the steps' pins and job records.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb
from processfork.store import meta as _meta
from processfork.store import objects as _objects
from processfork.store import refs as _refs
from processfork.store.digest import cid_of, page_digest
from processfork.store.errors import MissingObject
from processfork.store.manifest import (
    FORMAT,
    FORMAT_GROUPED,
    FORMAT_STATE,
    InvalidManifest,
    Manifest,
    PageGroup,
    SnapshotSequence,
    TokenRef,
    utc_now,
)
from processfork.store.prefix_index import index_snapshot
from processfork.store.snapshots import load_manifest, write_manifest

if TYPE_CHECKING:
    from processfork.store.env import Env

__all__ = [
    "DEFAULT_SESSION_PREFIX",
    "SESSION_PREFIXES_KEY",
    "SessionTurn",
    "TurnGroup",
    "TurnResult",
    "commit_turn",
    "record_session_prefix",
    "session_prefixes",
]

#: Where a server commits session turns unless its connector config says otherwise.
DEFAULT_SESSION_PREFIX = "sessions/"
#: The `meta` record of every ref prefix a server committed session turns under, so that
#: `pf gc --session-ttl` expires the refs the servers actually use.
SESSION_PREFIXES_KEY = "session-prefixes"


def _recorded(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[str]:
    record = _meta.meta_get(txn, dbs, SESSION_PREFIXES_KEY) or {}
    return [p for p in record.get("prefixes", []) if isinstance(p, str) and p]


def session_prefixes(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[str]:
    """The session ref prefixes servers recorded in this store; the default when none did."""
    return _recorded(txn, dbs) or [DEFAULT_SESSION_PREFIX]


def record_session_prefix(env: Env, prefix: str) -> None:
    """Add `prefix` to the recorded session prefixes (a server with sessions on, at start);
    a prefix on record already costs one read, no write."""
    if not prefix:
        raise ValueError("a session prefix must not be empty")
    dbs = env.dbs

    def run(txn: lmdb.Transaction) -> None:
        known = _recorded(txn, dbs)
        if prefix not in known:
            _meta.meta_put(txn, dbs, SESSION_PREFIXES_KEY, {"prefixes": sorted([*known, prefix])})

    if prefix not in env.read(lambda txn: _recorded(txn, dbs)):
        env.write(run)


@dataclass(frozen=True)
class TurnGroup:
    """One KV-cache group of a turn: blocks ``first ..``, the first ``base_blocks`` of them the
    same group's pages of the base, then ``pages`` (K, V digests in hex), in order."""

    first: int
    base_blocks: int
    pages: list[tuple[str, str]]
    #: A state group (its one block, if any, the state at the split point: docs/format.md).
    state: bool = False


@dataclass(frozen=True)
class SessionTurn:
    """What the engine computed for one turn, ready to commit."""

    ref: str
    tokens: list[int]
    #: Blocks ``0 .. base_blocks - 1`` are those of sequence ``base_seq`` of ``base``.
    base: str | None
    base_seq: int
    base_blocks: int
    #: (K, V) page digests (hex) of blocks ``base_blocks ..``, in order.
    pages: list[tuple[str, str]]
    fingerprint: dict[str, Any]
    #: The leading tokens whose blocks have pages, when fewer than ``tokens``: the partial last
    #: block has none (``paged_tokens`` in docs/format.md). None: every block has its pages.
    paged_tokens: int | None = None
    cache_salt: str | None = None
    #: Several KV-cache groups, in the fingerprint's order (``base_blocks`` and ``pages`` are then
    #: unused); None for one group.
    groups: Sequence[TurnGroup] | None = None
    drop_pins: Sequence[str] = ()
    drop_meta: Sequence[str] = ()


@dataclass(frozen=True)
class TurnResult:
    cid: str | None  # None: nothing new (the ref already holds exactly these tokens)
    parent: str | None
    new_line: bool


def _tokens_of(txn: lmdb.Transaction, dbs: dict[str, Any], manifest: Manifest) -> list[list[int]]:
    import numpy as np

    out = []
    for seq in manifest.sequences:
        raw = txn.get(bytes.fromhex(seq.tokens.digest), db=dbs["blobs"])
        out.append(np.frombuffer(bytes(raw or b""), dtype="<i4").tolist())
    return out


def commit_turn(env: Env, turn: SessionTurn, *, now: float | None = None) -> TurnResult:
    """Commit a session turn in one transaction (see the module's docstring)."""
    import numpy as np

    _refs.validate_ref_name(turn.ref)
    dbs = env.dbs
    token_bytes = np.asarray(turn.tokens, dtype="<i4").tobytes()
    token_digest = page_digest(token_bytes)
    paged = turn.paged_tokens if turn.paged_tokens != len(turn.tokens) else None

    def run(txn: lmdb.Transaction) -> TurnResult:
        t = time.time() if now is None else now
        t_us = int(t * 1e6)
        pages, groups = _turn_pages(txn, dbs, turn)
        old = _refs.read_ref(txn, dbs, turn.ref)
        parent: str | None = None
        new_line = False
        if old is not None:
            previous = _tokens_of(txn, dbs, load_manifest(txn, dbs, old))
            if any(seq == turn.tokens for seq in previous):
                return TurnResult(None, old, False)
            if any(len(seq) <= len(turn.tokens) and turn.tokens[: len(seq)] == seq
                   for seq in previous):
                parent = old
            else:
                new_line = True
        _objects.put_blob(txn, dbs, token_digest, token_bytes, t_us)
        manifest = Manifest(
            format=_format(groups),
            name=turn.ref,
            parents=[parent] if parent else [],
            fingerprint=dict(turn.fingerprint),
            sequences=[SnapshotSequence(TokenRef(token_digest.hex(), len(turn.tokens)), pages,
                                        groups=groups, paged_tokens=paged)],
            created=utc_now(),
        )
        manifest.validate()
        data = manifest.canonical_bytes()
        cid = cid_of(data)
        write_manifest(txn, dbs, manifest, data, cid, manifest.page_tables(),
                       manifest.page_keys(), t_us)
        index_snapshot(txn, dbs, cid, manifest, cache_salt=turn.cache_salt)
        message = "session turn"
        if new_line:
            message = f"session turn: new line of history ({old[:19]} is not a prefix of it)"
        _refs.set_ref(txn, dbs, turn.ref, cid, expected_old=old, action="snapshot",
                      message=message, now=t)
        for pin in turn.drop_pins:
            _objects.drop_pin(txn, dbs, pin)
        for key in turn.drop_meta:
            _meta.meta_delete(txn, dbs, key)
        return TurnResult(cid, parent, new_line)

    return env.write(run)



def _format(groups: Sequence[PageGroup] | None) -> str:
    """One group, several, or several of which one keeps a per-sequence state."""
    if groups is None:
        return FORMAT
    return FORMAT_STATE if any(g.state for g in groups) else FORMAT_GROUPED


def _turn_pages(txn: lmdb.Transaction, dbs: dict[str, Any], turn: SessionTurn
                ) -> tuple[list[tuple[str, str]], list[PageGroup] | None]:
    """The turn's page list, its base's pages first, and its groups (None for one group)."""
    needs_base = turn.base_blocks if turn.groups is None else any(
        g.base_blocks for g in turn.groups)
    base: SnapshotSequence | None = None
    if needs_base:
        if turn.base is None:
            raise MissingObject("snapshot", "base of the session's stored prefix")
        base = load_manifest(txn, dbs, turn.base).sequences[turn.base_seq]
    if turn.groups is None:
        head = list(base.pages[: turn.base_blocks]) if base is not None else []
        return head + list(turn.pages), None
    pages: list[tuple[str, str]] = []
    groups: list[PageGroup] = []
    for g, part in enumerate(turn.groups):
        taken: list[tuple[str, str]] = []
        if part.base_blocks:
            assert base is not None
            first, stored = base.group_pages(g)
            at = part.first - first
            if at < 0 or at + part.base_blocks > len(stored):
                raise InvalidManifest(
                    f"KV-cache group {g} of the session's base stores blocks {first}-"
                    f"{first + len(stored) - 1}, not {part.first}-"
                    f"{part.first + part.base_blocks - 1}")
            taken = list(stored[at : at + part.base_blocks])
        taken += part.pages
        pages += taken
        groups.append(PageGroup(part.first, len(taken), part.state))
    return pages, groups
