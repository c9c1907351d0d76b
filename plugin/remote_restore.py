"""Transparent restores through a remote (`pf serve --remote`).  Runs in EngineCore.

A client request whose prompt starts with blocks that no local snapshot holds may still find
them on the server's remote. Asking the remote per request would put a network round trip on
every miss, so this module keeps the remote's prefix records in memory
(`processfork.store.remote.prefix.PrefixCatalog`): read at engine start, then refreshed in the
background every `remote_refresh_s` seconds. A lookup is an in-memory walk of the request's
chain hashes; a request that matches nothing costs no request to the remote.

When a request's prompt does match a remote snapshot, the snapshot is fetched on a thread of
its own (the engine loop never waits on the network): manifests first, refused before any page
moves when their fingerprint is not this engine's, then the pages the store lacks in parallel
range reads, each verified, committed and indexed like a `pf fetch`. Meanwhile the scheduler
side answers vLLM "not ready, ask later" for the request, and once the fetch has committed,
the local prefix index finds the snapshot and the request loads it as any transparent restore
does. A fetch that fails lets its requests compute; the snapshot is not tried again for a while.
The fetch records the snapshot in the store's FETCH_HEAD reflog, in the transaction that commits
it: no ref names it, and a local gc keeps it until that entry expires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from processfork.store import Store
    from processfork.store.prefix_index import PrefixHit
    from processfork.store.remote.prefix import PrefixCatalog

__all__ = ["RemoteRestorer", "RemoteStats"]

logger = logging.getLogger("processfork.plugin.remote_restore")

#: After a failed fetch, requests for the same snapshot compute for this long before it is
#: tried again.
RETRY_AFTER_S = 60.0
PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass
class RemoteStats:
    """Counters since the engine started (the scheduler side's ``take_stats``)."""

    fetches: int = 0  # snapshots fetched for transparent restores
    fetch_failures: int = 0
    fetched_bytes: int = 0
    waits: int = 0  # requests that waited for a fetch


@dataclass
class _Fetch:
    status: str
    since: float


class RemoteRestorer:
    """The remote's prefix catalog, refreshed in the background, and the fetches it starts."""

    def __init__(
        self,
        url: str,
        store: Store,
        fingerprint: Callable[[], Mapping[str, Any] | None],
        *,
        refresh_s: float = 30.0,
        start_wait_s: float = 10.0,
    ) -> None:
        from processfork.store.remote import INDEX_CACHE_DIR, open_remote
        from processfork.store.remote.prefix import PrefixCatalog

        self.url = url
        self.store = store
        self._fingerprint = fingerprint
        self.refresh_s = refresh_s
        self.stats = RemoteStats()
        cache = os.path.join(store.env.path, INDEX_CACHE_DIR)
        self.catalog: PrefixCatalog = PrefixCatalog(open_remote(url, reuse=True), cache_dir=cache)
        self._fetches: dict[str, _Fetch] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pf-remote-fetch")
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="pf-remote-refresh",
                                        daemon=True)
        self._thread.start()
        # The first listing usually takes milliseconds; a request that arrives before it ends
        # simply computes. An unreachable remote does not hold the engine's start for long.
        self._first.wait(start_wait_s)

    # -- the catalog -----------------------------------------------------------------------------
    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                count = self.catalog.refresh()
                if self.catalog.refreshes == 1:
                    logger.info("processfork: remote %s has %d snapshots to restore from",
                                self.url, count)
            except Exception as exc:  # noqa: BLE001 - whatever the remote did: retry at the next refresh
                logger.warning("processfork: cannot read remote %s: %s", self.url, exc)
            self._first.set()
            self._stop.wait(self.refresh_s)

    def find(
        self, root: bytes, tokens: Any, block_size: int, *, first: int, limit: int
    ) -> PrefixHit | None:
        """The longest prefix of `tokens` a remote snapshot holds (in memory; never raises)."""
        try:
            return self.catalog.longest(root, tokens, block_size, first=first, limit=limit)
        except Exception:
            logger.exception("processfork: remote prefix lookup failed; computing instead")
            return None

    # -- fetches ---------------------------------------------------------------------------------
    def status(self, cid: str) -> str:
        """Where the fetch of `cid` stands: pending, done or failed; started when there is none
        (or when it failed long enough ago)."""
        with self._lock:
            state = self._fetches.get(cid)
            now = time.monotonic()
            if state is not None:
                if state.status == PENDING:
                    return PENDING
                if state.status == FAILED and now - state.since < RETRY_AFTER_S:
                    return FAILED
                if state.status == DONE and self._stored(cid):
                    return DONE
            self._fetches[cid] = _Fetch(PENDING, now)
        self._pool.submit(self._fetch, cid)
        return PENDING

    def _stored(self, cid: str) -> bool:
        try:
            return self.store.has_snapshot(cid)
        except Exception:  # noqa: BLE001 - a store that cannot answer holds nothing to load
            return False

    def _fetch(self, cid: str) -> None:
        from processfork.store.remote.fetch import fetch

        from .fingerprint import Fingerprint

        status = FAILED
        try:
            engine = self._fingerprint()
            record = self.catalog.record(cid)
            if engine is None or record is None:
                raise RuntimeError("the engine's fingerprint or the snapshot's record is missing")
            mine = Fingerprint.from_json(engine)

            def accept(manifests: Mapping[str, dict[str, Any]]) -> None:
                mismatch = mine.first_mismatch(manifests[cid].get("fingerprint") or {})
                if mismatch is not None:
                    raise RuntimeError(
                        f"it was taken with {mismatch.field}={mismatch.stored!r}, this engine "
                        f"has {mismatch.field}={mismatch.engine!r}; nothing was fetched")

            t0 = time.perf_counter()
            result = fetch(self.store.env, self.catalog.remote, cids=[cid], accept=accept,
                           roots={cid: record.root}, reason="a transparent restore")
            self.stats.fetches += 1
            self.stats.fetched_bytes += result.bytes
            logger.info("processfork: fetched %s from %s for a restore: %d pages, %.1f MiB "
                        "in %.2f s", cid[:19], self.url, result.pages, result.bytes / 2**20,
                        time.perf_counter() - t0)
            status = DONE
        except Exception as exc:  # noqa: BLE001 - a failed fetch only makes the request compute
            self.stats.fetch_failures += 1
            logger.warning("processfork: restore of %s from remote %s failed, computing "
                           "instead: %s", cid[:19], self.url, exc)
        finally:
            with self._lock:
                self._fetches[cid] = _Fetch(status, time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
