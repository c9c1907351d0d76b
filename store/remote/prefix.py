"""Prefix records: what a remote tells a server about the prompts its snapshots can serve.

A push writes, next to each snapshot it sends, a small record `prefix/<cid hex>`: the snapshot's
partition root (the hash of its engine fingerprint and `cache_salt`, docs/format.md "prefix")
and the chain hash of every whole block of every sequence. A server with a remote keeps all of
them in memory (`PrefixCatalog`), so it can tell whether a request's prompt starts with a
remote snapshot's blocks without asking the remote anything per request. A fetch also reads the
root from the record, so the local prefix index files a fetched snapshot under the partition it
was stored in, not under the null salt.

A record is not trusted for content: whatever it points to is fetched (every object verified),
indexed from its own token ids, and loaded only when the local index then finds it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lmdb
import xxhash
from processfork.store.digest import canonical_json, is_cid
from processfork.store.manifest import stored_sequences
from processfork.store.prefix_index import (
    INDEX_DB,
    PrefixHit,
    block_bytes,
    block_chain,
    owner_root,
)
from processfork.store.remote import layout
from processfork.store.snapshots import load_stored

if TYPE_CHECKING:
    from processfork.store.env import Env
    from processfork.store.remote.remote import Remote

__all__ = ["PrefixCatalog", "PrefixRecord", "local_record", "needs_record", "read_records"]

RECORD_FORMAT = "processfork-prefix"
_HASH = 16


@dataclass(frozen=True)
class PrefixRecord:
    """A snapshot's partition root and, per sequence, the chain hashes of its whole blocks."""

    cid: str
    root: bytes
    block_size: int
    chains: tuple[bytes, ...]  # per sequence: 16 bytes per whole block, from block 0

    def encode(self) -> bytes:
        return canonical_json({
            "block_size": self.block_size,
            "chains": [c.hex() for c in self.chains],
            "cid": self.cid,
            "format": RECORD_FORMAT,
            "root": self.root.hex(),
            "version": 1,
        })

    @classmethod
    def decode(cls, cid: str, raw: bytes) -> PrefixRecord:
        """Parse the record of `cid`; ValueError when it is anything else."""
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT or d.get("version") != 1:
            raise ValueError("not a prefix record of version 1")
        if d.get("cid") != cid:
            raise ValueError(f"a prefix record of {d.get('cid')!r}, not of {cid}")
        root = bytes.fromhex(str(d.get("root")))
        block_size = d.get("block_size")
        chains = d.get("chains")
        if (len(root) != _HASH or isinstance(block_size, bool) or not isinstance(block_size, int)
                or block_size <= 0 or not isinstance(chains, list)):
            raise ValueError("malformed prefix record")
        parsed = tuple(bytes.fromhex(c) for c in chains if isinstance(c, str))
        if len(parsed) != len(chains) or any(len(c) % _HASH for c in parsed):
            raise ValueError("malformed chain hashes")
        return cls(cid, root, block_size, parsed)

    def blocks(self, seq: int) -> int:
        return len(self.chains[seq]) // _HASH


def needs_record(env: Env, cids: Iterable[str]) -> list[str]:
    """The snapshots of `cids` that get a record: all but fork children, whose parent's record
    covers every block (a fetch files a child under its parent's partition)."""

    def run(txn: lmdb.Transaction) -> list[str]:
        return [c for c in cids if load_stored(txn, env.dbs, c).get("fork") is None]

    return env.read(run, buffers=True)


def local_record(env: Env, cid: str) -> PrefixRecord | None:
    """The record of a stored snapshot, from its prefix-index partition and its token ids; None
    when the store has not indexed it (no integer block size, or a store without the index)."""

    import numpy as np

    def run(txn: lmdb.Transaction) -> PrefixRecord | None:
        if INDEX_DB not in env.dbs:
            return None
        root = owner_root(txn, env.dbs, cid)
        d = load_stored(txn, env.dbs, cid)
        block_size = (d.get("fingerprint") or {}).get("block_size")
        if root is None or isinstance(block_size, bool) or not isinstance(block_size, int):
            return None
        chains = []
        for seq in stored_sequences(d):
            raw = txn.get(bytes.fromhex(seq["tokens"]["digest"]), db=env.dbs["blobs"])
            tokens = np.frombuffer(bytes(raw or b""), dtype="<i4")
            chains.append(b"".join(block_chain(root, tokens, block_size)))
        return PrefixRecord(cid, root, block_size, tuple(chains))

    return env.read(run, buffers=True)


