"""Pages between the store and KV blocks through staging buffers: the GPU path.

A GPU's KV blocks cannot be written from the store's memory map directly, so pages travel
through host staging buffers. Allocating and filling those on every checkout (one pinned
allocation of the whole transfer, one thread hashing everything, one synchronisation per copy)
is what made a 32K-token checkout of an 8B model take 3.3 s for 4 GiB. Here instead:

- a fixed pool of staging *slots* (pinned host chunks, each with a device twin) is allocated
  once, when the worker registers its KV cache;
- a transfer is cut into chunks of one slot; chunks flow through the slots in turn, so the host
  work on one chunk (memcpy from the memory map, xxh3 of the pages) overlaps the device work on
  the previous ones (host-to-device copy, scatter into the blocks);
- host work is spread over a thread pool that takes units of every chunk in order: pages are
  copied out of the store's map (verified as they are copied) by threads that stay in C for the
  whole load (``NativePages.flow``), or read with ``preadv`` from the store's data file into the
  pinned chunk (``page_file.py``) and verified there, a unit per call (``chunk_flow.py``);
- device work runs on a side stream and is ordered against the engine's stream with stream
  waits, never with a host synchronisation per page or chunk: the forward pass that reads the
  loaded blocks simply queues behind the scatter;
- saves gather a chunk's blocks on the device, copy the chunk to its pinned slot in one
  device-to-host copy, hash it in threads while the next chunks are gathered and copied, and
  hand it to one writer thread that puts it into LMDB; chunks that are ready while the writer
  waits for the disk share its next commit.

The same code runs on CPU tensors (no streams, no pinning), which is how CI exercises it end to
end through vLLM's CPU backend (``kv_connector_extra_config: {"page_path": "staged"}``).
"""

from __future__ import annotations

import itertools
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from processfork.store import Store, page_digest

from .chunk_flow import ChunkFlow, Unit
from .codec import PageCodec
from .connector_config import PAGE_READERS
from .head_pages import split_heads
from .host_tier import HostTier
from .native_pages import NativePages, native_pages, view_addresses
from .page_file import RUN_BYTES, PageFile

__all__ = ["LoadOutcome", "StagedPagePath", "default_copy_threads", "default_page_reader",
           "staging_options"]

MiB = 1 << 20
#: Default pinned staging memory per worker: 4 slots of 128 MiB.
DEFAULT_STAGING_MIB = 512
DEFAULT_SLOTS = 4
#: Whether copies out of the store's map write past the CPU's caches by default.
DEFAULT_STREAMING_STORES = True
#: Device memory the host slots are copied into on a GPU, at least: loads scatter a quarter of it
#: at a time, so small host slots do not cost kernel launches per layer each.
DEVICE_STAGING_MIB = 512
#: Page bytes a copy thread takes at a time during a load out of the map (in C): small, so that
#: threads that finish early take more of a chunk.
UNIT_BYTES = 2 * MiB

T = TypeVar("T")
PageItems = list[tuple[bytes, memoryview | None]]  # None: the page is in the store already
#: ``commit(items, num_blocks, last)`` stores the pages of one or more consecutive chunks (one
#: durable commit); runs on the writer thread. ``last``: the save's final chunk is among them.
Commit = Callable[[PageItems, int, bool], None]


def default_copy_threads(native: bool = True) -> int:
    """Host threads for page copies and hashing: three quarters of the cores, at most 12, with
    the compiled page reader; half the cores, at most 12, without it.

    On a 16-core H200 host (``bench/page_path_bench.py``, 4 GiB): with the compiled reader a
    load ran at 26.5 GB/s with 12 threads, 20.9 with 8 and 15.9 with 16 (past 12 the threads
    contend for the cores that the worker's own thread, the API server and EngineCore keep
    busy, and for memory bandwidth beside the device copies). With one Python call per page,
    8 threads were fastest: more threads queued for the GIL.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(12, cores * 3 // 4 if native else cores // 2))


def staging_options(staging_mib: int | None, slots: int | None,
                    streaming_stores: bool | None) -> dict[str, Any]:
    """``StagedPagePath`` keyword arguments for the connector settings a user gave (None: the
    path's own default)."""
    options: dict[str, Any] = {}
    if staging_mib is not None:
        options["staging_bytes"] = staging_mib * MiB
    if slots is not None:
        options["slots"] = slots
    if streaming_stores is not None:
        options["streaming_stores"] = streaming_stores
    return options


def default_page_reader() -> str:
    """``map`` on x86-64, ``pread`` elsewhere.

    Copying a page out of the store's memory map with the digest computed a piece at a time
    just before each piece is copied, and the copy's stores streamed past the caches, reads
    every byte from memory once and writes it once; ``pread`` + xxh3 also reads each
    destination line before writing it, and reads the page again to hash it where it has left
    the cache. Streaming stores are compiled on x86-64 only.
    """
    return "map" if platform.machine().lower() in ("x86_64", "amd64") else "pread"


@dataclass
class LoadOutcome:
    """Blocks whose pages were missing or corrupt (vLLM recomputes them), and why, per job."""

    bad_blocks: set[int] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)

    def fail(self, block_id: int, job: str, message: str) -> None:
        self.bad_blocks.add(block_id)
        self.failures.setdefault(job, message)


