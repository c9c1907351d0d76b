"""The connector's WORKER role.  Runs in each worker process, next to the paged KV tensors.

It moves bytes.  Loads start in ``start_load_kv``; on CPU a helper thread copies them
layer by layer while the forward pass runs, each attention layer waits for its own
layer (``wait_for_layer_load``), and the step's ``get_block_ids_with_load_errors``
waits for the rest (see ``loader``).  Saves finish in ``wait_for_save``, before the
step's output is returned.  Both complete before the request's output reaches the API
server, which can therefore read a snapshot's pages from the store as soon as its
request completes, with no extra handshake.

Failures never crash the engine: a failed load reports its blocks as invalid, so
vLLM recomputes them, and any failure is written to the job's record in the store,
where the API server finds it and answers the client.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from processfork.store import MissingObject, PutResult, Store, page_digest
from processfork.store.meta import meta_get, meta_put
from vllm.logger import init_logger

from .block_views import BlockViews
from .codec import PageCodec, blocks_axis_of, codec_for
from .engine_info import engine_fingerprint, layer_order
from .fingerprint import Fingerprint
from .head_pages import join_heads, rank_share, split_heads
from .host_tier import (
    TMPFS,
    HostTier,
    TierBusy,
    cuda_register,
    filesystem_type,
    tier_file_path,
)
from .jobs import (
    EngineRecord,
    JobError,
    JobErrorKind,
    JobRecord,
    LoadJob,
    SaveJob,
    StepPlan,
    engine_meta_key,
    job_meta_key,
    token_bytes_digest,
)
from .kv_groups import MAMBA, GroupLayout
from .loader import LoadItem, LoadTicket, PipelinedLoader
from .page_writer import PageWriter, QueuedPages
from .prefix_lookup import is_restore_job
from .staged_pages import MiB, StagedPagePath, staging_options
from .state_pages import StateMask, StateViews, state_layer_tensors, state_mask
from .tp_ranks import RankHeads, rank_job_meta_key
from .trace import ENABLED as TRACING
from .trace import mark

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)
_LAYER_NUMBER = re.compile(r"\.(\d+)\.")

__all__ = ["WorkerSide"]


@dataclass
class _JobStats:
    """A save job's progress across steps, until its final save records it."""

    req_id: str = ""
    blocks: int = 0
    new_blocks: int = 0
    bytes_written: int = 0
    #: Blocks whose pages the engine named from memory, without copying or hashing them.
    reused_blocks: int = 0
    final: bool = False
    error: JobError | None = None
    error_recorded: bool = False  # the record with `error` is in the store
    digests: list[bytes] = field(default_factory=list)  # K, V of every saved block, in order

    def add(self, result: PutResult, blocks: int, heads: int = 1) -> None:
        """``heads`` page pairs per block: a block is new when any of its pages is."""
        new, per_block = result.new, 2 * heads
        self.digests += result.digests
        self.blocks += blocks
        if any(new):  # a warm save finds every page: nothing to count block by block
            self.new_blocks += sum(1 for i in range(0, len(new), per_block)
                                   if any(new[i : i + per_block]))
        self.bytes_written += result.bytes_written

    def record(self) -> JobRecord:
        d = self.digests
        pages = (
            [(d[i].hex(), d[i + 1].hex()) for i in range(0, len(d), 2)]
            if self.final and self.error is None
            else []
        )
        return JobRecord(
            final=self.final,
            blocks=self.blocks,
            new_blocks=self.new_blocks,
            bytes_written=self.bytes_written,
            reused_blocks=self.reused_blocks,
            pages=pages,
            error=self.error,
        )


@dataclass
class _LoadBatch:
    """A step's blocks to load as parallel lists: the staged path takes them as they are,
    where an object per block cost a 128K-token checkout about 10 ms before its first copy."""

    block_ids: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # each block's K page, then its V page
    jobs: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.block_ids)

    def extend(self, other: _LoadBatch) -> None:
        self.block_ids += other.block_ids
        self.digests += other.digests
        self.jobs += other.jobs

    def without(self, drop: set[int]) -> _LoadBatch:
        keep = [i for i in range(len(self)) if i not in drop]
        return _LoadBatch([self.block_ids[i] for i in keep],
                          [d for i in keep for d in self.digests[2 * i : 2 * i + 2]],
                          [self.jobs[i] for i in keep])

    def items(self) -> list[LoadItem]:
        d = self.digests
        return [LoadItem(b, d[2 * i], d[2 * i + 1], j)
                for i, (b, j) in enumerate(zip(self.block_ids, self.jobs))]


