"""The prefix index: which stored snapshot holds the KV of a given run of whole blocks.

A request's tokens are cut into whole blocks and hashed as a chain: each block's key covers every
token before it, the engine fingerprint and vLLM's ``cache_salt`` (the *partition*). The index maps
a chain hash to the snapshots whose sequence starts with exactly those blocks, so the longest
stored prefix of any request is a walk of one B-tree lookup per block, stopping at the first
miss. docs/format.md ("prefix") specifies the keys.

Entries are written in the transaction that commits their snapshot and deleted with it by gc. A
snapshot indexes only the blocks it does not share with a parent of the same partition: a parent
lives as long as its children (gc follows parents), and its own blocks are indexed by it or by one
of its ancestors, so every whole block of every stored snapshot is found. A fork child shares every
block with its parent and writes nothing.

Works inside a caller's transaction; imports neither vLLM nor torch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb
import xxhash
from processfork.store.digest import canonical_json, cid_from_key, cid_key
from processfork.store.errors import StoreError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "INDEX_DB",
    "INDEX_META_KEY",
    "PrefixHit",
    "block_bytes",
    "block_chain",
    "build_index",
    "count_dangling",
    "drop_dangling",
    "drop_snapshot",
    "index_snapshot",
    "inherit_partition",
    "longest_prefix",
    "owner_root",
    "partition_root",
]

INDEX_DB = "prefix"
#: meta record written in the transaction that builds the index of an older store
INDEX_META_KEY = b"index:prefix"
_BLOCK = b"h"  # h + chain hash (16) + cid (32) -> seq (u32 BE), block (u32 BE)
_OWNER = b"c"  # c + cid (32) -> partition root (16), then the chain hashes it indexed (16 each)
_ENTRY = struct.Struct(">II")
_log = logging.getLogger("processfork.store")


@dataclass(frozen=True)
class PrefixHit:
    """Blocks ``0 .. blocks - 1`` of the request are blocks of sequence ``seq`` of ``cid``."""

    cid: str
    seq: int
    blocks: int


def partition_root(fingerprint: dict[str, Any], cache_salt: str | None = None) -> bytes:
    """The chain's starting value: the engine fingerprint and the salt, hashed together."""
    return xxhash.xxh3_128_digest(
        canonical_json({"cache_salt": cache_salt, "fingerprint": fingerprint})
    )


def block_bytes(tokens: Any, i: int, block_size: int) -> bytes:
    """Block ``i``'s token ids as int32 little-endian; only that block is converted (a
    request's tokens are a Python list: converting all of them would cost more than the
    lookup)."""
    part = tokens[i * block_size : (i + 1) * block_size]
    if hasattr(part, "tobytes"):  # a stored token array
        return part.astype("<i4", copy=False).tobytes()
    return struct.pack(f"<{block_size}i", *part)


def block_chain(root: bytes, tokens: Any, block_size: int, start: bytes | None = None,
                first: int = 0, count: int | None = None) -> list[bytes]:
    """Chain hashes of whole blocks ``first .. first + count - 1`` of ``tokens``.

    ``start`` is the hash of block ``first - 1`` (``root`` when ``first`` is 0). Block ``i``'s
    hash is xxh3-128 of the previous hash followed by its tokens as int32 little-endian.
    """
    whole = len(tokens) // block_size
    end = whole if count is None else min(whole, first + count)
    prev = root if start is None else start
    out = []
    if hasattr(tokens, "tobytes"):  # a stored token array: converted once, cut per block
        raw = tokens[first * block_size : end * block_size].astype("<i4", copy=False).tobytes()
        step = 4 * block_size
        for at in range(0, len(raw), step):
            prev = xxhash.xxh3_128_digest(prev + raw[at : at + step])
            out.append(prev)
        return out
    for i in range(first, end):
        prev = xxhash.xxh3_128_digest(prev + block_bytes(tokens, i, block_size))
        out.append(prev)
    return out


def _holder(
    cur: lmdb.Cursor, snapshots: lmdb.Cursor, chain: bytes
) -> tuple[str, int, int] | None:
    """A live snapshot indexed under ``chain``: (cid, seq, block)."""
    prefix = _BLOCK + chain
    if not cur.set_range(prefix):
        return None
    while True:
        key = bytes(cur.key())
        if not key.startswith(prefix):
            return None
        cid_raw = key[len(prefix):]
        # An entry whose snapshot is gone (a writer that does not keep the index deleted it)
        # is skipped, never served.
        if snapshots.set_key(cid_raw):
            seq, block = _ENTRY.unpack(bytes(cur.value()))
            return cid_from_key(cid_raw), seq, block
        if not cur.next():
            return None


