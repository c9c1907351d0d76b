"""Sessions: a client request that names a session is committed to the store when it finishes.
Runs in EngineCore, for the scheduler side.

A completion or chat request with ``kv_transfer_params: {"processfork": {"session": NAME}}``
becomes one turn of the session: its prompt and output, every token the engine computed (all
but the last sampled one), become a snapshot on the ref ``sessions/NAME``. The blocks the store
already holds (found through the prefix index when the request is admitted) are not saved again;
the others are copied by the worker in the engine steps that compute them, each step's pages
under a job of their own (``<job>.<first block>``); a partial last block gets no page (the
manifest's ``paged_tokens`` says so: a checkout never loads it, and the next turn stores it
whole). The worker's page writer makes them durable after the step returns, each
job's record with its pages. When the request finishes, a background thread waits for those
records and commits the turn in one transaction (``processfork.store.sessions``), so neither the
engine step nor the response waits for a disk flush. A model with several KV-cache groups saves
each group's blocks under jobs of their own (``plugin/session_groups.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .jobs import PARAMS_KEY, JobRecord, job_meta_key

if TYPE_CHECKING:
    from processfork.store import Store
    from processfork.store.prefix_index import PrefixHit
    from processfork.store.sessions import TurnResult

    from .session_groups import TurnGroupSpec

__all__ = ["DEFAULT_PREFIX", "SessionCommitter", "SessionState", "session_ref"]

logger = logging.getLogger("processfork.plugin.sessions")

#: Where session refs live: ``sessions/NAME``.
DEFAULT_PREFIX = "sessions/"
#: How long a turn's commit waits for the job record of one of its steps' saves.
RECORD_WAIT_S = 120.0
#: ... and at most this long once the engine shuts down.
CLOSE_WAIT_S = 10.0


def session_ref(kv_transfer_params: Any, prefix: str = DEFAULT_PREFIX) -> tuple[str | None, str]:
    """The ref a client request's session commits to, or (None, why not).

    Only a request that names a session and carries no control-plane op is a session turn.
    """
    if not isinstance(kv_transfer_params, dict):
        return None, ""
    params = kv_transfer_params.get(PARAMS_KEY)
    if not isinstance(params, dict) or "session" not in params or "op" in params:
        return None, ""
    name = params["session"]
    if not isinstance(name, str) or not name:
        return None, "session must be a non-empty string"
    from processfork.store.errors import InvalidName
    from processfork.store.refs import validate_ref_name

    ref = prefix + name
    try:
        validate_ref_name(ref)
    except InvalidName as exc:
        return None, str(exc)
    return ref, ""


@dataclass
class SessionState:
    """A session request while it runs."""

    job: str
    ref: str
    cache_salt: str | None
    base: PrefixHit | None  # the blocks the store held when the request was admitted
    next_block: int  # first block not yet handed to the worker
    block_ids: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # the job id of each step's save
    # Several KV-cache groups (plugin/session_groups.py), None with one: each group's block
    # table, its first block not yet handed over, its saves' jobs, and the blocks held for it.
    group_ids: list[list[int]] | None = None
    group_next: list[int] = field(default_factory=list)
    group_steps: list[list[str]] = field(default_factory=list)
    held: dict[tuple[int, int], Any] | None = None

    def all_steps(self) -> list[str]:
        """Every save job of the turn so far (each one's pin and record)."""
        return self.steps + [job for jobs in self.group_steps for job in jobs]

    def step_job(self) -> str:
        return f"{self.job}.{self.next_block}"


@dataclass(frozen=True)
class TurnSpec:
    """What a finished session request leaves to commit."""

    ref: str
    tokens: list[int]
    base: PrefixHit | None
    steps: list[str]
    fingerprint: dict[str, Any]
    cache_salt: str | None
    block_size: int
    #: Several KV-cache groups: each group's blocks and saves (``steps`` lists all the saves).
    groups: list[TurnGroupSpec] | None = None


class SessionCommitter:
    """Commits finished turns one after another, on a thread of its own."""

    def __init__(self, store: Store, prefix: str = DEFAULT_PREFIX):
        self.store = store
        try:
            # `pf gc --session-ttl` expires the refs under the prefixes servers recorded.
            store.record_session_prefix(prefix)
        except Exception:  # sessions still commit; gc falls back on the default prefix
            logger.exception("processfork: could not record the session prefix %r", prefix)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pf-session")
        self._pending: list[Future[Any]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._closing_deadline = 0.0
        self.committed = 0
        self.failed = 0
        self.blocks_saved = 0

    def submit(self, spec: TurnSpec) -> None:
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(self._commit, spec))

    def discard(self, steps: list[str]) -> None:
        """Drop the pins and records of a turn that will not be committed (aborted)."""
        if steps:
            with self._lock:
                self._pending.append(self._pool.submit(self._discard, steps))

    def flush(self) -> None:
        """Wait for every commit submitted so far."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        # The worker writes what its steps queued before it stops; a turn whose records never
        # come (the worker died) fails after a short wait instead of holding up the shutdown.
        self._closing_deadline = time.monotonic() + CLOSE_WAIT_S
        self._closing.set()
        self._pool.shutdown(wait=True)

    # -- on the committer's thread ---------------------------------------------------------
    def _commit(self, spec: TurnSpec) -> TurnResult | None:
        from processfork.store.sessions import SessionTurn, TurnGroup

        try:
            base = spec.base
            base_blocks = base.blocks if base is not None else 0
            whole = len(spec.tokens) // spec.block_size
            groups: list[TurnGroup] | None = None
            pages: list[tuple[str, str]] = []
            if spec.groups is not None:
                groups = []
                for g, part in enumerate(spec.groups):
                    saved = self._pages_of(part.steps)
                    if part.first + part.base_blocks + len(saved) != part.end:
                        raise RuntimeError(
                            f"KV-cache group {g}: {part.base_blocks + len(saved)} blocks for its "
                            f"blocks {part.first}-{part.end - 1}")
                    groups.append(TurnGroup(part.first, part.base_blocks, saved, part.state))
                saved_blocks = sum(len(g.pages) for g in groups)
            else:
                pages = self._pages_of(spec.steps)
                saved_blocks = len(pages)
                if base_blocks + len(pages) != whole:
                    raise RuntimeError(f"{base_blocks + len(pages)} blocks saved for the "
                                       f"{whole} whole blocks of {len(spec.tokens)} tokens")
            turn = SessionTurn(
                ref=spec.ref,
                tokens=spec.tokens,
                base=base.cid if base is not None else None,
                base_seq=base.seq if base is not None else 0,
                base_blocks=base_blocks,
                pages=pages,
                paged_tokens=whole * spec.block_size,
                fingerprint=spec.fingerprint,
                cache_salt=spec.cache_salt,
                groups=groups,
                drop_pins=spec.steps,
                drop_meta=[job_meta_key(s) for s in spec.steps],
            )
            result = self.store.commit_turn(turn)
        except Exception:
            self.failed += 1
            logger.exception("processfork: could not commit a turn of %s", spec.ref)
            self._drop(spec.steps)
            return None
        self.committed += 1
        self.blocks_saved += saved_blocks
        logger.debug("processfork: %s -> %s", spec.ref, result.cid)
        return result

    def _pages_of(self, steps: list[str]) -> list[tuple[str, str]]:
        """The pages the saves ``steps`` stored, in order, once each one's record is in."""
        pages: list[tuple[str, str]] = []
        for step in steps:
            record = self._wait_for_record(step)
            if not record.succeeded:
                raise RuntimeError(f"the save of step {step} did not succeed: "
                                   f"{record.error or 'not final'}")
            pages += record.pages
        return pages

    def _wait_for_record(self, step: str) -> JobRecord:
        """A step's job record. The worker's page writer commits it with the step's pages after
        the engine step has returned, so it may not be there yet: a turn is committed only once
        every page it names is durable."""
        deadline = time.monotonic() + RECORD_WAIT_S
        pause = 0.002
        while True:
            raw = self.store.meta_get(job_meta_key(step))
            if raw is not None:
                record = JobRecord.from_json(raw)
                if record.settled:
                    return record
            now = time.monotonic()
            if now >= deadline or (self._closing.is_set() and now >= self._closing_deadline):
                raise RuntimeError(f"the save of step {step} left no record in "
                                   f"{RECORD_WAIT_S:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _discard(self, steps: list[str]) -> None:
        """Drop an aborted turn's saves once the worker has written them: its page writer may
        still hold a step's pages, and would otherwise pin them after the drop (until gc finds
        the pin stale)."""
        for step in steps:
            try:
                self._wait_for_record(step)
            except RuntimeError:
                pass  # never written (the worker stopped): nothing will come to drop
        self._drop(steps)

    def _drop(self, steps: list[str]) -> None:
        for step in steps:
            try:
                self.store.drop_pin(step)
                self.store.meta_delete(job_meta_key(step))
            except Exception:
                logger.exception("processfork: could not drop the pin of %s", step)