class WorkerSide:
    """Gathers/scatters pages through a codec and reads/writes them in the store."""

    def __init__(
        self, vllm_config: VllmConfig, store_path: str, *, verify_loads: bool,
        pipelined_loads: bool = True, page_path: str = "auto", staging_mib: int | None = None,
        copy_threads: int | None = None, host_tier_mib: int = 0, host_tier_dir: str = "/dev/shm",
        page_reader: str = "auto", staging_slots: int | None = None,
        streaming_stores: bool | None = None, kv_groups: list[dict[str, Any]] | None = None,
    ):
        self.vllm_config = vllm_config
        self.store_path = store_path
        self.verify_loads = verify_loads
        self.pipelined_loads = pipelined_loads
        if page_path not in ("auto", "direct", "staged"):
            raise ValueError(f"page_path must be auto, direct or staged (got {page_path!r})")
        self.page_path = page_path
        self.staging_mib = staging_mib
        self.copy_threads = copy_threads
        self.page_reader = page_reader
        self.staging_slots = staging_slots
        self.streaming_stores = streaming_stores
        self.host_tier_mib = host_tier_mib
        self.host_tier_dir = host_tier_dir
        self.kv_groups = kv_groups  # the fingerprint's group layout (plugin/kv_groups.py)
        self._staged: StagedPagePath | None = None
        self.engine_id = vllm_config.kv_transfer_config.engine_id
        self.codec: PageCodec | None = None
        self.fingerprint: Fingerprint | None = None
        self._store: Store | None = None
        self._manifests: dict[str, Any] = {}
        self._stats: dict[str, _JobStats] = {}
        self._load_errors: set[int] = set()
        self._finished_loads: set[str] = set()  # requests of this step's asynchronous loads
        self._traced: dict[str, str] = {}  # PROCESSFORK_TRACE: request id -> its load's job
        self._loader: PipelinedLoader | None = None
        self._views: BlockViews | None = None
        self._page_buf: np.ndarray | None = None
        self._page_row: torch.Tensor | None = None
        self._ticket: LoadTicket | None = None
        self.layer_index: dict[str, int] = {}
        self._writer: PageWriter | None = None
        self._released: set[str] = set()  # finished requests whose held blocks are copied
        self._state_masks: dict[int, StateMask] = {}  # per state (Mamba) group: its padding
        self.rank_heads: RankHeads | None = None  # the model's KV heads this rank holds

    @property
    def store(self) -> Store:
        # Opened lazily in the worker process itself: LMDB handles must not cross fork.
        if self._store is None:
            self._store = Store(self.store_path)
        return self._store

    # --- setup ----------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # A state group's layers (Mamba) are views into the attention layers' tensors (a byte
        # view of each layer's blocks, or, in some vLLM versions, a list of one view per state
        # tensor): pages are made of the attention tensors, and a state block is a block of them.
        state_groups = {g: set(spec["layers"]) for g, spec in enumerate(self.kv_groups or [])
                        if spec.get("kind") == MAMBA}
        state_layers = set().union(*state_groups.values())
        states = {n: t for n, t in kv_caches.items() if _layer_number(n) in state_layers}
        names = layer_order({n: t for n, t in kv_caches.items() if n not in states})
        layers = [kv_caches[n] for n in names]
        model_config = self.vllm_config.model_config
        head_dim = model_config.get_head_size()
        backend, isa = _backend_and_isa(self.vllm_config, names[0], layers[0], head_dim)
        blocks_axis = blocks_axis_of(
            _backend_class(self.vllm_config, names[0]), self.vllm_config.cache_config.block_size,
            model_config.get_num_kv_heads(self.vllm_config.parallel_config), head_dim,
        )
        self.codec = codec_for(backend, layers, head_dim=head_dim, isa=isa,
                               blocks_axis=blocks_axis)
        block_size = self.vllm_config.cache_config.block_size
        if self.codec.geometry.block_size != block_size:
            # Some backends split each block into smaller kernel blocks; a page would then hold
            # a fraction of a block, and the scheduler's block ids would address the wrong rows.
            raise ValueError(
                f"processfork: the {backend} KV cache holds {self.codec.geometry.block_size}-token "
                f"blocks but the engine's block size is {block_size}; choose a block size the "
                "attention backend uses as is"
            )
        self.fingerprint = engine_fingerprint(self.vllm_config, self.codec, backend=backend, isa=isa,
                                              kv_groups=self.kv_groups)
        parallel = self.vllm_config.parallel_config
        self.rank_heads = RankHeads(self.fingerprint.num_kv_heads,
                                    parallel.tensor_parallel_size, _tp_rank(parallel))
        record = EngineRecord(self.fingerprint, num_blocks=self.codec.geometry.num_blocks,
                              page_bytes=self.codec.page_bytes, pid=os.getpid())
        self.store.meta_put(engine_meta_key(self.engine_id), record.to_json())
        ptrs = {t.data_ptr(): i for i, t in enumerate(layers)}
        self.layer_index = {n: ptrs.get(_first_tensor(t).data_ptr(), -1)
                            for n, t in kv_caches.items()}
        # The padding of each state group's blocks, zeroed by saves on either page path.
        layout = GroupLayout.from_fingerprint(self.kv_groups)
        for group, layer_ids in state_groups.items():
            views = [t for n, t in states.items() if _layer_number(n) in layer_ids]
            size = layout.groups[group].state_bytes()
            sizes = sorted({_state_bytes(t) for t in views})
            if sizes != [size]:
                # The pages would keep a part of the state, or zero a part of it.
                raise ValueError(
                    f"processfork: Mamba group {group} registers states of {sizes} bytes, "
                    f"its spec says {size}"
                )
            self._state_masks[group] = state_mask(layers, self.codec.k_views,
                                                  self.codec.v_views, views)
        direct = self.codec.device.type == "cpu" and self.page_path != "staged"
        if self.rank_heads.tp_size > 1:
            _check_tensor_parallel(bool(state_groups), self.host_tier_mib)
        if direct:
            if self.host_tier_mib:
                logger.warning("processfork: host_tier_mib is ignored: the host tier serves the "
                               "staged page path, and this CPU engine copies pages directly")
            self._views = BlockViews(self.codec.k_views, self.codec.v_views)
            g = self.codec.geometry
            buf = np.empty((2, self.codec.page_bytes), dtype=np.uint8)
            self._page_buf = buf
            self._page_row = torch.from_numpy(buf).view(g.dtype).view(2, g.num_layers, -1)
            if self.pipelined_loads:
                self._loader = PipelinedLoader(
                    self.store, self._views, verify=self.verify_loads,
                    page_bytes=self.codec.page_bytes,
                )
        else:
            self._staged = StagedPagePath(
                self.codec, verify=self.verify_loads, threads=self.copy_threads,
                tier=self._open_tier(), remember=len(self.kv_groups or []) <= 1,
                reader=self.page_reader,
                **staging_options(self.staging_mib, self.staging_slots, self.streaming_stores),
            )
            warm_up = self._staged.warm_up()
            logger.info(
                "processfork: staged page path, %d MiB of %s staging in chunks of %d blocks, "
                "%d copy threads (%s), warmed up in %.0f ms", self._staged.staging_bytes // MiB,
                "pinned" if self._staged.cuda else "host", self._staged.chunk_blocks,
                self._staged.threads, self._staged.reader_description, warm_up * 1e3,
            )
        logger.info(
            "processfork: %d layers, %s codec, %d-byte pages, store %s",
            len(layers), self.codec.layout, self.codec.page_bytes, self.store_path,
        )

    def _open_tier(self) -> HostTier | None:
        """The host tier the config asks for, or None (with a warning) when it cannot be had."""
        if not self.host_tier_mib:
            return None
        assert self.codec is not None
        kind = filesystem_type(self.host_tier_dir)
        if self.codec.device.type == "cuda" and kind is not None and kind not in TMPFS:
            logger.warning("processfork: running without a host tier: %s is on %s, and CUDA pins "
                           "only memory pages (use a tmpfs such as /dev/shm)",
                           self.host_tier_dir, kind)
            return None
        path = tier_file_path(self.host_tier_dir, self.store_path, self.codec.page_bytes)
        started = time.monotonic()
        try:
            tier = HostTier(path, self.codec.page_bytes, self.host_tier_mib * MiB)
        except (TierBusy, OSError, ValueError) as exc:
            logger.warning("processfork: running without a host tier: %s", exc)
            return None
        if self.codec.device.type == "cuda":
            try:
                tier.pin(cuda_register)
            except RuntimeError as exc:
                tier.close()
                logger.warning("processfork: running without a host tier: %s", exc)
                return None
        logger.info(
            "processfork: host tier %s, %d slots of %d bytes, %d pages kept from before, ready "
            "in %.1f s", path, tier.num_slots, tier.page_bytes, len(tier),
            time.monotonic() - started,
        )
        return tier

    # --- loads ------------------------------------------------------------------
    def begin_step(self, plan: StepPlan) -> None:
        """Forget the pages of the blocks this step writes or loads afresh, before any of the
        step's saves can name them from memory (plugin/staged_pages.py)."""
        if self._staged is not None and (plan.fresh_blocks or plan.loads):
            self._staged.forget(plan.fresh_blocks)
            for job in plan.loads:
                self._staged.forget(job.block_ids)

    def start_load(self, plan: StepPlan) -> None:
        """Start this step's loads; on CPU they complete layer by layer during the forward pass."""
        self._finish_loads()  # a previous step's ticket whose errors were never collected
        items = _LoadBatch()
        self._finished_loads.update(job.req_id for job in plan.loads if job.async_load)
        for job in plan.loads:
            mark("worker.begin", job.job)
            if TRACING and job.async_load:  # reported finished later, by request id
                self._traced[job.req_id] = job.job
            try:
                items.extend(self._load_items(job))
            except Exception as exc:  # noqa: BLE001 - reported, never raised: vLLM recomputes
                logger.warning("processfork: load for %s failed: %s", job.req_id, exc)
                self._load_errors.update(job.block_ids)
                self._fail_load(job.job, JobError.of(exc))
        if not items:
            return
        for job in plan.loads if TRACING else ():
            mark("worker.setup", job.job)
        if self._loader is not None:
            self._ticket = self._loader.submit(items.items())
        elif self._staged is not None:
            self._load_staged(items)
        else:
            self._load_direct(items)
        for job in plan.loads if TRACING else ():
            mark("worker.host", job.job)

    def wait_for_layer_load(self, layer_name: str) -> None:
        ticket = self._ticket
        if ticket is not None:
            ticket.wait_layer(self.layer_index.get(layer_name, -1))

    def _manifest(self, cid: str) -> Any:
        manifest = self._manifests.get(cid)
        if manifest is None:
            manifest = self.store.get_snapshot(cid)
            if len(self._manifests) > 64:
                self._manifests.clear()
            self._manifests[cid] = manifest
        return manifest

    def _load_items(self, job: LoadJob) -> _LoadBatch:
        assert self.codec is not None
        manifest = self._manifest(job.cid)
        seq = manifest.sequences[job.seq]
        n = len(job.block_ids)
        covered = self.store.get_token_bytes(seq.tokens)[
            : 4 * (job.first_block + n) * self.codec.geometry.block_size
        ]
        if token_bytes_digest(covered) != job.tokens_digest:
            raise ValueError(f"request tokens differ from snapshot {job.cid[:19]}, sequence {job.seq}")
        if seq.heads is not None:
            self._load_heads(job, seq)
            return _LoadBatch()
        if self.head_pages:
            self._load_rank_share(job, seq)
            return _LoadBatch()
        # A sliding-window group stores the blocks from its window on: `first` is the first one.
        first, group_pages = seq.group_pages(job.group)
        start = job.first_block - first
        pages = group_pages[start : start + n] if start >= 0 else []
        if len(pages) != n:
            raise ValueError(f"snapshot {job.cid} holds {len(pages)} of {n} blocks"
                             f"{f' of KV-cache group {job.group}' if seq.groups else ''}")
        fromhex = bytes.fromhex
        items = _LoadBatch(list(job.block_ids), [fromhex(d) for pair in pages for d in pair],
                           [job.job] * n)
        # A missing page fails its own block, not the whole step's transfer (which fails at
        # the first missing page): vLLM recomputes from the first block reported, and the
        # other requests of the step keep their loads. The staged path's flow in C finds
        # missing pages as it looks each page up (one lookup each, not two, before the copy).
        if self._staged is not None and self._staged.reports_missing_pages:
            return items
        present = self.store.has_pages(items.digests)
        missing = [i for i in range(n) if not (present[2 * i] and present[2 * i + 1])]
        if missing:
            first = missing[0]
            digest = items.digests[2 * first + (1 if present[2 * first] else 0)]
            logger.warning("processfork: load for %s: %d blocks have missing pages",
                           job.req_id, len(missing))
            self._load_errors.update(items.block_ids[i] for i in missing)
            self._fail_load(job.job, JobError.of(MissingObject("page", digest.hex())))
            items = items.without(set(missing))
        return items

    def _load_heads(self, job: LoadJob, seq: Any) -> None:
        """A sequence of pages of one KV head (format v4): this rank's heads of each block,
        joined into whole-block pages of its own tensors and copied in now, before the forward
        pass. Any missing or damaged page fails the job's every block."""
        assert self.codec is not None and self.rank_heads is not None
        heads, g = self.rank_heads, self.codec.geometry
        if seq.heads != heads.total:
            raise ValueError(f"snapshot {job.cid[:19]} has pages of {seq.heads} KV heads, this "
                             f"engine {heads.total}")
        n = len(job.block_ids)
        first, pairs = seq.group_pages(job.group)
        start = job.first_block - first
        blocks = len(pairs) // seq.heads
        if start < 0 or start + n > blocks:
            raise ValueError(f"snapshot {job.cid} holds {max(0, blocks - max(start, 0))} of {n} "
                             "blocks")
        # Entry `b * heads + h` of the group's pairs is head h of its b-th stored block.
        digests = [bytes.fromhex(d) for i in range(n) for e in heads.entries(start + i)
                   for d in pairs[e]]
        staged = torch.empty((n, heads.count, 2, g.num_layers, g.elems_per_layer // g.num_kv_heads),
                             dtype=g.dtype)
        flat = staged.view(torch.uint8).numpy().reshape(-1)
        self.store.read_pages_into(digests, flat, self.codec.page_bytes // g.num_kv_heads,
                                   verify=self.verify_loads)
        self.codec.scatter(job.block_ids, join_heads(self.codec, staged))

    def _load_rank_share(self, job: LoadJob, seq: Any) -> None:
        """Whole-block pages (format v3, a TP-1 engine's) at a rank of a tensor-parallel engine:
        each page is read whole and checked against its digest, and the rank copies in its own
        heads' rows, now, before the forward pass. Any missing or damaged page fails the job's
        every block."""
        assert self.codec is not None and self.rank_heads is not None
        heads, g = self.rank_heads, self.codec.geometry
        n = len(job.block_ids)
        first, group_pages = seq.group_pages(job.group)
        start = job.first_block - first
        pages = group_pages[start : start + n] if start >= 0 else []
        if len(pages) != n:
            raise ValueError(f"snapshot {job.cid} holds {len(pages)} of {n} blocks")
        page_bytes = self.codec.page_bytes // g.num_kv_heads * heads.total
        whole = torch.empty((n, 2, g.num_layers, page_bytes // g.num_layers // g.dtype.itemsize),
                            dtype=g.dtype)
        self.store.read_pages_into([bytes.fromhex(d) for pair in pages for d in pair],
                                   whole.view(torch.uint8).numpy().reshape(-1), page_bytes,
                                   verify=self.verify_loads)
        self.codec.scatter(job.block_ids, rank_share(self.codec, whole, heads.total, heads.first))

    def _load_staged(self, items: _LoadBatch) -> None:
        """Through the staging slots (GPU): the device work is queued ahead of the forward pass."""
        assert self._staged is not None
        try:
            outcome = self._staged.load(self.store, items.block_ids, items.digests, items.jobs)
        except Exception as exc:  # noqa: BLE001 - reported, never raised: vLLM recomputes
            self._fail_items(items, exc)
            return
        self._load_errors.update(outcome.bad_blocks)
        for job, message in outcome.failures.items():
            logger.warning("processfork: load for job %s failed: %s", job, message)
            self._fail_load(job, JobError(JobErrorKind.FAILED, message))

    def _load_direct(self, items: _LoadBatch) -> None:
        """CPU without the helper thread: copy every page straight into its block."""
        assert self.codec is not None and self._views is not None
        digests = items.digests
        size = self.codec.page_bytes
        try:
            staging = self.codec.new_staging(len(items))
            flat = staging.view(torch.uint8).numpy().reshape(-1)
            # Verified page by page below: a corrupt page fails its own block only.
            self.store.read_pages_into(digests, flat, size, verify=False)
            self.codec.scatter(items.block_ids, staging)
        except Exception as exc:  # noqa: BLE001 - reported, never raised: vLLM recomputes
            self._fail_items(items, exc)
            return
        if not self.verify_loads:
            return
        for i, digest in enumerate(digests):
            if page_digest(flat[i * size : (i + 1) * size]) != digest:
                job = items.jobs[i // 2]
                self._load_errors.add(items.block_ids[i // 2])
                message = f"CorruptPage: page {digest.hex()} does not match its digest"
                logger.warning("processfork: load for job %s failed: %s", job, message)
                self._fail_load(job, JobError(JobErrorKind.FAILED, message))

    def _fail_items(self, items: _LoadBatch, exc: Exception) -> None:
        logger.warning("processfork: load failed: %s", exc)
        self._load_errors.update(items.block_ids)
        for job in set(items.jobs):
            self._fail_load(job, JobError.of(exc))

    def _finish_loads(self) -> None:
        """Wait for the running ticket and record its failures. A successful load writes
        nothing to the store: the scheduler reports loaded tokens to the API server."""
        ticket, self._ticket = self._ticket, None
        if ticket is None:
            return
        ticket.wait()
        self._load_errors.update(ticket.bad_blocks)
        for job, message in ticket.failures.items():
            self._fail_load(job, JobError(JobErrorKind.FAILED, message))

    def take_finished_loads(self) -> set[str]:
        """Requests whose asynchronous loads ran in this step, failed or not (the failures are
        the step's load errors)."""
        if not self._finished_loads:
            return set()
        self._finish_loads()
        done, self._finished_loads = self._finished_loads, set()
        for req_id in done if TRACING else ():
            mark("worker.reported", self._traced.pop(req_id, req_id))
        return done

    def take_load_errors(self) -> set[int]:
        self._finish_loads()
        errors, self._load_errors = self._load_errors, set()
        return errors

    # --- saves ------------------------------------------------------------------
    def save(self, plan: StepPlan) -> None:
        for job in plan.saves:
            try:
                if job.background:
                    self._save_background(job)
                else:
                    mark("worker.save", job.job, blocks=len(job.block_ids))
                    self._save(job)
                    mark("worker.saved", job.job)
            except Exception as exc:  # noqa: BLE001 - reported to the API server via the store
                logger.warning("processfork: save for %s failed: %s", job.req_id, exc)
                self._fail_save(job, exc)
            finally:
                if job.release:
                    self._released.add(job.req_id)

    def take_released(self) -> set[str]:
        """Finished requests whose blocks vLLM kept for a save that has now copied them."""
        released, self._released = self._released, set()
        return released

    @property
    def writer(self) -> PageWriter:
        if self._writer is None:
            self._writer = PageWriter(lambda: self.store)
        return self._writer

    def _save_background(self, job: SaveJob) -> None:
        """Copy the job's pages out of the blocks now; hash, write and commit them durably on
        the page writer's thread, with the job's record (see ``page_writer``). Whole blocks
        only: a session turn stores no partial block."""
        assert self.codec is not None and job.valid_in_last is None
        if self.head_pages:
            raise ValueError("session turns are not saved at tensor_parallel_size > 1")
        if not job.block_ids:
            return
        n = len(job.block_ids)
        pages: list[tuple[bytes | None, Any]] = []
        # A state block's padding is zeroed before it is hashed, as in any save of one.
        state = None if job.state_group is None else self._state_masks[job.state_group]
        if self._staged is not None:
            def keep(items: list[tuple[bytes, memoryview | None]], blocks: int,
                     last: bool) -> None:
                pages.extend((d, None if v is None else bytes(v)) for d, v in items)

            # Every page copied, none left to the store's copy: the write comes later, when a
            # page seen in the store now may have been collected.
            self._staged.save(job.block_ids, None, keep,
                              mask=None if state is None else state.apply)
        else:
            assert self._views is not None
            out = np.empty((2 * n, self.codec.page_bytes), dtype=np.uint8)
            for i, block in enumerate(job.block_ids):
                self._views.gather(block, out[2 * i], out[2 * i + 1])
                if state is not None:
                    state.apply(out[2 * i], out[2 * i + 1])
            pages = [(None, out[i]) for i in range(2 * n)]

        def meta(result: PutResult) -> dict[str, Any]:
            done = _JobStats(req_id=job.req_id, final=True)
            done.add(result, n)
            return {job_meta_key(job.job): done.record().to_json()}

        def failed(exc: BaseException) -> None:
            self._record(job.job, JobRecord(final=True, error=JobError.of(exc)))

        self.writer.submit(QueuedPages(job.job, pages, meta, failed))

    @property
    def head_pages(self) -> bool:
        """Whether saves write pages of one KV head (format v4): a rank of a tensor-parallel
        engine holds only some heads of every block."""
        return self.rank_heads is not None and self.rank_heads.tp_size > 1

    def _job_key(self, job: str) -> str:
        """Where this worker records its part of a save job: each rank of a tensor-parallel
        engine under its own key (plugin/tp_ranks.py)."""
        rank = self.rank_heads.rank if self.rank_heads is not None else 0
        return rank_job_meta_key(job, rank)

    def _save(self, job: SaveJob) -> None:
        assert self.codec is not None
        stats = self._stats.setdefault(job.job, _JobStats(req_id=job.req_id))
        # A replica of a head that another rank saves writes no pages, only its final record.
        writes = self.rank_heads is None or self.rank_heads.writes
        if stats.error is None and job.block_ids and writes:
            n = len(job.block_ids)
            heads = self.rank_heads.count if self.head_pages else 1
            # The final save commits the job's record together with its pages (one durable
            # commit instead of two); a transaction that reruns recomputes it from scratch.
            meta = None
            if job.final:
                def meta(result: PutResult) -> dict[str, Any]:
                    done = replace(stats, final=True, digests=list(stats.digests))
                    done.add(result, len(result.digests) // (2 * heads), heads)
                    return {self._job_key(job.job): done.record().to_json()}
            if self._staged is not None:
                def commit(items: list[tuple[bytes, memoryview | None]], blocks: int,
                           last: bool) -> None:
                    stats.add(
                        self.store.put_pages_hashed(
                            items, pin=job.job, meta=meta if last else None, durable=job.durable
                        ),
                        blocks, heads,
                    )

                def reused(blocks: int) -> None:
                    stats.reused_blocks += blocks

                state = None if job.state_group is None else self._state_masks[job.state_group]
                self._staged.save(job.block_ids, job.valid_in_last, commit,
                                  present=self.store.has_pages, reused=reused,
                                  mask=None if state is None else state.apply,
                                  heads=heads if self.head_pages else 0)
            elif self.head_pages:
                stats.add(self.store.put_pages_from(2 * n * heads, self._head_page_source(job),
                                                    pin=job.job, meta=meta, durable=job.durable),
                          n, heads)
            else:
                stats.add(
                    self.store.put_pages_from(2 * n, self._page_source(job), pin=job.job,
                                              meta=meta, durable=job.durable),
                    n,
                )
            if job.final:
                self._stats.pop(job.job, None)
                return
        if job.final:
            stats.final = True
            if stats.error_recorded:
                self._update_record(self._job_key(job.job), stats.record())
            else:
                self.store.meta_put(self._job_key(job.job), stats.record().to_json(),
                                    durable=job.durable)
            self._stats.pop(job.job, None)

    def _page_source(self, job: SaveJob) -> Callable[[int], np.ndarray]:
        """Pages of a save, built one block at a time in one reusable two-page buffer."""
        assert self._views is not None and self._page_buf is not None and self.codec is not None
        views, buf, row, codec = self._views, self._page_buf, self._page_row, self.codec
        blocks, last, tail = job.block_ids, len(job.block_ids) - 1, job.valid_in_last
        state = None if job.state_group is None else self._state_masks[job.state_group]

        def page(i: int) -> np.ndarray:
            block, half = divmod(i, 2)
            if half == 0:
                views.gather(blocks[block], buf[0], buf[1])
                if block == last and tail is not None:
                    codec.mask_tail(row, tail)
                if state is not None:
                    state.apply(buf[0], buf[1])
            return buf[half]

        return page

    def _head_page_source(self, job: SaveJob) -> Callable[[int], np.ndarray]:
        """Pages of one KV head of a save (format v4), block by block: each block's whole-block
        pages are gathered as for ``_page_source`` and cut into this rank's heads, K then V of
        each head in head order, as a v4 page table lists them."""
        assert self._page_row is not None and self.codec is not None
        whole, codec = self._page_source(job), self.codec
        row, heads = self._page_row, self.rank_heads.count if self.rank_heads else 1
        current: list[Any] = [-1, None]  # the block cut last, and its [heads * 2, bytes] pages

        def page(i: int) -> np.ndarray:
            block, j = divmod(i, 2 * heads)
            if current[0] != block:
                whole(2 * block)  # fills the two-page buffer `row` views
                cut = split_heads(codec, row.unsqueeze(0))
                current[:] = [block, cut.view(torch.uint8).numpy().reshape(2 * heads, -1)]
            return current[1][j]

        return page

    def _fail_save(self, job: SaveJob, exc: Exception) -> None:
        """Record the failure at once; the job's later saves are skipped (see _save)."""
        stats = self._stats.setdefault(job.job, _JobStats(req_id=job.req_id))
        stats.error = JobError.of(exc)
        stats.error_recorded = self._record(job.job, stats.record(), self._job_key(job.job))

    def _fail_load(self, job: str, error: JobError) -> None:
        self._record(job, JobRecord(error=error))

    def _record(self, job: str, record: JobRecord, key: str | None = None) -> bool:
        if is_restore_job(job):
            return False  # nobody waits for a transparent restore: its failure is only logged
        try:
            self.store.meta_put(key or job_meta_key(job), record.to_json())
            return True
        except Exception:  # the store itself is failing; the log line before this remains
            logger.exception("processfork: could not record failure of job %s", job)
            return False

    def _update_record(self, key: str, record: JobRecord) -> None:
        """Rewrite a failed job's record only while it exists. The API server reads a failure
        as soon as it is recorded, aborts the request and deletes the record; an engine step
        already under way may still run the job's final save, which must not leave behind a
        record that nothing reads any more. The error is on record already: a failure here
        is only logged."""

        def run(txn: Any) -> None:
            if meta_get(txn, self.store.dbs, key) is not None:
                meta_put(txn, self.store.dbs, key, record.to_json())

        try:
            self.store.env.write(run)
        except Exception:  # the record written at the failure remains
            logger.exception("processfork: could not update the failed job record %s", key)

    def forget_requests(self, req_ids: set[str]) -> None:
        """Drop the progress of jobs whose requests finished: a save that failed, or was
        aborted, before its final step never reaches the point where it is dropped."""
        if req_ids and self._stats:
            self._stats = {j: s for j, s in self._stats.items() if s.req_id not in req_ids}

    def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.close()  # what the steps queued is written before the store closes
            self._writer = None
        if self._staged is not None:
            self._staged.close()
            self._staged = None
        if self._loader is not None:
            self._finish_loads()
            self._loader.close()
            self._loader = None
        if self._store is not None:
            self._store.close()
            self._store = None


def _tp_rank(parallel: Any) -> int:
    """This worker's tensor-parallel rank (0 without tensor parallelism)."""
    if parallel.tensor_parallel_size == 1:
        return 0
    from vllm.distributed import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def _check_tensor_parallel(state_groups: bool, host_tier_mib: int) -> None:
    """Refuse, at start, what a rank of a tensor-parallel engine cannot save or load yet. Both
    page paths save and load pages of one KV head. The host tier stays refused: its file is one
    per store and page size (host_tier.tier_file_path), so the ranks, whose shares have the
    same page size, would claim the same file, and its loads copy whole-block pages into the
    blocks where a rank must join pages of one head first."""
    if state_groups:
        raise ValueError("processfork: models with a Mamba (state) KV-cache group are not "
                         "supported at tensor_parallel_size > 1")
    if host_tier_mib:
        raise ValueError("processfork: the host tier is not supported at "
                         "tensor_parallel_size > 1 (set host_tier_mib to 0)")


def _first_tensor(value: torch.Tensor | StateViews) -> torch.Tensor:
    """A layer's KV tensor, or the first of a Mamba layer's state tensors (some vLLM versions
    register those as a list)."""
    return state_layer_tensors(value)[0]


def _state_bytes(views: StateViews) -> int:
    """Bytes of one block of a Mamba layer's state, over all of its state tensors."""
    return sum(t[0].numel() * t.element_size() for t in state_layer_tensors(views))


def _layer_number(name: str) -> int:
    """The model layer a KV-cache layer name belongs to (``model.layers.3.mixer``: 3)."""
    match = _LAYER_NUMBER.search("." + name + ".")
    return int(match.group(1)) if match else -1


def _backend_class(vllm_config: VllmConfig, layer_name: str) -> object | None:
    """The attention backend class the worker registered for ``layer_name``."""
    layer = vllm_config.compilation_config.static_forward_context.get(layer_name)
    return getattr(layer, "attn_backend", None) if layer is not None else None


def _backend_and_isa(
    vllm_config: VllmConfig, layer_name: str, tensor: torch.Tensor, head_dim: int
) -> tuple[str, str | None]:
    """Name the attention backend that owns the tensors, and the CPU kernel ISA."""
    ctx = vllm_config.compilation_config.static_forward_context
    layer = ctx.get(layer_name)
    backend_cls = _backend_class(vllm_config, layer_name)
    backend = backend_cls.get_name() if backend_cls is not None else "unknown"
    isa = getattr(layer, "isa", None)
    if isa is None and tensor.device.type == "cpu" and backend.upper().startswith("CPU"):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(
            vllm_config.model_config.dtype,
            vllm_config.cache_config.block_size,
            head_dim,
            vllm_config.cache_config.cache_dtype,
        )
    return backend, isa