def longest_prefix(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    root: bytes,
    tokens: Any,
    block_size: int,
    *,
    first: int,
    limit: int,
) -> PrefixHit | None:
    """The longest run of whole blocks ``0 .. k - 1`` (``first < k <= limit``) that a stored
    snapshot of partition ``root`` holds; ``None`` when block ``first`` is not stored.

    Hashes blocks ``0 .. first - 1`` without looking them up (the caller has them already), then
    looks blocks up from ``first`` on and stops at the first miss: a miss costs one lookup.
    """
    if INDEX_DB not in dbs or limit <= first:
        return None
    chain = block_chain(root, tokens, block_size, count=first)
    prev = chain[-1] if chain else root
    cur = txn.cursor(db=dbs[INDEX_DB])
    snapshots = txn.cursor(db=dbs["snapshots"])
    best: PrefixHit | None = None
    for i in range(first, limit):
        prev = xxhash.xxh3_128_digest(prev + block_bytes(tokens, i, block_size))
        found = _holder(cur, snapshots, prev)
        if found is None or found[2] != i:
            break
        best = PrefixHit(found[0], found[1], i + 1)
    return best


def _common_blocks(a: np.ndarray, b: np.ndarray, block_size: int) -> int:
    import numpy as np

    n = min(len(a), len(b)) // block_size * block_size
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    same = n if len(diff) == 0 else int(diff[0])
    return same // block_size


def _tokens(txn: lmdb.Transaction, dbs: dict[str, Any], digest_hex: str) -> np.ndarray:
    import numpy as np

    raw = txn.get(bytes.fromhex(digest_hex), db=dbs["blobs"])
    return np.frombuffer(bytes(raw or b""), dtype="<i4")


def owner_root(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str) -> bytes | None:
    """The partition root a snapshot was indexed under; None when it was not indexed."""
    raw = txn.get(_OWNER + cid_key(cid), db=dbs[INDEX_DB])
    return None if raw is None else bytes(raw[:16])


def index_snapshot(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    cid: str,
    manifest: Any,
    *,
    cache_salt: str | None = None,
    share_with_parents: bool = True,
    root: bytes | None = None,
) -> int:
    """Index the whole blocks of a just-written snapshot; the number of entries written.

    Blocks a sequence shares with a sequence of a parent in the same partition are left to that
    parent. A manifest without an integer ``block_size`` in its fingerprint is not indexed.
    ``root`` names the partition directly (a fetched snapshot: the remote's prefix record says
    which one it was stored in; the salt itself is not known there).
    """
    if INDEX_DB not in dbs:
        return 0
    block_size = manifest.fingerprint.get("block_size")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        return 0
    db = dbs[INDEX_DB]
    owner_key = _OWNER + cid_key(cid)
    if txn.get(owner_key, db=db) is not None:
        return 0  # indexed already (the same manifest written twice)
    if root is None:
        root = partition_root(manifest.fingerprint, cache_salt)
    parent_seqs: list[np.ndarray] = []
    if share_with_parents:
        from processfork.store.manifest import stored_sequences
        from processfork.store.snapshots import load_stored

        for parent in manifest.parents:
            if owner_root(txn, dbs, parent) != root:
                continue
            for seq in stored_sequences(load_stored(txn, dbs, parent)):
                parent_seqs.append(_tokens(txn, dbs, seq["tokens"]["digest"]))
    written: list[bytes] = []
    for s, seq in enumerate(manifest.sequences):
        toks = _tokens(txn, dbs, seq.tokens.digest)
        skip = max((_common_blocks(toks, p, block_size) for p in parent_seqs), default=0)
        chain = block_chain(root, toks, block_size)
        key = cid_key(cid)
        txn.cursor(db=db).putmulti(
            [(_BLOCK + chain[i] + key, _ENTRY.pack(s, i)) for i in range(skip, len(chain))]
        )
        written += chain[skip:]
    txn.put(owner_key, root + b"".join(written), db=db)
    return len(written)


def inherit_partition(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str, parent: str) -> None:
    """A fork child: no entries of its own (its parent's cover every block), but the parent's
    partition, so that a snapshot continuing the child shares the blocks it has."""
    if INDEX_DB not in dbs:
        return
    root = owner_root(txn, dbs, parent)
    if root is not None:
        txn.put(_OWNER + cid_key(cid), root, db=dbs[INDEX_DB])


def drop_snapshot(txn: lmdb.Transaction, dbs: dict[str, Any], cid_raw: bytes) -> int:
    """Delete every index entry of a snapshot (by its 32-byte key); how many."""
    if INDEX_DB not in dbs:
        return 0
    db = dbs[INDEX_DB]
    raw = txn.get(_OWNER + cid_raw, db=db)
    if raw is None:
        return 0
    raw = bytes(raw)
    n = 0
    for off in range(16, len(raw), 16):
        n += bool(txn.delete(_BLOCK + raw[off : off + 16] + cid_raw, db=db))
    txn.delete(_OWNER + cid_raw, db=db)
    return n