@dataclass
class _Slot:
    host: torch.Tensor  # [chunk, 2, layers, elems]: pinned on a GPU
    device: torch.Tensor | None  # its twin on the GPU (None on CPU)
    rows: np.ndarray  # host as [2 * chunk, page_bytes] uint8, for memcpy and hashing
    done: torch.cuda.Event | None = None  # device work on this slot finished
    busy: Future[None] | None = None  # hashing or the writer holds this slot's pages until then


@dataclass
class _SavedChunk:
    """One chunk of a save between its copy to the host and its commit."""

    rows: np.ndarray | None  # its pages, in its slot; None: named from memory, not copied
    blocks: int
    last: bool
    digests: list[bytes]
    ids: list[int] = field(default_factory=list)  # its blocks
    hashed: Future[list[bool]] = field(default_factory=Future)  # which pages are stored already
    released: Future[None] = field(default_factory=Future)  # the slot's bytes are not needed
    committed: Future[None] = field(default_factory=Future)


class StagedPagePath:
    """Loads and saves of whole blocks through a fixed pool of staging slots."""

    def __init__(
        self,
        codec: PageCodec,
        *,
        verify: bool,
        staging_bytes: int = DEFAULT_STAGING_MIB * MiB,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
        tier: HostTier | None = None,
        run_bytes: int = RUN_BYTES,
        remember: bool = False,
        native: bool = True,
        reader: str = "auto",
        streaming_stores: bool = DEFAULT_STREAMING_STORES,
        device_staging_bytes: int = DEVICE_STAGING_MIB * MiB,
    ):
        self.codec = codec
        # Reads and hashes a thread's whole slice in one call without the GIL (native_pages.py);
        # None: one Python call per page to read and one to hash.
        self.native: NativePages | None = native_pages() if native else None
        self.run_bytes = run_bytes  # page bytes read per ``preadv`` at most (``page_file.py``)
        if reader not in PAGE_READERS:
            raise ValueError(f"page_reader must be one of {', '.join(PAGE_READERS)} "
                             f"(got {reader!r})")
        # Copy pages out of the store's map (``map``) or ``pread`` them from its data file: both
        # through the compiled reader; without it, a Python call per page reads with ``pread``.
        if reader == "auto":
            reader = default_page_reader()
        self.from_map = (reader == "map" and self.native is not None
                         and (self.native.copies_from_map or not verify))
        self.streaming_stores = streaming_stores
        # Which pages each block holds, for blocks this path saved or loaded (and verified) and
        # nobody has written since: a later save of such a block names its pages without a
        # device copy or a hash. ``forget`` must be told of every block an engine step writes
        # afresh (plugin/scheduler_side.py ``fresh_blocks``), before the step's saves.
        self.remember = remember
        # K, V of a whole block; K, V of each head in head order for pages of one KV head.
        self._known: dict[int, tuple[bytes, ...]] = {}
        self.verify = verify
        self.page_bytes = codec.page_bytes
        self.cuda = codec.device.type == "cuda"
        per_slot = max(2 * self.page_bytes, staging_bytes // max(1, slots))
        self.chunk_blocks = max(1, per_slot // (2 * self.page_bytes))
        self.threads = threads or default_copy_threads(self.native is not None)
        nslots = max(2, slots)
        # On a GPU, loads copy each host slot into the next place of a device ring and scatter
        # the ring a batch of chunks at a time (a quarter of the ring): small host slots do not
        # cost 2 x layers kernel launches each, and a slot is filled again as soon as its copy
        # to the ring is done, not after the scatter. The slots' own device twins (saves gather
        # into them) are the ring's first chunks; a load from the host tier, which needs no host
        # slots, uses the ring whole.
        ring_chunks = max(nslots, -(-device_staging_bytes // (2 * self.page_bytes
                                                              * self.chunk_blocks)))
        self._batch_chunks = max(1, ring_chunks // 4)
        self._ring_chunks = -(-ring_chunks // self._batch_chunks) * self._batch_chunks
        g = codec.geometry
        self._device = (torch.empty((self._ring_chunks * self.chunk_blocks, 2, g.num_layers,
                                     g.elems_per_layer), dtype=g.dtype, device=codec.device)
                        if self.cuda else None)
        self._slots = [self._new_slot(i) for i in range(nslots)]
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="processfork-copy")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="processfork-writer")
        self._stream = torch.cuda.Stream(codec.device) if self.cuda else None
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._ready: list[_SavedChunk] = []
        self.tier = tier
        # Recorded after each load's copies out of the tier: a tier slot is rewritten only once
        # the copies that read it are done.
        self._fence: torch.cuda.Event | None = None

    @property
    def reader_description(self) -> str:
        if self.native is None:
            return "a Python call per page"
        return ("compiled page reader, copies from the store's map" if self.from_map
                else "compiled page reader, pread")

    @property
    def staging_bytes(self) -> int:
        return len(self._slots) * self.chunk_blocks * 2 * self.page_bytes

    def _new_slot(self, index: int) -> _Slot:
        host = self.codec.new_staging(self.chunk_blocks)
        rows = host.view(torch.uint8).numpy().reshape(2 * self.chunk_blocks, self.page_bytes)
        device = None
        if self._device is not None:
            device = self._device[index * self.chunk_blocks : (index + 1) * self.chunk_blocks]
        return _Slot(host=host, device=device, rows=rows)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.tier is not None:
            self._wait_fence()
            self.tier.close()
            self.tier = None

    def warm_up(self) -> float:
        """Pay at engine start what a load would otherwise pay inside the first checkout after a
        restart, the one users wait for: every copy thread started, and on a GPU the side
        stream, a pinned upload of block ids, an event, and the first launch of the gather,
        copy and scatter kernels (CUDA loads a kernel's module on its first launch). Block 0 is
        gathered and written back unchanged, before the engine has run a step. Returns the
        seconds it took."""
        started = time.perf_counter()
        barrier = threading.Barrier(self.threads)
        waits = [self._pool.submit(barrier.wait, 30) for _ in range(self.threads)]
        for wait in waits:  # each waits for all: the pool starts a thread per task
            try:
                wait.result()
            except threading.BrokenBarrierError:
                pass  # a thread that did not start now starts on the first load
        if self._stream is not None and self._device is not None:
            slot = self._slots[0]
            with torch.cuda.stream(self._stream):
                idx = self._index([0])
                ring = self._device[:1]
                self.codec.gather_on_device(idx, ring)
                slot.host[:1].copy_(ring, non_blocking=True)
                ring.copy_(slot.host[:1], non_blocking=True)
                self.codec.scatter_on_device(idx, ring)
                slot.done = self._record(slot.done)
            slot.done.synchronize()
        return time.perf_counter() - started

    # -- loads -----------------------------------------------------------------------------
    def load(
        self, store: Store, block_ids: Sequence[int], digests: Sequence[bytes],
        jobs: Sequence[str],
    ) -> LoadOutcome:
        """Fill ``block_ids[i]`` with pages ``digests[2i]`` (K) and ``digests[2i + 1]`` (V).

        Returns when the host is done with the store's buffers; on a GPU the device work is
        queued ahead of whatever the engine's stream runs next. A missing page fails the whole
        transfer (raised); a corrupt one fails its block only.
        """
        self.forget(block_ids)
        outcome = None
        if self.tier is not None:
            outcome = self._load_through_tier(store, block_ids, digests, jobs)
        if outcome is None and self._flows_in_c:
            outcome = store.with_page_lookup(
                lambda lookup, base, path: self._load_looked_up(block_ids, lookup, digests, jobs),
            )
        if outcome is None:
            outcome = store.with_page_locations(
                list(digests),
                lambda views, base, path: self._load_views(
                    block_ids, views, digests, jobs, self._source(path, base)
                ),
            )
        if self.remember and self.verify:
            for i, block in enumerate(block_ids):
                if block not in outcome.bad_blocks:
                    self._known[block] = (bytes(digests[2 * i]), bytes(digests[2 * i + 1]))
        return outcome

    def forget(self, block_ids: Iterable[int]) -> None:
        """The blocks' contents are about to change: stop naming their pages from memory."""
        if self._known:
            drop = self._known.pop
            for block in block_ids:
                drop(block, None)

    def _source(self, path: str, map_base: int | None) -> PageFile:
        return PageFile(self._file(path), map_base, run_bytes=self.run_bytes,
                        native=self.native, from_map=self.from_map,
                        streaming_stores=self.streaming_stores)

    def _file(self, path: str) -> int | None:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError:
                return None
        return fd

    @property
    def reports_missing_pages(self) -> bool:
        """Whether a load fails just the blocks of pages the store lacks (``LoadOutcome``),
        so its caller need not look for them first: loads through the flow in C look every
        page up themselves. Other loads fail whole when a page is missing."""
        return self.tier is None and self._flows_in_c

    @property
    def _flows_in_c(self) -> bool:
        """Whether loads copy out of the store's map with the whole flow in C."""
        return self.from_map and self.native is not None and (
            not self.verify or self.native.copies_from_map)

    def _handlers(self, block_ids: Sequence[int]
                  ) -> tuple[Callable[[int], None], Callable[[int], None]]:
        """``hand(c)``: chunk ``c``, complete in its slot, toward its blocks; ``free(c)``:
        wait until chunk ``c``'s slot has been read by the device, so ``c`` may fill it."""
        if self._stream is not None:
            # Blocks just handed to this request may still be read by the engine's previous
            # step: the side stream starts after everything queued so far.
            self._stream.wait_stream(torch.cuda.current_stream(self.codec.device))
        nslots = len(self._slots)
        chunk_blocks = self.chunk_blocks
        chunks = -(-len(block_ids) // chunk_blocks)
        batch: list[int] = []  # blocks whose pages are on the device ring, not yet scattered

        def free(c: int) -> None:
            done = self._slots[c % nslots].done
            if c >= nslots and done is not None:
                done.synchronize()  # the slot's previous chunk has left the host buffer

        def hand(c: int) -> None:
            ids = list(block_ids[c * chunk_blocks : (c + 1) * chunk_blocks])
            batch.extend(ids)
            ends_batch = (c + 1) % self._batch_chunks == 0 or c + 1 == chunks
            self._to_blocks(self._slots[c % nslots], c, ids, list(batch) if ends_batch else None)
            if ends_batch:
                batch.clear()

        return hand, free

    def _outcome(self, block_ids: Sequence[int], digests: Sequence[bytes], jobs: Sequence[str],
                 wrong: Iterable[int], missing: Iterable[int] = ()) -> LoadOutcome:
        """The blocks of the pages that did not match or are not in the store, after the
        device work is ordered before the engine's next."""
        outcome = LoadOutcome()
        for page in missing:
            outcome.fail(block_ids[page // 2], jobs[page // 2],
                         f"MissingObject: page {digests[page].hex()} is not in the store")
        for i in sorted({page // 2 for page in wrong}):
            outcome.fail(block_ids[i], jobs[i],
                         f"CorruptPage: page {digests[2 * i].hex()} or "
                         f"{digests[2 * i + 1].hex()} of block {block_ids[i]} "
                         "does not match its digest")
        if self._stream is not None:
            torch.cuda.current_stream(self.codec.device).wait_stream(self._stream)
        return outcome

    def _load_views(
        self, block_ids: Sequence[int], views: list[memoryview], digests: Sequence[bytes],
        jobs: Sequence[str], source: PageFile,
    ) -> LoadOutcome:
        for view in views:
            if len(view) != self.page_bytes:
                raise ValueError(f"stored page of {len(view)} bytes, expected {self.page_bytes}")
        # Chunks flow through the slots: the copy threads take the units of every chunk in
        # order, each slot filled again as soon as the device has read its previous chunk, and
        # each completed chunk is handed to the device in order. Copies out of the store's map
        # run the whole flow in C (``_load_looked_up``); the other readers run it in Python
        # (``chunk_flow.py``: whoever completes a chunk hands it on).
        hand, free = self._handlers(block_ids)
        wrong = self._flow_in_python(views, digests, source, hand, free)
        return self._outcome(block_ids, digests, jobs, wrong)

    def _load_looked_up(
        self, block_ids: Sequence[int], lookup: Callable[[Sequence[bytes]], list[Any]],
        digests: Sequence[bytes], jobs: Sequence[str],
    ) -> LoadOutcome:
        """The load with the whole flow in C, its pages looked up a chunk at a time: the copy
        threads start on the first chunk's pages while this thread looks up the rest (at 128K
        tokens, 16,384 lookups are tens of milliseconds that used to come before the first
        copy). A page the store lacks fails its block, as a corrupt one does."""
        assert self.native is not None
        hand, free = self._handlers(block_ids)
        nslots = len(self._slots)
        per_chunk = 2 * self.chunk_blocks
        unit_pages = max(2, UNIT_BYTES // self.page_bytes // 2 * 2)
        flow = self.native.flow(np.zeros(len(digests), dtype=np.uint64),
                                [slot.rows for slot in self._slots],
                                digests if self.verify else None, unit_pages=unit_pages,
                                streaming_stores=self.streaming_stores, published=0)
        sources, missing = flow.sources, []
        views: list[Any] = []  # the map's pages the threads read, held until the flow ends
        runners: list[Future[None]] = []
        handed = 0

        def hand_on(c: int) -> None:
            hand(c)
            if c + nslots < flow.chunks:
                free(c + nslots)
                flow.release(c + nslots)

        try:
            for c in range(flow.chunks):
                lo, hi = c * per_chunk, min(len(digests), (c + 1) * per_chunk)
                found = lookup(digests[lo:hi])
                present = [v for v in found if v is not None]
                for view in present:
                    if len(view) != self.page_bytes:
                        raise ValueError(f"stored page of {len(view)} bytes, expected "
                                         f"{self.page_bytes}")
                if len(present) == len(found):
                    sources[lo:hi] = view_addresses(found)
                else:
                    places = [lo + i for i, v in enumerate(found) if v is not None]
                    missing += [lo + i for i, v in enumerate(found) if v is None]
                    if present:
                        sources[places] = view_addresses(present)
                views += present
                flow.publish(hi)
                if not runners:
                    units = -(-len(digests) // unit_pages)
                    runners = [self._pool.submit(flow.work)
                               for _ in range(min(self.threads, units))]
                while handed <= c and flow.done(handed):  # hand on what is copied meanwhile
                    hand_on(handed)
                    handed += 1
            for c in range(handed, flow.chunks):
                flow.wait(c)
                hand_on(c)
        except BaseException:
            flow.cancel()
            raise
        finally:
            # The threads read the store's buffers, which end with the read transaction.
            for runner in runners:
                runner.exception()
            wrong = flow.mismatched()
            flow.close()
        return self._outcome(block_ids, digests, jobs, wrong, missing)

    def _flow_in_python(self, views: list[memoryview], digests: Sequence[bytes],
                        source: PageFile, hand: Callable[[int], None],
                        free: Callable[[int], None]) -> list[int]:
        """The load through ``ChunkFlow``: each chunk cut into one unit per thread (each unit is
        Python calls under the GIL), read with the compiled ``pread`` reader or per page."""
        nslots = len(self._slots)
        first_of = 2 * self.chunk_blocks
        verify = self.verify
        wrong: list[int] = []

        def work(c: int, lo: int, hi: int) -> None:
            rows = self._slots[c % nslots].rows
            bad = source.read_checked(rows[lo - c * first_of : hi - c * first_of], views[lo:hi],
                                      digests[lo:hi] if verify else None)
            wrong.extend([lo + i for i in bad])  # extending by a list is atomic under the GIL

        units: list[Unit] = []
        for c, first in enumerate(range(0, len(views), first_of)):
            end = min(first + first_of, len(views))
            step = max(2, -(-(end - first) // self.threads // 2) * 2)
            units += [(c, lo, min(lo + step, end)) for lo in range(first, end, step)]
        ChunkFlow(units, lag=nslots, work=work, hand=hand, free=free).run(self._pool, self.threads)
        return wrong

    def _to_blocks(self, slot: _Slot, chunk: int, ids: list[int],
                   scatter: list[int] | None) -> None:
        """Chunk ``chunk``'s pages (in ``slot``) toward blocks ``ids``: on a GPU, copied to its
        place in the device ring, and when ``scatter`` is given, the ring's batch that this chunk
        ends (blocks ``scatter``, this chunk's last) written into the blocks."""
        n = len(ids)
        if self._stream is None:
            self.codec.scatter(ids, slot.host[:n])
            return
        assert self._device is not None
        at = (chunk % self._ring_chunks) * self.chunk_blocks
        with torch.cuda.stream(self._stream):
            self._device[at : at + n].copy_(slot.host[:n], non_blocking=True)
            slot.done = self._record(slot.done)  # the host slot can be filled again after this
            if scatter:
                # A batch's chunks lie one after another: every chunk but a transfer's last is
                # whole, and batches never wrap around the ring.
                first = at + n - len(scatter)
                self.codec.scatter_on_device(self._index(scatter), self._device[first : at + n])

    # -- loads through the host tier ---------------------------------------------------------
    def _load_through_tier(
        self, store: Store, block_ids: Sequence[int], digests: Sequence[bytes],
        jobs: Sequence[str],
    ) -> LoadOutcome | None:
        """Copy every page to the GPU straight from the host tier; None when it cannot hold them.

        Pages the tier lacks are first read from the store into free tier slots (the same
        ``preadv`` the staging slots get, so a miss costs what a load without the tier costs and
        leaves the page in the tier). A chunk's device copy waits only for its own reads; pages
        already in the tier are copied at once and checked in the threads meanwhile.
        """
        tier = self.tier
        assert tier is not None
        slots = tier.lookup(digests)
        missing = [i for i, s in enumerate(slots) if s is None]
        fresh: list[int] = []
        if missing:
            hits = [s for s in slots if s is not None]
            fresh = tier.reserve(len(missing), keep=hits, before_reuse=self._wait_fence)
            if len(fresh) < len(missing):
                tier.release(fresh)
                return None
            for i, slot in zip(missing, fresh):
                slots[i] = slot
        placed: list[int] = [s for s in slots if s is not None]
        try:
            if missing:
                result = store.with_page_locations(
                    [digests[i] for i in missing],
                    lambda views, base, path: self._copy_from_tier(
                        block_ids, placed, digests, jobs, missing, views,
                        self._source(path, base)),
                )
            else:
                result = self._copy_from_tier(block_ids, placed, digests, jobs, [], [], None)
        except BaseException:
            tier.release(fresh)
            raise
        outcome, bad = result
        read = set(missing)
        tier.discard(digests[i] for i in bad if i not in read)
        for i in missing:
            if i not in bad:
                tier.publish(placed[i], digests[i])
        tier.release(placed[i] for i in missing if i in bad)
        return outcome

    def _copy_from_tier(
        self, block_ids: Sequence[int], slots: list[int], digests: Sequence[bytes],
        jobs: Sequence[str], missing: list[int], views: list[memoryview],
        source: PageFile | None,
    ) -> tuple[LoadOutcome, set[int]]:
        """The load's outcome, and the indexes of the pages that did not match their digests."""
        tier = self.tier
        assert tier is not None
        for view in views:
            if len(view) != self.page_bytes:
                raise ValueError(f"stored page of {len(view)} bytes, expected {self.page_bytes}")
        read_from = dict(zip(missing, views))
        outcome = LoadOutcome()
        bad: set[int] = set()
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.codec.device))
        # On a GPU no host slot is involved: a chunk fills the whole device ring.
        step = self._device.shape[0] if self._device is not None else self.chunk_blocks
        starts = list(range(0, len(block_ids), step))
        chunk_pages = [range(2 * s, min(2 * (s + step), len(digests))) for s in starts]

        def read(pages: list[int]) -> list[int]:
            """Read pages the tier lacked into their slots and check them: the bad ones."""
            assert source is not None
            rows = [tier.rows[slots[i]] for i in pages]
            wrong = source.read_checked(rows, [read_from[i] for i in pages],
                                        [digests[i] for i in pages] if self.verify else None)
            return [pages[j] for j in wrong]

        def verify(pages: list[int]) -> list[int]:
            """Check pages that were in the tier already: the bad ones."""
            found = self._digests([tier.rows[slots[i]] for i in pages])
            return [i for i, digest in zip(pages, found) if digest != digests[i]]

        # Per chunk: the reads it waits for first, then the checks of pages already in the tier,
        # which nothing waits for until the end.
        reads: list[list[Future[list[int]]]] = []
        checks: list[Future[list[int]]] = []
        for pages in chunk_pages:
            absent = [i for i in pages if i in read_from]
            present = [i for i in pages if i not in read_from] if self.verify else []
            reads.append(self._submit_pages(absent, read))
            checks += self._submit_pages(present, verify)
        try:
            for c, start in enumerate(starts):
                for future in reads[c]:
                    bad.update(future.result())
                ids = list(block_ids[start : start + step])
                self._tier_to_blocks(self._slots[c % len(self._slots)], ids,
                                     [slots[i] for i in chunk_pages[c]])
            for future in checks:
                bad.update(future.result())
        finally:
            for future in [f for fs in reads for f in fs] + checks:
                future.exception()
        if self._stream is not None:
            self._fence = self._record(None)
            torch.cuda.current_stream(self.codec.device).wait_stream(self._stream)
        for i in sorted(bad):
            block = i // 2
            outcome.fail(block_ids[block], jobs[block],
                         f"CorruptPage: page {digests[i].hex()} of block {block_ids[block]} does "
                         "not match its digest")
        return outcome, bad

    def _submit_pages(self, pages: list[int], work: Callable[[list[int]], T]) -> list[Future[T]]:
        """``work`` over ``pages`` in the pool, one slice per thread, K and V of a block together."""
        if not pages:
            return []
        return self._submit_slices(len(pages), lambda lo, hi: work(pages[lo:hi]))

    def _tier_to_blocks(self, slot: _Slot, ids: list[int], tier_slots: list[int]) -> None:
        """Copy a chunk's pages from their tier slots, one copy per run of adjacent slots: into
        the host ``slot`` on CPU, into the whole device buffer on a GPU."""
        tier = self.tier
        assert tier is not None
        n = len(ids)
        runs: list[tuple[int, int, int]] = []  # (first row, first tier slot, count)
        for row, ts in enumerate(tier_slots):
            if runs and runs[-1][1] + runs[-1][2] == ts:
                first, start, count = runs[-1]
                runs[-1] = (first, start, count + 1)
            else:
                runs.append((row, ts, 1))
        if self._stream is None:
            for row, ts, count in runs:
                slot.rows[row : row + count] = tier.rows[ts : ts + count]
            self.codec.scatter(ids, slot.host[:n])
            return
        assert self._device is not None
        source = self._tier_tensor()
        with torch.cuda.stream(self._stream):
            dst = self._device.view(-1).view(torch.uint8).view(-1, self.page_bytes)
            for row, ts, count in runs:
                dst[row : row + count].copy_(source[ts : ts + count], non_blocking=True)
            self.codec.scatter_on_device(self._index(ids), self._device[:n])

    def _tier_tensor(self) -> torch.Tensor:
        assert self.tier is not None
        tensor = getattr(self, "_tier_rows", None)
        if tensor is None:
            tensor = self._tier_rows = torch.from_numpy(self.tier.rows)
        return tensor

    def _wait_fence(self) -> None:
        if self._fence is not None:
            self._fence.synchronize()

    # -- saves -----------------------------------------------------------------------------
    def save(self, block_ids: Sequence[int], valid_in_last: int | None, commit: Commit,
             present: Callable[[list[bytes]], list[bool]] | None = None,
             reused: Callable[[int], None] | None = None,
             mask: Callable[[np.ndarray, np.ndarray], None] | None = None,
             heads: int = 0) -> int:
        """Gather blocks chunk by chunk and hand each chunk's hashed pages to ``commit``.

        ``commit`` runs on one writer thread, in chunk order (consecutive chunks that are ready
        together in one call), while the next chunks are being copied and hashed; the page
        buffers stay valid until it returns. The first
        exception (copy, hash or commit) is raised here, after the writer has stopped.

        A chunk's hashing runs in the pool while this thread queues the next chunks' gathers and
        copies, so the device copies one chunk while the host hashes the ones before; only a
        slot whose pages are still hashed or written holds this thread up.

        ``present(digests)`` (the store's page lookup) lets a chunk whose pages are all stored
        already hand ``commit`` digests only and free its slot once it is hashed: the writer
        then takes many such chunks per commit instead of holding four slots behind the disk.
        With ``present`` given, runs of blocks whose pages this path remembers (and the store
        still holds) are not copied or hashed at all: their chunks carry digests only.

        ``mask(k_page, v_page)`` zeroes, in place and before hashing, what a block's pages must
        not keep (the padding of a Mamba state block), so they hash as the direct path's do.

        ``heads`` > 0: pages of one KV head (format v4) of a tensor-parallel rank's ``heads``
        heads, K then V of each head of each block, as ``head_pages.split_heads`` cuts them. The
        cut is a permutation of the chunk's staged bytes done where they are gathered (on the
        device before the copy to the host on a GPU), so the slot's rows hold the head pages.

        Returns how many blocks were named from memory, and tells ``reused`` that count before
        the first commit (whose ``commit`` may record it with the save's last pages).
        """
        if heads and (mask is not None or self.tier is not None):
            # Neither is cut into heads: the connector refuses both at TP > 1 at start.
            raise ValueError("pages of one KV head are saved without a state mask or host tier")
        known = self._recall(block_ids, valid_in_last, present, 2 * max(1, heads))
        if reused is not None:
            reused(sum(1 for k in known if k is not None))
        chunks = self._save_chunks(len(block_ids), known)
        if not chunks:
            return 0
        if self._stream is not None and not all(k is not None for k in known):
            # The blocks were computed by work queued on the engine's stream.
            self._stream.wait_stream(torch.cuda.current_stream(self.codec.device))
        pending: list[_SavedChunk] = []
        copied = 0
        try:
            for lo, hi in chunks:
                ids = list(block_ids[lo:hi])
                last = hi == len(block_ids)
                if known[lo] is not None:
                    chunk = self._recalled_chunk(ids, last, known[lo:hi])
                    pending.append(chunk)
                    with self._lock:
                        self._ready.append(chunk)
                    self._writer.submit(self._commit_ready, commit)
                    continue
                slot = self._slots[copied % len(self._slots)]
                copied += 1
                if slot.busy is not None:
                    slot.busy.result()  # its pages are hashed, and written if any were new
                    slot.busy = None
                tail = valid_in_last if last else None
                if heads:
                    self._from_blocks_by_head(slot, ids, tail)
                else:
                    self._from_blocks(slot, ids)
                if tail is not None and not heads:
                    if slot.done is not None:
                        slot.done.synchronize()
                    self.codec.mask_tail(slot.host[len(ids) - 1], tail)
                if mask is not None:
                    if slot.done is not None:
                        slot.done.synchronize()
                    for i in range(len(ids)):
                        mask(slot.rows[2 * i], slot.rows[2 * i + 1])
                chunk = self._hash_in_pool(slot, len(ids), last, present, max(1, heads))
                chunk.ids = ids
                slot.busy = chunk.released
                pending.append(chunk)
                with self._lock:
                    self._ready.append(chunk)
                self._writer.submit(self._commit_ready, commit)
        finally:
            errors = []
            for chunk in pending:
                try:
                    chunk.committed.result()
                except BaseException as exc:  # noqa: BLE001 - the first is raised below
                    errors.append(exc)
            for slot in self._slots:
                slot.busy = None
            if errors:
                raise errors[0]
        self._remember_saved(pending, valid_in_last)
        return sum(chunk.blocks for chunk in pending if chunk.rows is None)

    def _recall(self, block_ids: Sequence[int], valid_in_last: int | None,
                present: Callable[[list[bytes]], list[bool]] | None, per_block: int = 2,
                ) -> list[tuple[bytes, ...] | None]:
        """Each block's remembered pages, where the store still holds them all (one lookup for
        all: a snapshot it deleted may have been collected since); None for the rest, and for
        blocks remembered as another number of pages than ``per_block``."""
        if not self.remember or present is None or not self._known:
            return [None] * len(block_ids)
        known = [self._known.get(block) for block in block_ids]
        known = [pages if pages is not None and len(pages) == per_block else None
                 for pages in known]
        if valid_in_last is not None and known:
            known[-1] = None  # a partial block is stored masked; the engine's block is not
        flat = [d for pair in known if pair is not None for d in pair]
        if not flat:
            return known
        stored = iter(present(flat))
        held = [None if pages is None else [next(stored) for _ in pages] for pages in known]
        return [pages if flags is not None and all(flags) else None
                for pages, flags in zip(known, held)]

    def _save_chunks(self, n: int, known: list[tuple[bytes, ...] | None]
                     ) -> list[tuple[int, int]]:
        """Block ranges in save order: each run of remembered blocks whole, the other runs cut
        into chunks of one staging slot."""
        chunks: list[tuple[int, int]] = []
        lo = 0
        while lo < n:
            hi = lo + 1
            if known[lo] is not None:
                while hi < n and known[hi] is not None:
                    hi += 1
            else:
                while hi < n and known[hi] is None and hi - lo < self.chunk_blocks:
                    hi += 1
            chunks.append((lo, hi))
            lo = hi
        return chunks

    def _recalled_chunk(self, ids: list[int], last: bool,
                        known: list[tuple[bytes, ...] | None]) -> _SavedChunk:
        digests = [d for pair in known if pair is not None for d in pair]
        chunk = _SavedChunk(None, len(ids), last, digests, ids=ids)
        chunk.hashed.set_result([True] * len(digests))
        chunk.released.set_result(None)
        return chunk

    def _remember_saved(self, chunks: list[_SavedChunk], valid_in_last: int | None) -> None:
        if not self.remember:
            return
        for chunk in chunks:
            if chunk.rows is None:
                continue
            per = len(chunk.digests) // len(chunk.ids)  # 2, or 2 per head
            for j, block in enumerate(chunk.ids):
                if chunk.last and valid_in_last is not None and j == len(chunk.ids) - 1:
                    continue  # stored masked: its page is not the block's bytes
                self._known[block] = tuple(chunk.digests[per * j : per * (j + 1)])

    def _from_blocks(self, slot: _Slot, ids: list[int]) -> None:
        n = len(ids)
        if self._stream is None:
            self.codec.gather(ids, slot.host[:n])
            return
        assert slot.device is not None
        with torch.cuda.stream(self._stream):
            dev = slot.device[:n]
            self.codec.gather_on_device(self._index(ids), dev)
            slot.host[:n].copy_(dev, non_blocking=True)
            slot.done = self._record(slot.done)

    def _from_blocks_by_head(self, slot: _Slot, ids: list[int], tail: int | None) -> None:
        """``_from_blocks`` for pages of one KV head: the gathered blocks' tail masked and cut
        into heads before they reach the host rows (the slot's bytes, in head-page order)."""
        n = len(ids)
        if self._stream is None:
            staged = self.codec.gather(ids, slot.host[:n])
            if tail is not None:
                self.codec.mask_tail(staged[n - 1], tail)
            slot.host[:n].view(-1).copy_(split_heads(self.codec, staged).view(-1))
            return
        assert slot.device is not None
        with torch.cuda.stream(self._stream):
            dev = slot.device[:n]
            self.codec.gather_on_device(self._index(ids), dev)
            if tail is not None:
                self.codec.mask_tail(dev[n - 1], tail)
            slot.host[:n].view(-1).copy_(split_heads(self.codec, dev).view(-1), non_blocking=True)
            slot.done = self._record(slot.done)

    def _hash_in_pool(
        self, slot: _Slot, n: int, last: bool,
        present: Callable[[list[bytes]], list[bool]] | None, heads: int = 1,
    ) -> _SavedChunk:
        """Hash a chunk's pages in the pool, each slice once the chunk's copy to the host is
        done; the slice that ends last looks the digests up in the store. ``heads`` > 1: the
        rows are pages of one KV head, ``heads`` of them per whole-block page."""
        rows = slot.rows[: 2 * n].reshape(2 * n * heads, -1)
        count = len(rows)
        chunk = _SavedChunk(rows, n, last, [b""] * count)
        copied = slot.done  # not recorded again before the slot is released

        def part(lo: int, hi: int) -> None:
            if copied is not None:
                copied.synchronize()
            chunk.digests[lo:hi] = self._digests(rows[lo:hi])
            if self.tier is not None:
                self._keep_in_tier(rows, chunk.digests, lo, hi)

        parts = self._submit_slices(count, part)
        left = [len(parts)]

        def settle(_: Future[None]) -> None:
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                for future in parts:
                    future.result()
                stored = present(chunk.digests) if present is not None else [False] * count
            except BaseException as exc:  # noqa: BLE001 - raised by the writer and by save
                chunk.hashed.set_exception(exc)
                chunk.released.set_exception(exc)
                return
            chunk.hashed.set_result(stored)
            if all(stored):
                chunk.released.set_result(None)  # no bytes of this slot left to write

        for future in parts:
            future.add_done_callback(settle)
        return chunk

    def _keep_in_tier(self, rows: np.ndarray, digests: list[bytes], lo: int, hi: int) -> None:
        """Copy saved pages the tier lacks into it: a checkout after a restart finds them there."""
        tier = self.tier
        assert tier is not None
        new = [i for i, slot in zip(range(lo, hi), tier.lookup(digests[lo:hi])) if slot is None]
        for i, slot in zip(new, tier.reserve(len(new), before_reuse=self._wait_fence)):
            np.copyto(tier.rows[slot], rows[i])
            tier.publish(slot, digests[i])

    def _commit_ready(self, commit: Commit) -> None:
        """Commit every chunk queued so far in one call (one durable LMDB commit).

        While the writer waits on the disk, the next chunks are gathered and hashed; they are
        then committed together, so a save costs a few commits, not one per chunk.
        """
        with self._lock:
            batch, self._ready = self._ready, []
        if not batch:
            return
        try:
            items: PageItems = []
            for chunk in batch:
                stored = chunk.hashed.result()
                if chunk.rows is None:
                    items += [(d, None) for d in chunk.digests]
                    continue
                items += [(d, None if there else memoryview(row))
                          for d, there, row in zip(chunk.digests, stored, chunk.rows)]
            commit(items, sum(chunk.blocks for chunk in batch),
                   any(chunk.last for chunk in batch))
        except BaseException as exc:  # noqa: BLE001 - handed to every chunk of the batch
            for chunk in batch:
                chunk.committed.set_exception(exc)
                if not chunk.released.done():
                    chunk.released.set_exception(exc)
            return
        for chunk in batch:
            chunk.committed.set_result(None)
            if not chunk.released.done():
                chunk.released.set_result(None)

    # -- helpers ---------------------------------------------------------------------------
    def _digests(self, rows: Sequence[np.ndarray]) -> list[bytes]:
        """Each page's digest: one call for all of them without the GIL where it can."""
        if self.native is not None and len(rows):
            return self.native.hash_pages(rows)
        return [page_digest(row) for row in rows]

    def _submit_slices(self, count: int, part: Callable[[int, int], T]) -> list[Future[T]]:
        """``part(lo, hi)`` over ``range(count)``, one slice per thread. Slices start on even
        indexes, so a block's K and V pages (``2i``, ``2i + 1``) stay in one slice."""
        pieces = max(1, min(self.threads, count // 2))
        bounds = [count * i // pieces // 2 * 2 for i in range(pieces)] + [count]
        return [self._pool.submit(part, lo, hi) for lo, hi in itertools.pairwise(bounds)]

    def _index(self, ids: list[int]) -> torch.Tensor:
        """Block ids on the device, copied without blocking the host."""
        host = torch.tensor(ids, dtype=torch.long).pin_memory()
        return host.to(self.codec.device, non_blocking=True)

    def _record(self, event: torch.cuda.Event | None) -> torch.cuda.Event:
        # Blocking: a thread that waits for the device sleeps instead of spinning on a core the
        # copy threads need.
        event = event or torch.cuda.Event(blocking=True)
        event.record(self._stream)
        return event
