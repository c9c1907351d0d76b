"""The worker's background page writer: pages copied out of the KV blocks in an engine step are
hashed, written and made durable on a thread of their own, after the step has returned.

A save that somebody waits for (a snapshot, whose route answers once the request finishes) is
written inside the step. A session turn's saves are not waited for: their pages are copied out of
the blocks in the step (the blocks may be reused once it returns), then queued here. The writer
takes every queued job at once and writes them in ONE transaction, each job's pages with its pin
and its job record, so the engine step never waits for a disk flush and a turn of many steps
costs few flushes. The turn itself is committed (in EngineCore) only once every job record it
names is in the store, so a snapshot never names a page that is not durable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from processfork.store import page_digest

if TYPE_CHECKING:
    from processfork.store import PutResult, Store

__all__ = ["PageWriter", "QueuedPages"]

logger = logging.getLogger("processfork.plugin.page_writer")


@dataclass
class QueuedPages:
    """One job's pages, owned by the writer: ``(digest or None, bytes or None)``. A missing
    digest is computed on the writer's thread; a missing page is one the store already holds."""

    job: str
    pages: Sequence[tuple[bytes | None, Any]]
    #: the meta records committed with the pages (the job's record), from the put's result
    meta: Callable[[PutResult], Mapping[str, dict[str, Any]]]
    #: called on the writer's thread when the write failed (record the failure)
    failed: Callable[[BaseException], None]


class PageWriter:
    """One thread that drains a queue of jobs' pages into the store, many jobs per commit."""

    def __init__(self, store: Callable[[], Store]):
        self._store = store
        self._queue: list[QueuedPages] = []
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="processfork-page-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: QueuedPages) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the page writer is closed")
            self._queue.append(job)
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until everything submitted so far is written (or has failed)."""
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()

    def close(self) -> None:
        """Write what is queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
                self._busy = True
            try:
                self._write(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, batch: list[QueuedPages]) -> None:
        try:
            groups = [
                (job.job, [(page_digest(p) if d is None else d, p) for d, p in job.pages],
                 job.meta)
                for job in batch
            ]
            self._store().put_page_groups(groups)
        except Exception as exc:  # noqa: BLE001 - recorded per job: the turn fails, not the engine
            logger.warning("processfork: background save of %d jobs failed: %s", len(batch), exc)
            for job in batch:
                try:
                    job.failed(exc)
                except Exception:  # the store itself is failing; the warning above remains
                    logger.exception("processfork: could not record the failure of %s", job.job)