def read_records(
    remote: Remote, cids: Iterable[str], *, cache_dir: str | None = None
) -> dict[str, PrefixRecord]:
    """The records the remote has for `cids` (a cid without one, or with a malformed one, is
    left out: snapshots pushed by earlier versions have none). Cached in `cache_dir`: a record
    never changes once written."""
    wanted = [c for c in dict.fromkeys(cids) if is_cid(c)]

    def one(cid: str) -> PrefixRecord | None:
        cached = _cache_path(cache_dir, cid)
        if cached is not None:
            try:
                with open(cached, "rb") as f:
                    return PrefixRecord.decode(cid, f.read())
            except (OSError, ValueError):
                pass
        got = remote.store.get(layout.prefix_path(cid))
        if got is None:
            return None
        try:
            record = PrefixRecord.decode(cid, got.data)
        except ValueError:
            return None
        _write_cache(cached, got.data)
        return record

    return {c: r for c, r in zip(wanted, remote._map(one, wanted)) if r is not None}


def _cache_path(cache_dir: str | None, cid: str) -> str | None:
    return None if cache_dir is None else os.path.join(cache_dir, cid[7:] + ".prefix")


def _write_cache(path: str | None, raw: bytes) -> None:
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache costs one more GET next time


class PrefixCatalog:
    """Every prefix record of a remote, in memory: chain hash -> the snapshot block that has it.

    `refresh` lists the records (one LIST request, plus one GET per record not seen before, and
    none for records cached on disk) and swaps the new map in; `longest` is a pure in-memory
    walk, so a request that matches nothing costs no request to the remote. Safe to read from
    one thread while another refreshes.
    """

    def __init__(self, remote: Remote, *, cache_dir: str | None = None) -> None:
        self.remote = remote
        self.cache_dir = cache_dir
        self._records: dict[str, PrefixRecord] = {}
        self._map: dict[bytes, tuple[str, int, int]] = {}
        self._lock = threading.Lock()  # one refresh at a time
        self.refreshes = 0

    def __len__(self) -> int:
        return len(self._records)

    def record(self, cid: str) -> PrefixRecord | None:
        return self._records.get(cid)

    def refresh(self) -> int:
        """Bring the catalog up to the remote's records now; how many it holds."""
        with self._lock:
            if not self.remote.check_format(create=False):
                listed: list[str] = []
            else:
                listed = [c for c in (layout.prefix_cid_of(o.key)
                                      for o in self.remote.store.list(layout.PREFIXES)) if c]
            listed_set = set(listed)
            new = [c for c in listed if c not in self._records]
            fresh = read_records(self.remote, new, cache_dir=self.cache_dir)
            gone = [c for c in self._records if c not in listed_set]
            records = {c: r for c, r in self._records.items() if c in listed_set}
            records.update(fresh)
            if gone:  # a remote gc removed some: rebuild without them
                table: dict[bytes, tuple[str, int, int]] = {}
                for record in records.values():
                    _add(table, record)
                self._map = table
            else:  # only additions: extend the live map in place (dict writes are atomic)
                for record in fresh.values():
                    _add(self._map, record)
            self._records = records
            self.refreshes += 1
            return len(records)

    def longest(
        self, root: bytes, tokens: Any, block_size: int, *, first: int, limit: int
    ) -> PrefixHit | None:
        """The longest run of whole blocks `0 .. k - 1` (`first < k <= limit`) of `tokens` that a
        remote snapshot of partition `root` holds, as the local prefix index answers it."""
        table = self._map
        if not table or limit <= first:
            return None
        chain = block_chain(root, tokens, block_size, count=first)
        prev = chain[-1] if chain else root
        best: PrefixHit | None = None
        for i in range(first, limit):
            prev = xxhash.xxh3_128_digest(prev + block_bytes(tokens, i, block_size))
            found = table.get(prev)
            if found is None or found[2] != i:
                break
            best = PrefixHit(found[0], found[1], i + 1)
        return best


def _add(table: dict[bytes, tuple[str, int, int]], record: PrefixRecord) -> None:
    for seq, chain in enumerate(record.chains):
        for i in range(0, len(chain), _HASH):
            table.setdefault(chain[i : i + _HASH], (record.cid, seq, i // _HASH))
