"""Checkout loads on the CPU backend, pipelined with the forward pass that consumes them.

A checkout's engine step loads the stored pages into freshly allocated blocks and then runs the
forward pass over the remaining prompt tokens.  Loading synchronously in ``start_load_kv`` would
put the whole copy (and its verification) in front of the forward pass.  Instead:

- a helper thread copies the pages straight from the store's memory map into the KV blocks
  (one copy, no staging tensor), layer by layer: all blocks of layer 0, then layer 1, ...;
- vLLM calls ``wait_for_layer_load(layer)`` right before each attention layer runs, which waits
  only for that layer, so layer i+1 is copied while layer i computes;
- the pages' digests are checked after the copies, still off the forward's path; the step's
  ``get_block_ids_with_load_errors`` waits for that check and reports any block whose page was
  missing or corrupt, and vLLM then discards the step's output for that request and recomputes
  the blocks (the same path as any failed connector load).

The thread runs on a core outside the worker's OpenMP cores when there is one (vLLM's automatic
binding reserves such a core whenever a KV connector is configured); otherwise it shares the
worker's core and the load costs what a synchronous one would.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from processfork.store import Store, page_digest
from vllm.logger import init_logger

from .block_views import BlockViews

logger = init_logger(__name__)

__all__ = ["LoadItem", "LoadTicket", "PipelinedLoader"]


@dataclass(frozen=True)
class LoadItem:
    """One block to fill: its engine block id and the digests of its K and V pages."""

    block_id: int
    k_digest: bytes
    v_digest: bytes
    job: str


@dataclass
class LoadTicket:
    """One step's loads: per-layer readiness, then the verification outcome."""

    items: list[LoadItem]
    layers: list[threading.Event]
    done: threading.Event = field(default_factory=threading.Event)
    bad_blocks: set[int] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)  # job -> message

    def wait_layer(self, index: int) -> None:
        self.layers[index].wait()

    def wait(self) -> None:
        self.done.wait()

    def fail(self, items: Sequence[LoadItem], message: str) -> None:
        for item in items:
            self.bad_blocks.add(item.block_id)
            self.failures.setdefault(item.job, message)


class PipelinedLoader:
    """A helper thread that runs tickets one at a time; see the module docstring."""

    def __init__(self, store: Store, writer: BlockViews, *, verify: bool, page_bytes: int):
        self.store = store
        self.writer = writer
        self.verify = verify
        self.page_bytes = page_bytes
        self._queue: queue.SimpleQueue[LoadTicket | None] = queue.SimpleQueue()
        self._spare_cpus = _spare_cpus()
        self._thread = threading.Thread(target=self._run, name="processfork-loader", daemon=True)
        self._thread.start()

    def submit(self, items: list[LoadItem]) -> LoadTicket:
        ticket = LoadTicket(items, [threading.Event() for _ in range(self.writer.num_layers)])
        self._queue.put(ticket)
        return ticket

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- helper thread -------------------------------------------------------------------------
    def _run(self) -> None:
        if self._spare_cpus:
            try:
                os.sched_setaffinity(0, self._spare_cpus)  # this thread only
            except OSError:
                pass
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            try:
                self._load(ticket)
            except Exception as exc:  # noqa: BLE001 - reported as failed blocks, never raised
                logger.warning("processfork: load failed: %s", exc)
                ticket.fail(ticket.items, f"{type(exc).__name__}: {exc}")
            finally:
                for event in ticket.layers:
                    event.set()
                ticket.done.set()

    def _load(self, ticket: LoadTicket) -> None:
        items = ticket.items
        keys = [d for item in items for d in (item.k_digest, item.v_digest)]
        self.store.with_page_views(keys, lambda views: self._copy(ticket, views))

    def _copy(self, ticket: LoadTicket, views: list[memoryview]) -> None:
        w, items = self.writer, ticket.items
        for view in views:
            if len(view) != self.page_bytes:
                raise ValueError(f"stored page of {len(view)} bytes, expected {self.page_bytes}")
        ks = [w.k_page(views[2 * i]) for i in range(len(items))]
        vs = [w.v_page(views[2 * i + 1]) for i in range(len(items))]
        blocks = [item.block_id for item in items]
        copyto = np.copyto
        for layer in range(w.num_layers):
            k_dst, v_dst = w.k[layer], w.v[layer]
            for b, k, v in zip(blocks, ks, vs):
                copyto(k_dst[b], k[layer])
                copyto(v_dst[b], v[layer])
            ticket.layers[layer].set()
        if not self.verify:
            return
        for i, item in enumerate(items):
            for view, digest in ((views[2 * i], item.k_digest), (views[2 * i + 1], item.v_digest)):
                if page_digest(view) != digest:
                    ticket.fail([item], f"CorruptPage: page {digest.hex()} does not match its "
                                        "digest")


def _spare_cpus() -> set[int]:
    """Cores this process may use besides the calling thread's (the worker's OpenMP cores)."""
    try:
        own = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set()
    return set(range(os.cpu_count() or 1)) - own

