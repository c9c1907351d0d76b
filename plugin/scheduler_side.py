"""The connector's SCHEDULER role.  Runs in the EngineCore process, beside vLLM's scheduler.

It never touches KV bytes.  It decides, step by step, which blocks the worker must
save (snapshot jobs, also across chunked-prefill steps) or fill (checkout jobs, and
transparent restores: a client request whose prompt starts with blocks the store holds,
found in the store's prefix index), and keeps an index of the sequences the engine holds,
so a snapshot with nothing but a name can capture the engine's whole resident state.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from .jobs import (
    PARAMS_KEY,
    CaptureOp,
    CaptureReply,
    CheckoutOp,
    CheckoutReply,
    LoadJob,
    SaveJob,
    SnapshotOp,
    StepPlan,
    parse_op,
    tokens_digest,
)
from .kv_groups import FULL_ATTENTION, GroupLayout, group_job
from .prefix_lookup import RESTORE_JOB_PREFIX, PrefixLookup
from .remote_restore import PENDING, RemoteRestorer
from .session_groups import (
    finish_groups,
    hold_offered,
    let_go,
    plan_group_step,
    start_groups,
)
from .sessions import DEFAULT_PREFIX, SessionCommitter, SessionState, TurnSpec, session_ref
from .trace import mark

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["SchedulerSide"]

logger = init_logger(__name__)

#: How long a snapshot request saved without a forward pass waits to be ended by the API server.
RESIDENT_SAVE_WAIT_S = 5.0
#: The engine step's nap while every request it holds waits for a remote fetch.
REMOTE_IDLE_S = 0.005


@dataclass
class _SnapshotState:
    job: str
    num_prompt: int
    next_block: int  # first block index not yet handed to the worker
    block_ids: list[int] = field(default_factory=list)
    done: bool = False
    held: list[Any] | None = None  # cached blocks held for a save without a forward pass
    held_since: float = 0.0
    # Several KV-cache groups: each group's block table, and its first block not yet handed
    # to the worker. None with one group (block_ids and next_block say it).
    group_ids: list[list[int]] | None = None
    group_next: list[int] = field(default_factory=list)


@dataclass
class _CheckoutState:
    job: str
    cid: str
    seq: int
    local_tokens: int = 0  # the prefix cache's hit at the latest admission attempt
    reply: CheckoutReply | None = None  # how the first admission served the request
    restore: bool = False  # a transparent restore: no checkout asked for it
    blocks: int = 0  # a transparent restore's stored blocks, from block 0
    loading: set[int] = field(default_factory=set)  # block ids of the load last planned
    failed: bool = False  # a load failed: the request computes what it still lacks


@dataclass
class _FinishedSeq:
    tokens: list[int]
    block_hashes: list[Any]
    finished_at: float


class SchedulerSide:
    """Plans snapshot saves and checkout loads; indexes resident sequences."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        *,
        store_path: str | None = None,
        auto_restore: bool = False,
        sessions: bool = False,
        session_prefix: str = DEFAULT_PREFIX,
        remote: str | None = None,
        remote_refresh_s: float = 30.0,
    ):
        self.block_size = vllm_config.cache_config.block_size
        # Groups of a kind whose state a snapshot cannot hold (Mamba) are refused here, at start.
        self.layout = GroupLayout.from_kv_cache_config(kv_cache_config)
        self.grouped = not self.layout.plain
        self._full_groups = [i for i, g in enumerate(self.layout.groups)
                             if g.kind == FULL_ATTENTION] or [0]
        self._manifests: OrderedDict[str, Any] = OrderedDict()  # grouped restores' manifests
        self.auth = vllm_config.kv_transfer_config.engine_id
        # Finished sequences stay resident until their blocks are evicted; remember
        # at most as many tokens as the cache can hold.
        self.capacity_tokens = max(1, kv_cache_config.num_blocks) * self.block_size
        self._block_pool: BlockPool | None = None
        self._live: dict[str, Request] = {}
        self._finished: OrderedDict[str, _FinishedSeq] = OrderedDict()
        self._finished_tokens = 0
        self._snapshots: dict[str, _SnapshotState] = {}
        self._checkouts: dict[str, _CheckoutState] = {}
        self._pending_loads: list[LoadJob] = []
        # Under async scheduling (vLLM's default on CUDA) the engine schedules a request's next
        # step before it learns that this step's load failed: a load that fails in the step that
        # samples would leave a token sampled from the bad blocks in the output and the discarded
        # token in the model's context. vLLM's asynchronous loads run no forward pass over the
        # request until the load is done, so a failure only moves back where it resumes.
        self.async_loads = bool(getattr(vllm_config.scheduler_config, "async_scheduling", False))
        if self.layout.has_state:
            # A state group's loaded block is copied into the request's running block before
            # the forward pass (and before the connector's step starts): the load must be done
            # in an earlier step, which an asynchronous load is.
            self.async_loads = True
        self._resident_saves: list[SaveJob] = []
        # Several KV-cache groups: finished turns' window saves for the next step, and the blocks
        # held for them until the worker reports them copied (plugin/session_groups.py).
        self._finish_saves: list[SaveJob] = []
        self._finish_held: dict[str, list[Any]] = {}
        self.auto_restore = auto_restore and store_path is not None
        self.session_prefix = session_prefix
        self._sessions: dict[str, SessionState] = {}
        self.lookup: PrefixLookup | None = None
        self.committer: SessionCommitter | None = None
        self._reported: dict[str, int] = {}
        if store_path is not None and (auto_restore or sessions):
            self.lookup = PrefixLookup(store_path, self.auth, self.block_size)
        if sessions and self.layout.has_state:
            logger.info("processfork: session turns store each turn's state (Mamba) at its "
                        "split point, from the block the engine holds it in")
        if sessions and self.lookup is not None:
            self.committer = SessionCommitter(self.lookup.store, session_prefix)
        # Transparent restores through the remote (plugin/remote_restore.py): request id -> the
        # snapshot it waits for, or None once it was looked up and waits for nothing.
        self.remote: RemoteRestorer | None = None
        self._remote_waits: dict[str, str | None] = {}
        self._idled = False
        if remote is not None and self.auto_restore and self.lookup is not None:
            self.remote = RemoteRestorer(remote, self.lookup.store, self.lookup.fingerprint,
                                         refresh_s=remote_refresh_s)

    def bind_block_pool(self, pool: BlockPool) -> None:
        self._block_pool = pool

    # --- admission ------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        op = parse_op(request.kv_transfer_params, self.auth)
        if not isinstance(op, CaptureOp):
            self._live[request.request_id] = request
        if isinstance(op, SnapshotOp):
            if request.request_id not in self._snapshots:
                # The control plane may append a token after the sequence (see Control); only
                # the first ``num_tokens`` prompt tokens are the sequence.
                num = min(op.num_tokens or request.num_prompt_tokens, request.num_prompt_tokens)
                state = _SnapshotState(job=op.job, num_prompt=num, next_block=op.skip_blocks)
                mark("sched.snapshot", op.job)
                if self.grouped:
                    state.group_ids = []
                    state.group_next = [first for first, _ in
                                        self.layout.stored_ranges(num, self.block_size)]
                self._snapshots[request.request_id] = state
            if self._save_resident(request):
                # Not scheduled: the worker saves the cached blocks in the next step, and the
                # control plane ends the request once the job's record is in the store.
                return None, False
        if op is None and self.remote is not None and self._waits_for_remote(
                request, num_computed_tokens):
            return None, False  # vLLM asks again at a later step
        if op is None and self.committer is not None and request.request_id not in self._sessions:
            self._start_session(request)
        if op is None and self.auto_restore:
            return self._loading(self._restore(request, num_computed_tokens))
        if not isinstance(op, CheckoutOp):
            return 0, False
        state = self._checkouts.get(request.request_id)
        if state is None:
            mark("sched.match", op.job)
            state = self._checkouts[request.request_id] = _CheckoutState(
                job=op.job, cid=op.cid, seq=op.seq)
        # Load whole blocks only, and leave at least one prompt token to compute:
        # the split point is then the one vLLM's own prefix cache would use, so the
        # continuation is bit-identical to a warm prefix-cache hit.
        loadable = (request.num_prompt_tokens - 1) // self.block_size * self.block_size
        state.local_tokens = num_computed_tokens
        if state.failed:
            return 0, False  # admitted again (preempted) after its load failed: compute
        return self._loading(max(0, loadable - num_computed_tokens))

    def _loading(self, tokens: int) -> tuple[int, bool]:
        return tokens, self.async_loads and tokens > 0

    def _waits_for_remote(self, request: Request, num_computed_tokens: int) -> bool:
        """Whether a client request must wait for a remote snapshot that holds more of its
        prompt than the store does. Looked up once per request, in memory; the fetch runs on
        the remote's own thread, and once it has committed, the request restores from the
        store like any other."""
        assert self.remote is not None and self.lookup is not None
        req_id = request.request_id
        if req_id not in self._remote_waits:
            cid = self._remote_candidate(request, num_computed_tokens)
            self._remote_waits[req_id] = cid
            if cid is not None:
                self.remote.stats.waits += 1
        cid = self._remote_waits[req_id]
        if cid is None:
            return False
        if self.remote.status(cid) != PENDING:
            self._remote_waits[req_id] = None
            return False
        if not self._idled and all(self._remote_waits.get(r) for r in self._live):
            # Nothing else to run: vLLM would step again at once, to be told the same. A
            # short nap per step keeps the loop from spinning while the pages download.
            time.sleep(REMOTE_IDLE_S)
            self._idled = True
        return True

    def _remote_candidate(self, request: Request, num_computed_tokens: int) -> str | None:
        """The remote snapshot to fetch for a request: one that holds more whole blocks of
        its prompt than the prefix cache and the store together; None for most requests."""
        assert self.remote is not None and self.lookup is not None
        loadable = (request.num_prompt_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        if loadable <= first or not _restorable(request):
            return None
        root = self.lookup.root(getattr(request, "cache_salt", None))
        if root is None:
            return None
        tokens = request.prompt_token_ids
        hit = self.remote.find(root, tokens, self.block_size, first=first, limit=loadable)
        if hit is None:
            return None
        try:
            if self.lookup.store.has_snapshot(hit.cid):
                return None
            here = self.lookup.store.longest_prefix(root, tokens, self.block_size, first=first,
                                                    limit=hit.blocks)
        except Exception:
            logger.exception("processfork: prefix lookup failed; computing instead")
            return None
        return None if here is not None and here.blocks >= hit.blocks else hit.cid

    def _start_session(self, request: Request) -> None:
        """A client request that names a session: note which of its blocks the store holds
        already (the turn's commit takes those pages as they are) and save the others."""
        assert self.lookup is not None
        ref, why = session_ref(request.kv_transfer_params, self.session_prefix)
        if ref is None:
            if why:
                logger.warning("processfork: request %s: no session commit: %s",
                               request.request_id, why)
            return
        if not _restorable(request):
            return
        salt = getattr(request, "cache_salt", None)
        hit = self.lookup.longest(request.prompt_token_ids, salt, first=0,
                                  limit=request.num_prompt_tokens // self.block_size)
        state = SessionState(
            job=uuid.uuid4().hex, ref=ref, cache_salt=salt, base=hit,
            next_block=hit.blocks if hit is not None else 0,
        )
        if self.grouped:
            start_groups(state, self.layout)
        self._sessions[request.request_id] = state

    def _restore(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens a client request can load from the store beyond the prefix cache's hit.

        The same split as a checkout (whole blocks, never the block of the last prompt token),
        so the continuation is bit-identical to a warm prefix-cache hit; the same load job, so
        the same verification, and a failed page is recomputed.
        """
        assert self.lookup is not None
        loadable = (request.num_prompt_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        state = self._checkouts.get(request.request_id)
        if loadable <= first or not _restorable(request) or (state is not None and state.failed):
            if state is not None:
                state.local_tokens = num_computed_tokens
            return 0
        if state is None or state.blocks <= first:
            # Looked up once per admission point: a request that waits for blocks is asked
            # again every step, with the same answer.
            hit = self.lookup.longest(
                request.prompt_token_ids, getattr(request, "cache_salt", None),
                first=first, limit=loadable,
            )
            if hit is not None and self.grouped:
                hit = self._window_stored(hit)
            if hit is None or hit.blocks <= first:
                if state is not None:
                    state.local_tokens = num_computed_tokens
                return 0
            job = state.job if state is not None else RESTORE_JOB_PREFIX + uuid.uuid4().hex
            fresh = _CheckoutState(job=job, cid=hit.cid, seq=hit.seq, restore=True,
                                   blocks=hit.blocks)
            if state is not None:
                fresh.reply = state.reply
            state = self._checkouts[request.request_id] = fresh
        state.local_tokens = num_computed_tokens
        return (state.blocks - first) * self.block_size

    def _window_stored(self, hit: Any) -> Any:
        """A stored prefix of a model with several KV-cache groups, if every group stored the
        blocks a request resuming after it reads; else None, and the request computes. A
        sliding-window group keeps only the window of its own sequence's end, so a request that
        shares a prefix well short of that end finds none of its window there. A state group
        stores the state at one split point only: a hit that runs past it resumes there (a
        session turn that ends on a block boundary stores the state a block before its end)."""
        assert self.lookup is not None
        try:
            groups = self._manifest(hit.cid).sequences[hit.seq].groups
        except Exception:
            logger.exception("processfork: reading snapshot %s failed; computing instead", hit.cid)
            return None
        if groups is None or len(groups) != len(self.layout.groups):
            return None
        blocks = self.layout.resume_blocks(groups, hit.blocks, self.block_size)
        return replace(hit, blocks=blocks) if blocks else None

    def _save_resident(self, request: Request) -> bool:
        """Plan a save that needs no forward pass, when the prefix cache holds every block.

        vLLM computes at least one token of any request it schedules: one forward pass over the
        whole context (all the weights, all the KV), much more than copying a few blocks. When
        the sequence ends on a block boundary and each block still to save is cached, the
        snapshot takes those blocks straight from the cache instead. They are held (reference
        counted, so not evicted or reused) until the request ends.
        """
        state = self._snapshots[request.request_id]
        if self.grouped:
            return False  # each group's blocks come from its own table, in the steps below
        if state.held is not None:
            # Planned already: the request waits for the control plane to end it. Should that
            # never come, it runs after a while like any request, so it cannot wait forever.
            return time.monotonic() - state.held_since < RESIDENT_SAVE_WAIT_S
        pool = self._block_pool
        if pool is None or state.num_prompt % self.block_size:
            return False
        end = state.num_prompt // self.block_size
        hashes = request.block_hashes
        if len(hashes) < end:
            return False
        blocks = []
        for i in range(state.next_block, end):
            cached = pool.get_cached_block(hashes[i], [0])
            if cached is None:
                return False
            blocks.append(cached[0])
        pool.touch(blocks)
        state.held = blocks
        state.held_since = time.monotonic()
        state.done = True
        self._resident_saves.append(
            SaveJob(
                job=state.job,
                req_id=request.request_id,
                first_block=state.next_block,
                block_ids=[b.block_id for b in blocks],
                final=True,
                durable=False,
            )
        )
        state.next_block = end
        return True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._checkouts.get(request.request_id)
        if state is None:
            return
        if state.reply is None:
            # A request preempted after its load is admitted again with the loaded blocks in
            # the prefix cache: the first admission is the one that says what was loaded.
            state.reply = CheckoutReply(num_external_tokens, state.local_tokens)
        if num_external_tokens <= 0:
            return
        first = state.local_tokens // self.block_size
        count = num_external_tokens // self.block_size
        covered = request.prompt_token_ids[: (first + count) * self.block_size]
        if self.grouped:
            self._plan_group_loads(request, state, blocks, first, count, tokens_digest(covered))
            return
        block_ids = blocks.get_block_ids()[0]
        state.loading = set(block_ids[first : first + count])
        mark("sched.alloc", state.job, blocks=count)
        self._pending_loads.append(
            LoadJob(
                job=state.job,
                req_id=request.request_id,
                cid=state.cid,
                seq=state.seq,
                first_block=first,
                block_ids=list(block_ids[first : first + count]),
                tokens_digest=tokens_digest(covered),
                async_load=self.async_loads,
            )
        )

    def _plan_group_loads(self, request: Request, state: _CheckoutState, blocks: KVCacheBlocks,
                          first: int, count: int, digest: str) -> None:
        """One load per KV-cache group, of the blocks vLLM allocated in that group's table: a
        sliding-window group has the null block where the window has passed (nothing to load),
        so its load starts later; the worker takes that group's pages of the sequence."""
        state.loading = set()
        for group, table in enumerate(blocks.blocks):
            wanted = [b for b in table[first : first + count] if not b.is_null]
            if not wanted:
                continue
            start = first + next(i for i, b in enumerate(table[first : first + count])
                                 if not b.is_null)
            ids = [b.block_id for b in wanted]
            state.loading.update(ids)
            self._pending_loads.append(LoadJob(
                job=state.job, req_id=request.request_id, cid=state.cid, seq=state.seq,
                first_block=start, block_ids=ids, tokens_digest=digest,
                async_load=self.async_loads, group=group,
            ))

    def forget_blocks(self, block_ids: set[int]) -> None:
        """Take blocks that failed to load out of the prefix cache.

        vLLM caches a request's blocks when it allocates them, and under the recompute policy it
        leaves a block that failed to load in the cache for the request to overwrite in a later
        step. Should the request end before that (aborted, or preempted and its blocks freed),
        the block would serve its wrong bytes to every later request with the same prefix.
        Without its hash, prefix-cache hits stop before it; the request keeps the block and
        recomputes into it.
        """
        pool = self._block_pool
        if pool is not None and block_ids:
            pool.evict_blocks(block_ids)
        for state in self._checkouts.values():
            if state.loading & block_ids:
                state.failed = True  # a later admission (after a preemption) computes instead
        if self.lookup is not None:
            self.lookup.stats.failed_blocks += len(block_ids)

    def take_stats(self) -> dict[str, int]:
        """Counter increments since the last call (for ``/metrics``); empty when none."""
        now: dict[str, int] = {}
        if self.lookup is not None:
            s = self.lookup.stats
            now.update(lookups=s.lookups, hits=s.hits, restored_requests=s.restored_requests,
                       restored_tokens=s.restored_tokens, failed_blocks=s.failed_blocks)
        if self.committer is not None:
            c = self.committer
            now.update(session_turns=c.committed, session_turn_failures=c.failed,
                       session_blocks_saved=c.blocks_saved)
        if self.remote is not None:
            r = self.remote.stats
            now.update(remote_fetches=r.fetches, remote_fetch_failures=r.fetch_failures,
                       remote_fetched_bytes=r.fetched_bytes, remote_waits=r.waits)
        delta = {k: v - self._reported.get(k, 0) for k, v in now.items()}
        self._reported = now
        return {k: v for k, v in delta.items() if v}

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        if self.committer is not None:
            self.committer.close()
        if self.lookup is not None:
            self.lookup.close()

    # --- per step -------------------------------------------------------------
    def build_step_plan(self, scheduler_output: SchedulerOutput) -> StepPlan:
        self._idled = False
        plan = StepPlan(loads=self._pending_loads, saves=self._resident_saves + self._finish_saves)
        self._pending_loads = []
        self._resident_saves = []
        self._finish_saves = []
        if not self.grouped:
            plan.fresh_blocks = fresh_blocks(scheduler_output, self.block_size)
        if self._sessions:
            self._plan_sessions(plan, scheduler_output)
        if not self._snapshots:
            return plan
        scheduled = scheduler_output.num_scheduled_tokens
        for req_id, state, computed_before in _track_blocks(scheduler_output, self._snapshots):
            self._plan_save(plan, req_id, state, computed_before, scheduled)
        return plan

    def _plan_sessions(self, plan: StepPlan, scheduler_output: SchedulerOutput) -> None:
        """Hand the worker every block of a session request (prompt or output) that becomes
        complete in this step, under a job of the step's own."""
        scheduled = scheduler_output.num_scheduled_tokens
        if self.layout.has_state:
            self._hold_offered(scheduler_output)
        for req_id, state, computed_before in _track_blocks(scheduler_output, self._sessions):
            request = self._live.get(req_id)
            if request is None:
                continue
            # Never past the tokens the request has: speculative tokens may be rejected.
            computed = min(computed_before + scheduled.get(req_id, 0), request.num_tokens)
            if state.group_ids is not None:
                assert self._block_pool is not None
                plan.saves += plan_group_step(state, self.layout, self.block_size,
                                              self._block_pool, req_id,
                                              request.num_prompt_tokens, computed_before, computed)
                continue
            end = min(computed // self.block_size, len(state.block_ids))
            if end <= state.next_block:
                continue
            job = state.step_job()
            plan.saves.append(SaveJob(job=job, req_id=req_id, first_block=state.next_block,
                                      block_ids=state.block_ids[state.next_block : end],
                                      final=True, background=True))
            state.steps.append(job)
            state.next_block = end

    def _hold_offered(self, scheduler_output: SchedulerOutput) -> None:
        """Hold the boundary states vLLM hands over for session requests (0.32 and later;
        ``plugin/session_groups.py`` says why)."""
        block_state = getattr(scheduler_output, "kv_connector_block_state", None)
        offers = getattr(block_state, "boundary_state_offloads", None) or {}
        for req_id, offered in offers.items():
            state = self._sessions.get(req_id)
            if state is not None and state.held is not None and self._block_pool is not None:
                hold_offered(state, self.layout, self.block_size, self._block_pool, offered)

    def _plan_save(
        self,
        plan: StepPlan,
        req_id: str,
        state: _SnapshotState,
        computed_before: int,
        scheduled: dict[str, int],
    ) -> None:
        """Hand the worker every block of the prompt that is complete after this step."""
        if state.done:
            return
        if state.group_ids is not None:
            self._plan_group_saves(plan, req_id, state, computed_before, scheduled)
            return
        computed_after = min(computed_before + scheduled.get(req_id, 0), state.num_prompt)
        final = computed_after >= state.num_prompt
        end = -(-state.num_prompt // self.block_size) if final else computed_after // self.block_size
        if end <= state.next_block and not final:
            return
        tail = state.num_prompt % self.block_size
        plan.saves.append(
            SaveJob(
                job=state.job,
                req_id=req_id,
                first_block=state.next_block,
                block_ids=state.block_ids[state.next_block : end],
                valid_in_last=tail if (final and tail) else None,
                final=final,
                durable=False,
            )
        )
        state.next_block = max(end, state.next_block)
        state.done = final

    def _plan_group_saves(
        self,
        plan: StepPlan,
        req_id: str,
        state: _SnapshotState,
        computed_before: int,
        scheduled: dict[str, int],
    ) -> None:
        """Several KV-cache groups: each group's blocks that are complete after this step, from
        the first block the group stores (a sliding window: the first block inside the window
        of the sequence's split point), under a job per group. A block is handed over in the
        step that computes it (or, a prefix-cache hit, in the first step), before vLLM can free
        it as the window moves on."""
        assert state.group_ids is not None
        computed_after = min(computed_before + scheduled.get(req_id, 0), state.num_prompt)
        final = computed_after >= state.num_prompt
        end = -(-state.num_prompt // self.block_size) if final else computed_after // self.block_size
        tail = state.num_prompt % self.block_size
        null = self._block_pool.null_block.block_id if self._block_pool is not None else 0
        ranges = self.layout.stored_ranges(state.num_prompt, self.block_size)
        for group, table in enumerate(state.group_ids):
            start = state.group_next[group]
            spec = self.layout.groups[group]
            # A state group stores one block, the state at the split point: saved in the step
            # that computes it (or, a prefix-cache hit, the first step), while the request
            # still holds it; vLLM frees it once the state has moved two blocks on.
            stop = min(end, ranges[group][1]) if spec.is_state else end
            if stop <= start and not final:
                continue
            ids = table[start:stop]
            if null in ids:  # never expected: the blocks a group stores are never freed first
                logger.error("processfork: snapshot %s: KV-cache group %d has no block for %d "
                             "of blocks %d-%d", state.job, group, ids.count(null), start, end - 1)
                ids = []
            plan.saves.append(SaveJob(
                job=group_job(state.job, group), req_id=req_id, first_block=start,
                block_ids=ids,
                valid_in_last=tail if (final and tail and ids and not spec.is_state) else None,
                final=final, state_group=group if spec.is_state else None, durable=False,
            ))
            state.group_next[group] = max(stop, start)
        state.done = final

    # --- completion -----------------------------------------------------------
    def request_finished(
        self, request: Request, block_ids: tuple[list[int], ...] | None = None
    ) -> tuple[bool, dict[str, Any] | None]:
        """Release what the request held; whether vLLM must keep its blocks (``block_ids``, one
        table per KV-cache group) until the worker reports them copied (a finished turn's
        window, on a model with several groups), and the reply for its ``kv_transfer_params``."""
        req_id = request.request_id
        self._live.pop(req_id, None)
        self._remote_waits.pop(req_id, None)
        op = parse_op(request.kv_transfer_params, self.auth)
        snap = self._snapshots.pop(req_id, None)
        checkout = self._checkouts.pop(req_id, None)
        if snap is not None and snap.held is not None:
            # A save still waiting for its step is dropped; one handed to the worker has run
            # (vLLM processes aborts between steps). Either way the blocks can go back.
            self._resident_saves = [j for j in self._resident_saves if j.req_id != req_id]
            if self._block_pool is not None:
                self._block_pool.free_blocks(snap.held)
        if isinstance(op, CaptureOp):
            return False, CaptureReply(self.resident_sequences(op.request_id)).to_params()
        self._remember_finished(request, snap.num_prompt if snap is not None else None)
        session = self._sessions.pop(req_id, None)
        if op is None:
            return self._client_reply(request, checkout, session, block_ids)
        if checkout is not None:
            return False, (checkout.reply or CheckoutReply()).to_params()
        # A snapshot's outcome is its job record in the store, written by the worker.
        return False, None

    def _client_reply(
        self, request: Request, checkout: _CheckoutState | None, session: SessionState | None,
        block_ids: tuple[list[int], ...] | None,
    ) -> tuple[bool, dict[str, Any] | None]:
        """A client request's reply: what a transparent restore loaded, which session turn
        will be committed (after the response: the commit runs on its own thread)."""
        reply: dict[str, Any] = {}
        delay = False
        if checkout is not None and checkout.reply is not None and checkout.reply.loaded_tokens:
            reply.update(checkout.reply.to_params()[PARAMS_KEY])
            if self.lookup is not None:
                self.lookup.stats.restored_requests += 1
                self.lookup.stats.restored_tokens += checkout.reply.loaded_tokens
        if session is not None:
            delay, turn = self._finish_session(request, session, block_ids)
            reply.update(turn)
        return delay, ({PARAMS_KEY: reply} if reply else None)

    def sent(self, req_ids: Any) -> None:
        """The worker copied these finished requests' blocks: let go of those held for them."""
        for req_id in req_ids or ():
            held = self._finish_held.pop(req_id, None)
            if held and self._block_pool is not None:
                let_go(self._block_pool, held)

    def _finish_session(
        self, request: Request, session: SessionState, block_ids: tuple[list[int], ...] | None
    ) -> tuple[bool, dict[str, Any]]:
        """Submit the turn's commit. It holds every token whose KV the engine computed: the
        prompt and the output but the last sampled token (no forward pass ran over it). Its
        whole blocks were saved in the steps that computed them; a partial last block gets no
        page (a checkout never loads it, and the next turn stores it whole). With several
        KV-cache groups, a sliding-window group's window is saved in the next step, while vLLM
        keeps the blocks (True: delay their freeing until the worker reports them copied)."""
        assert self.committer is not None and self.lookup is not None
        fingerprint = self.lookup.fingerprint()
        stopped = request.status in (RequestStatus.FINISHED_STOPPED,
                                     RequestStatus.FINISHED_LENGTH_CAPPED)
        count = request.num_tokens - 1
        whole = count // self.block_size
        handed = session.next_block
        if session.group_ids is not None:
            handed = min(n for n, g in zip(session.group_next, self.layout.groups)
                         if g.kind == FULL_ATTENTION)
        if handed < whole:  # not every whole block was handed to the worker
            whole = handed
            count = whole * self.block_size
        finish = None
        if stopped and fingerprint is not None and whole > 0 and session.group_ids is not None:
            assert self._block_pool is not None
            finish = finish_groups(session, self.layout, self.block_size, self._block_pool,
                                   request.request_id, count, block_ids,
                                   self._base_ranges(session))
        elif session.held and self._block_pool is not None:
            let_go(self._block_pool, list(session.held.values()))
            session.held = {}
        if (not stopped or fingerprint is None or whole == 0
                or (session.group_ids is not None and finish is None)):
            self.committer.discard(session.all_steps())
            return False, {"session": session.ref, "session_blocks": 0}
        steps = session.all_steps()
        if finish is not None:
            steps += [job.job for job in finish.saves]
            self._finish_saves += finish.saves
            if finish.held:
                self._finish_held[request.request_id] = finish.held
        self.committer.submit(TurnSpec(
            ref=session.ref,
            tokens=list(request.all_token_ids[:count]),
            base=session.base,
            steps=steps,
            fingerprint=fingerprint,
            cache_salt=session.cache_salt,
            block_size=self.block_size,
            groups=finish.groups if finish is not None else None,
        ))
        base = session.base.blocks if session.base is not None else 0
        # vLLM keeps the request's blocks until the worker has copied the window's.
        delay = finish is not None and bool(finish.saves)
        return delay, {"session": session.ref, "session_tokens": count,
                       "session_blocks": whole, "session_new_blocks": whole - base}

    def _base_ranges(self, session: SessionState) -> list[tuple[int, int]] | None:
        """Each group's stored blocks ``[first, end)`` in the sequence of the turn's base."""
        base = session.base
        if base is None or self.lookup is None:
            return None
        try:
            seq = self._manifest(base.cid).sequences[base.seq]
            ranges = []
            for g in range(len(self.layout.groups)):
                first, pages = seq.group_pages(g)
                ranges.append((first, first + len(pages)))
        except Exception:
            logger.exception("processfork: reading snapshot %s failed; the turn saves its "
                             "windows whole", base.cid)
            return None
        return ranges

    def _manifest(self, cid: str) -> Any:
        """A manifest from the store, from a small cache (restores and turns read them)."""
        assert self.lookup is not None
        manifest = self._manifests.get(cid)
        if manifest is None:
            manifest = self._manifests[cid] = self.lookup.store.get_snapshot(cid)
            while len(self._manifests) > 64:
                self._manifests.popitem(last=False)
        return manifest

    def _remember_finished(self, request: Request, length: int | None = None) -> None:
        """Index a finished request's sequence (a snapshot request's: the sequence alone)."""
        tokens = list(request.all_token_ids)[:length]
        if not tokens:
            return
        old = self._finished.pop(request.request_id, None)
        if old is not None:
            self._finished_tokens -= len(old.tokens)
        self._finished[request.request_id] = _FinishedSeq(
            tokens=tokens,
            block_hashes=list(request.block_hashes[: len(tokens) // self.block_size]),
            finished_at=time.time(),
        )
        self._finished_tokens += len(tokens)
        while self._finished_tokens > self.capacity_tokens and len(self._finished) > 1:
            _, dropped = self._finished.popitem(last=False)
            self._finished_tokens -= len(dropped.tokens)

    # --- resident state -------------------------------------------------------
    def _resident_prefix_tokens(self, seq: _FinishedSeq) -> int:
        """How many leading tokens of a finished sequence still sit in cached blocks."""
        pool = self._block_pool
        if pool is None or not seq.block_hashes:
            return len(seq.tokens)
        resident = 0
        for block_hash in seq.block_hashes:
            if pool.get_cached_block(block_hash, self._full_groups) is None:
                break
            resident += 1
        if resident == len(seq.block_hashes):
            return len(seq.tokens)
        return resident * self.block_size

    def resident_sequences(self, request_id: str | None = None) -> list[list[int]]:
        """Token ids of every sequence the engine holds now (or of one request).

        Running requests come first in arrival order, then finished ones whose blocks
        are still cached.  A sequence that is a prefix of another is dropped: the
        longer one holds its KV already.
        """
        if request_id:
            return self._lookup_request(request_id)
        candidates: list[list[int]] = []
        for request in self._live.values():
            if request.num_computed_tokens > 0:
                candidates.append(self._live_tokens(request))
        for seq in self._finished.values():
            keep = self._resident_prefix_tokens(seq)
            if keep > 0:
                candidates.append(seq.tokens[:keep])
        return _drop_prefixes(candidates)

    def _live_tokens(self, request: Request) -> list[int]:
        """A running request's tokens so far; a snapshot request's without the token the
        control plane appends to a block-aligned sequence (it is no part of the sequence)."""
        tokens = list(request.all_token_ids)
        snap = self._snapshots.get(request.request_id)
        return tokens if snap is None else tokens[: snap.num_prompt]

    def _lookup_request(self, request_id: str) -> list[list[int]]:
        """A request's tokens by its id or by the OpenAI id it was derived from."""
        for rid, request in self._live.items():
            if _id_matches(rid, request_id):
                return [self._live_tokens(request)]
        for rid in reversed(self._finished):
            if _id_matches(rid, request_id):
                return [list(self._finished[rid].tokens)]
        return []


def _restorable(request: Request) -> bool:
    """Whether a request's KV is a function of its token ids alone: not so with multimodal
    inputs (placeholder tokens), prompt embeddings or a LoRA adapter."""
    return not (
        getattr(request, "mm_features", None)
        or getattr(request, "prompt_embeds", None) is not None
        or getattr(request, "lora_request", None) is not None
    )


def _id_matches(internal_id: str, wanted: str) -> bool:
    """vLLM derives internal ids from the OpenAI id by appending ``-<index>`` parts."""
    return internal_id == wanted or internal_id.startswith(wanted + "-")


def _drop_prefixes(seqs: list[list[int]]) -> list[list[int]]:
    kept: list[list[int]] = []
    for i, seq in enumerate(seqs):
        covered = any(
            j != i and len(other) >= len(seq) and other[: len(seq)] == seq
            and (len(other) > len(seq) or j < i)
            for j, other in enumerate(seqs)
        )
        if not covered:
            kept.append(seq)
    return kept


class _HasBlocks(Protocol):
    block_ids: list[int]


S = TypeVar("S", bound=_HasBlocks)


def fresh_blocks(scheduler_output: SchedulerOutput, block_size: int) -> list[int]:
    """The blocks this step's forward pass writes afresh, of a model with one KV-cache group.

    A new request's blocks past its computed prefix (the blocks of a prefix-cache hit, or of
    a load, keep their contents); every block a running request is given; every block of a
    request resumed after preemption (its table is rebuilt, prefix hits included: forgetting
    too much only costs a copy). A block vLLM hands out was freed before, so what the worker
    saved from it or loaded into it earlier no longer holds.
    """
    fresh: list[int] = []
    for new_req in scheduler_output.scheduled_new_reqs:
        ids = new_req.block_ids[0] if new_req.block_ids else []
        fresh += ids[new_req.num_computed_tokens // block_size :]
    cached = scheduler_output.scheduled_cached_reqs
    for new_ids in cached.new_block_ids:
        if new_ids:
            fresh += new_ids[0]
    return fresh


def _track_blocks(scheduler_output: SchedulerOutput, states: dict[str, S]
                  ) -> list[tuple[str, S, int]]:
    """Bring the block tables of the tracked requests this step schedules up to date (a new
    request's whole table, a running one's new blocks, a resumed one's fresh table); each
    scheduled tracked request with its state and its computed tokens before the step."""
    steps: list[tuple[str, S, int]] = []
    for new_req in scheduler_output.scheduled_new_reqs:
        state = states.get(new_req.req_id)
        if state is not None:
            state.block_ids = list(new_req.block_ids[0])
            _track_groups(state, new_req.block_ids, fresh=True)
            steps.append((new_req.req_id, state, new_req.num_computed_tokens))
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        state = states.get(req_id)
        if state is None:
            continue
        new_ids = cached.new_block_ids[i]
        if req_id in cached.resumed_req_ids:
            state.block_ids = list(new_ids[0]) if new_ids else []
            _track_groups(state, new_ids, fresh=True)
        elif new_ids:
            state.block_ids.extend(new_ids[0])
            _track_groups(state, new_ids, fresh=False)
        steps.append((req_id, state, cached.num_computed_tokens[i]))
    return steps


def _track_groups(state: Any, ids: Any, *, fresh: bool) -> None:
    """Every group's block table, for states that follow several KV-cache groups."""
    tables = getattr(state, "group_ids", None)
    if tables is None:
        return
    if fresh:
        state.group_ids = [list(t) for t in ids] if ids else [[] for _ in tables]
    else:
        for table, new in zip(tables, ids):
            table.extend(new)
