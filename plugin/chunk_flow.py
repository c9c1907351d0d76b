"""Work on consecutive chunks by a team of threads, each chunk handed on in order.

A load fills staging slots chunk by chunk and hands each filled chunk to the device. Run as one
queueing thread that submits a chunk's slices to a pool, waits for all of them, hands the chunk
on and only then submits the chunk that reuses its slot, every chunk costs that thread a round
trip through the pool and a wait for the device while the pool's threads sit idle. Here the
threads take the units of all chunks in order themselves:

- a thread that takes a unit of chunk ``c`` first waits until chunk ``c - lag`` (the chunk that
  last used the same slot) has been handed on, and calls ``free(c)`` (waits for the device to
  have read that slot), then does the unit;
- the thread that completes a chunk hands it on (``hand(c)``), and every completed chunk after
  it, in chunk order; one thread hands on at a time.

Each unit is Python calls under the GIL, so units must stay few (one per thread per chunk): with
4 MiB units, 12 threads on a 16-core host spent most of a load waiting for the GIL. Loads that
copy out of the store's map run the same flow in C instead (``native_pages.PageFlow``); this one
serves the ``pread`` and per-page Python readers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

__all__ = ["ChunkFlow", "Unit"]

Unit = tuple[int, int, int]  # (chunk, lo, hi): a range of the chunk's items


class ChunkFlow:
    """Units of chunks ``0..chunks-1`` (in chunk order) run by ``threads`` threads of a pool."""

    def __init__(self, units: Sequence[Unit], *, lag: int,
                 work: Callable[[int, int, int], None], hand: Callable[[int], None],
                 free: Callable[[int], None] = lambda _: None):
        self.units = units
        self.lag = lag
        self.work = work
        self.hand = hand
        self.free = free
        self._left: dict[int, int] = {}
        for chunk, _, _ in units:
            self._left[chunk] = self._left.get(chunk, 0) + 1
        self._chunks = sorted(self._left)
        self._turn = threading.Condition()
        self._taken = 0  # units taken so far
        self._handed = 0  # chunks handed on so far (in order: ``self._chunks[:handed]``)
        self._complete: set[int] = set()
        self._handing = False
        self._freed: set[int] = set()
        self._error: BaseException | None = None

    def run(self, pool: Executor, threads: int) -> None:
        """Run every unit and hand on every chunk; the first error is raised once no thread of
        the flow runs any more (the units may read buffers that end when this returns)."""
        if not self.units:
            return
        runners = [pool.submit(self._runner) for _ in range(max(1, min(threads, len(self.units))))]
        for runner in runners:
            runner.exception()
        if self._error is not None:
            raise self._error
        if self._handed != len(self._chunks):
            raise RuntimeError(f"{len(self._chunks) - self._handed} chunks were not handed on")

    def _runner(self) -> None:
        while True:
            with self._turn:
                if self._error is not None or self._taken == len(self.units):
                    return
                chunk, lo, hi = self.units[self._taken]
                self._taken += 1
                # The chunk that used this chunk's slot before must have been handed on.
                while (self._error is None and self._handed < len(self._chunks)
                       and self._chunks[self._handed] <= chunk - self.lag):
                    self._turn.wait()
                if self._error is not None:
                    return
            try:
                if chunk not in self._freed:
                    self.free(chunk)
                    self._freed.add(chunk)
                self.work(chunk, lo, hi)
            except BaseException as exc:  # noqa: BLE001 - raised by run
                self._fail(exc)
                return
            with self._turn:
                self._left[chunk] -= 1
                if self._left[chunk]:
                    continue
                self._complete.add(chunk)
                if self._handing:
                    continue  # the thread handing on now takes this chunk too
                self._handing = True
            if not self._hand_on():
                return

    def _hand_on(self) -> bool:
        """Hand on completed chunks in order while the next one is complete; False on error."""
        while True:
            with self._turn:
                if (self._error is not None or self._handed == len(self._chunks)
                        or self._chunks[self._handed] not in self._complete):
                    self._handing = False
                    return self._error is None
                chunk = self._chunks[self._handed]
            try:
                self.hand(chunk)
            except BaseException as exc:  # noqa: BLE001 - raised by run
                self._fail(exc)
                return False
            with self._turn:
                self._complete.discard(chunk)
                self._handed += 1
                self._turn.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._turn:
            if self._error is None:
                self._error = exc
            self._turn.notify_all()