def drop_dangling(txn: lmdb.Transaction, dbs: dict[str, Any]) -> int:
    """Delete the entries of every snapshot the store no longer has; how many snapshots.

    gc runs it after its sweep when there are any: a sweep on a full disk deletes snapshots
    without their entries (the deletions that disk still has room for), and a writer that does
    not know the index deletes snapshots without theirs."""
    gone = _dangling(txn, dbs)
    for cid_raw in gone:
        drop_snapshot(txn, dbs, cid_raw)
    return len(gone)


def count_dangling(txn: lmdb.Transaction, dbs: dict[str, Any]) -> int:
    """How many snapshots the index still has entries of but the store does not."""
    return len(_dangling(txn, dbs))


def _dangling(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[bytes]:
    if INDEX_DB not in dbs:
        return []
    snapshots = txn.cursor(db=dbs["snapshots"])
    owners = txn.cursor(db=dbs[INDEX_DB])
    gone: list[bytes] = []
    if owners.set_range(_OWNER):
        for key in owners.iternext(values=False):
            key = bytes(key)
            if key[:1] != _OWNER:
                break
            if not snapshots.set_key(key[1:]):
                gone.append(key[1:])
    return gone


def build_index(txn: lmdb.Transaction, dbs: dict[str, Any]) -> int:
    """Index every stored snapshot (a store written before the index existed); entries written.

    Snapshots are indexed parents first, so children share their parents' entries as they would
    have at commit. Fork children share every block with their parent and write none.
    """
    from processfork.store.snapshots import load_manifest

    manifests: dict[str, Any] = {}
    for key in list(txn.cursor(db=dbs["snapshots"]).iternext(values=False)):
        cid = cid_from_key(bytes(key))
        try:
            manifests[cid] = load_manifest(txn, dbs, cid)
        except (StoreError, ValueError) as exc:  # damaged: fsck reports it; it stays unindexed
            _log.warning("prefix index: snapshot %s not indexed: %s", cid, exc)
    done: set[str] = set()
    total = 0

    def visit(cid: str) -> None:
        nonlocal total
        stack = [cid]
        while stack:
            top = stack[-1]
            pending = [p for p in manifests[top].parents if p in manifests and p not in done]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if top not in done:
                done.add(top)
                total += index_snapshot(txn, dbs, top, manifests[top])

    for cid in manifests:
        visit(cid)
    return total


def check_index(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[tuple[str, str, str]]:
    """fsck's view of the index: (kind, object, message) for every record that is malformed
    (`bad-index`), that names a snapshot the store does not have (`dangling-index`), or that its
    snapshot's `c` record does not account for (`bad-index`)."""
    if INDEX_DB not in dbs:
        return []
    issues: list[tuple[str, str, str]] = []
    listed: set[bytes] = set()
    snapshots = txn.cursor(db=dbs["snapshots"])
    entries = txn.cursor(db=dbs[INDEX_DB])
    for key, value in txn.cursor(db=dbs[INDEX_DB]):
        key, value = bytes(key), bytes(value)
        if key[:1] != _OWNER:
            continue
        if len(key) != 33 or len(value) < 16 or len(value) % 16:
            issues.append(("bad-index", key.hex(), "malformed snapshot record"))
            continue
        cid = cid_from_key(key[1:])
        if not snapshots.set_key(key[1:]):
            issues.append(("dangling-index", cid, "index record of a missing snapshot"))
        for off in range(16, len(value), 16):
            entry = _BLOCK + value[off : off + 16] + key[1:]
            listed.add(entry)
            if not entries.set_key(entry):
                issues.append(("bad-index", cid, f"block {value[off:off + 16].hex()} not indexed"))
    for key, value in txn.cursor(db=dbs[INDEX_DB]):
        key = bytes(key)
        if key[:1] == _OWNER:
            continue
        if key[:1] != _BLOCK or len(key) != 49 or len(value) != _ENTRY.size:
            issues.append(("bad-index", key.hex(), "malformed index entry"))
        elif key not in listed:
            issues.append(("bad-index", key.hex(),
                           f"entry of {cid_from_key(key[17:])} its snapshot record does not list"))
    return issues


def entries_of(txn: lmdb.Transaction, dbs: dict[str, Any], cid: str) -> Sequence[bytes]:
    """The chain hashes a snapshot indexed (tests and fsck)."""
    raw = txn.get(_OWNER + cid_key(cid), db=dbs[INDEX_DB]) if INDEX_DB in dbs else None
    raw = bytes(raw or b"")
    return [raw[off : off + 16] for off in range(16, len(raw), 16)]
