"""Which stored blocks continue a request's tokens.  Runs in EngineCore, for the scheduler side.

The scheduler side asks this on a prefix-cache miss (transparent restore) and when a session
request is admitted (which blocks its commit can take from the store). The answer comes from the
store's prefix index (``processfork.store.prefix_index``), in the partition of this engine's
fingerprint and the request's ``cache_salt``: a request never sees pages stored by another engine
layout or under another salt.

The store is opened on first use, in this process. The fingerprint is the one the worker
published when it registered its KV cache; until it has, every lookup misses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from processfork.store.prefix_index import PrefixHit, partition_root

from .jobs import engine_meta_key

if TYPE_CHECKING:
    from processfork.store import Store

__all__ = ["RESTORE_JOB_PREFIX", "LookupStats", "PrefixLookup", "is_restore_job"]

logger = logging.getLogger("processfork.plugin.prefix_lookup")

#: Job ids of transparent restores start with this.  Nobody waits for their outcome, so the worker
#: writes no job record for them (a failed page is recomputed and logged, as for a checkout).
RESTORE_JOB_PREFIX = "restore-"


def is_restore_job(job: str) -> bool:
    return job.startswith(RESTORE_JOB_PREFIX)


@dataclass
class LookupStats:
    """Counters since the engine started (logged; the scheduler side's ``stats``)."""

    lookups: int = 0
    hits: int = 0
    restored_requests: int = 0
    restored_tokens: int = 0
    failed_blocks: int = 0


class PrefixLookup:
    """Longest stored whole-block prefix of a request, in this engine's partition."""

    def __init__(self, store_path: str, engine_id: str, block_size: int):
        self.store_path = store_path
        self.engine_id = engine_id
        self.block_size = block_size
        self.stats = LookupStats()
        self._store: Store | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._roots: dict[str | None, bytes] = {}

    @property
    def store(self) -> Store:
        if self._store is None:
            from processfork.store import Store

            self._store = Store(self.store_path)
        return self._store

    def fingerprint(self) -> dict[str, Any] | None:
        """The engine's fingerprint, once the worker has published it."""
        if self._fingerprint is None:
            record = self.store.meta_get(engine_meta_key(self.engine_id))
            if isinstance(record, dict) and isinstance(record.get("fingerprint"), dict):
                self._fingerprint = record["fingerprint"]
        return self._fingerprint

    def root(self, cache_salt: str | None) -> bytes | None:
        root = self._roots.get(cache_salt)
        if root is None:
            fingerprint = self.fingerprint()
            if fingerprint is None:
                return None
            root = self._roots[cache_salt] = partition_root(fingerprint, cache_salt)
        return root

    def longest(
        self, tokens: Any, cache_salt: str | None, *, first: int, limit: int
    ) -> PrefixHit | None:
        """Blocks ``0 .. hit.blocks - 1`` of ``tokens`` are stored (``first < hit.blocks <=
        limit``); ``None`` when block ``first`` is not. Never raises: a store that cannot be read
        is a miss (and a log line)."""
        if limit <= first:
            return None
        self.stats.lookups += 1
        try:
            root = self.root(cache_salt)
            if root is None:
                return None
            hit = self.store.longest_prefix(
                root, tokens, self.block_size, first=first, limit=limit
            )
        except Exception:
            logger.exception("processfork: prefix lookup failed; computing instead")
            return None
        if hit is not None:
            self.stats.hits += 1
        return hit

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
