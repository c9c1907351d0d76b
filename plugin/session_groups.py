"""Session turns of a model with several KV-cache groups. Runs in EngineCore, for the scheduler
side (plugin/sessions.py has the turn's life; this module, which blocks of which group it saves).

A turn stores, per group, what the engine keeps of that group at the turn's split point, as a
snapshot does (docs/format.md, grouped manifests): a full-attention group every whole block,
handed to the worker in the step that computes it, as for a model with one group; a
sliding-window group only the blocks inside its window at the split point (the last whole block
before the turn's last token). Where that window lies is known only when the turn ends, since a
stop token may come at any step, while vLLM frees a sliding-window block as soon as the running
request's window has passed it, and frees, when the request finishes, the blocks outside the
window of its last computed token: the turn's split point lies up to a block earlier and may
still read one of them. So:

- in each step, the blocks vLLM is about to free that the window of the earliest possible end of
  the turn still reads are *held*: one more reference in vLLM's block pool, so no other request
  is given them. At most a block or two per sliding-window group, let go as the request moves on;
- when the request finishes, the window's blocks that the turn's stored prefix (its base) does
  not hold are handed to the worker in the next step, from the request's blocks (vLLM keeps them
  until the worker reports them copied) or from the held ones, which are let go then.

A state group (Mamba, vLLM's ``align`` mode) stores one block: the state at the turn's split
point. Its block table holds the state after exactly ``(p + 1) * block_size`` tokens in slot
``p`` once a step's computation ends on that boundary (a prefill chunk ends there, or a decode
step computes its last token); the next step copies it into the next slot and computes on from
there, so the block keeps that state, and vLLM frees it when the step after that is scheduled.
A request admitted with a prefix hit (or a load) on a boundary has the state there in the hit's
block. So:

- in each step that ends on a boundary, or starts on one after an admission, the block that
  holds the state there is *held*: the two latest such states, as the turn's split point is the
  last boundary before its last computed token, one block earlier when that token ends a block.
  So is each boundary state vLLM hands a connector by its block (vLLM 0.32 and later:
  ``kv_connector_block_state.boundary_state_offloads``), which names the state an engine that
  prefills several blocks in one step exports at the prompt's last boundary inside the chunk;
- when the request finishes, the held state at the split point is handed to the worker in the
  next step (or the base's, when the stored prefix holds that very state). A state the engine
  never held on its own (a prefill chunk that ran past the split point: vLLM keeps no state
  inside a chunk) is not stored: the turn's state group says so, and no restore resumes from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .jobs import SaveJob
from .kv_groups import FULL_ATTENTION, GroupLayout

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool

    from .sessions import SessionState

__all__ = ["GroupFinish", "TurnGroupSpec", "finish_groups", "hold_offered", "let_go",
           "plan_group_step", "start_groups", "step_job"]

logger = logging.getLogger("processfork.plugin.sessions")


@dataclass(frozen=True)
class TurnGroupSpec:
    """One KV-cache group of a finished turn: blocks ``first .. end - 1``, the first
    ``base_blocks`` of them pages of the turn's base (the stored prefix it was admitted with),
    the others saved under ``steps``, in block order."""

    first: int
    base_blocks: int
    end: int
    steps: list[str]
    state: bool = False  # a state group: at most one block, the state at the split point


@dataclass
class GroupFinish:
    """What a finished turn leaves: its groups, the saves to run in the next step, and the held
    blocks those saves copy (let go once the worker reports them copied)."""

    groups: list[TurnGroupSpec]
    saves: list[SaveJob]
    held: list[Any]


def step_job(job: str, group: int, first: int) -> str:
    """The job (and pin) of one save of a turn's group: its blocks from ``first`` on."""
    return f"{job}.g{group}.{first}"


def start_groups(state: SessionState, layout: GroupLayout) -> None:
    """Give a new session request the per-group fields: every group's table comes with its first
    scheduled step; the full-attention groups save from the end of the stored prefix on."""
    state.group_ids = [[] for _ in layout.groups]
    state.group_next = [state.next_block for _ in layout.groups]
    state.group_steps = [[] for _ in layout.groups]
    state.held = {}


def plan_group_step(state: SessionState, layout: GroupLayout, block_size: int, pool: BlockPool,
                    req_id: str, num_prompt: int, computed_before: int,
                    computed: int) -> list[SaveJob]:
    """This step's saves of a session request's full-attention groups (the blocks complete
    after it), and the holds of its sliding-window groups' blocks and of its state groups'
    states at block boundaries (see the module's doc)."""
    assert state.group_ids is not None and state.held is not None
    saves: list[SaveJob] = []
    null = pool.null_block.block_id
    whole = computed // block_size
    # The turn ends at the earliest after this step's first token and after its prompt: its split
    # point, and so the window that split reads, start no earlier than this.
    earliest = max(computed_before + 1, num_prompt)
    split = (earliest - 1) // block_size * block_size
    for g, spec in enumerate(layout.groups):
        table = state.group_ids[g]
        if spec.is_state:
            _hold_states(state, g, table, pool, block_size, computed_before, computed)
            continue
        if spec.kind == FULL_ATTENTION:
            start, end = state.group_next[g], min(whole, len(table))
            if end <= start:
                continue
            ids = table[start:end]
            if null in ids:  # never expected: a full-attention group frees nothing while it runs
                logger.error("processfork: session %s: KV-cache group %d has no block for %d of "
                             "blocks %d-%d", state.ref, g, ids.count(null), start, end - 1)
                continue  # the turn lacks these blocks: its commit fails and says so
            job = step_job(state.job, g, start)
            saves.append(SaveJob(job=job, req_id=req_id, first_block=start, block_ids=ids,
                                 final=True, background=True))
            state.group_steps[g].append(job)
            state.group_next[g] = end
            continue
        low = spec.first_kept(split, block_size)
        for key in [k for k in state.held if k[0] == g and k[1] < low]:
            let_go(pool, [state.held.pop(key)])  # no end of the turn reads it any more
        # vLLM frees the blocks before this at its next step (or at the finish).
        high = min(spec.first_kept(computed, block_size), len(table))
        for i in range(low, high):
            if (g, i) in state.held or table[i] == null:
                continue
            block = pool.blocks[table[i]]
            if block.ref_cnt <= 0:  # freed already (a preemption): no longer the request's
                continue
            pool.touch([block])
            state.held[(g, i)] = block
    return saves


def _hold_states(state: SessionState, g: int, table: list[int], pool: BlockPool,
                 block_size: int, computed_before: int, computed: int) -> None:
    """Hold the blocks of a state group that hold the state at a block boundary in this step:
    the boundary the step starts on (the hit's block, after an admission; held already when an
    earlier step ended there) and the one it ends on (the running block, which holds that state
    once the step's forward pass is done). Only the two latest states are kept."""
    assert state.held is not None
    null = pool.null_block.block_id
    for tokens in (computed_before, computed):
        slot = tokens // block_size - 1
        if tokens % block_size or slot < 0 or (g, slot) in state.held or slot >= len(table):
            continue
        if table[slot] == null:  # never expected: the request holds the state it resumes from
            continue
        block = pool.blocks[table[slot]]
        if block.ref_cnt <= 0:  # freed already: no longer the request's
            continue
        pool.touch([block])
        state.held[(g, slot)] = block
    _keep_latest(state, g, pool)


def _keep_latest(state: SessionState, g: int, pool: BlockPool) -> None:
    """Let go of every held state of group ``g`` but the two latest: the turn's split point is
    the latest boundary it reached, or the one before when its last token ends a block."""
    assert state.held is not None
    for key in sorted(k for k in state.held if k[0] == g)[:-2]:
        let_go(pool, [state.held.pop(key)])


def hold_offered(state: SessionState, layout: GroupLayout, block_size: int, pool: BlockPool,
                 offers: list[tuple[int, int, int]]) -> None:
    """Hold the boundary states vLLM hands over for a session request: ``(group, block id,
    tokens)``, the block holding the state after exactly ``tokens`` tokens, committed by the
    step that offers it. vLLM does not keep it for the request, so it is held as soon as it is
    offered, before any later step can give it to another request."""
    assert state.held is not None
    for g, block_id, tokens in offers:
        if g >= len(layout.groups) or not layout.groups[g].is_state:
            continue
        if tokens <= 0 or tokens % block_size:
            continue  # a state inside a block: no split point of a turn
        key = (g, tokens // block_size - 1)
        old = state.held.get(key)
        if old is not None and old.block_id == block_id:
            continue
        block = pool.blocks[block_id]
        pool.touch([block])
        if old is not None:
            let_go(pool, [old])  # vLLM's hand-off names the block exactly
        state.held[key] = block
        _keep_latest(state, g, pool)


def _state_group(state: SessionState, g: int, first: int, end: int, req_id: str,
                 base_state: tuple[int, int] | None) -> tuple[TurnGroupSpec, SaveJob | None, Any]:
    """A finished turn's state group: the state at its split point (slot ``first``), from the
    base when the stored prefix holds that very state, else from the held block (saved in the
    next step); none when the engine never held it (``first == end``, nothing stored)."""
    assert state.held is not None
    if end == 0:  # the split point is 0: there is no state to store
        return TurnGroupSpec(0, 0, 0, [], state=True), None, None
    if base_state == (first, end):
        return TurnGroupSpec(first, 1, end, [], state=True), None, None
    held = state.held.get((g, first))
    if held is None:
        logger.info("processfork: session %s: the engine never held the state after block %d "
                    "on its own; the turn stores no state", state.ref, end - 1)
        return TurnGroupSpec(end, 0, end, [], state=True), None, None
    job = step_job(state.job, g, first)
    save = SaveJob(job=job, req_id=req_id, first_block=first, block_ids=[held.block_id],
                   final=True, background=True, release=True, state_group=g)
    return TurnGroupSpec(first, 0, end, [job], state=True), save, held


def finish_groups(state: SessionState, layout: GroupLayout, block_size: int, pool: BlockPool,
                  req_id: str, count: int, block_ids: tuple[list[int], ...] | None,
                  base_ranges: list[tuple[int, int]] | None) -> GroupFinish | None:
    """The groups of a turn of ``count`` tokens whose whole blocks are all handed over (full
    attention) or in the engine (sliding windows), and the saves of the windows' blocks that
    the base lacks. None when a window block is gone (never expected: the turn is not
    committed). Lets go of every held block the saves do not copy."""
    assert state.group_ids is not None and state.held is not None
    null = pool.null_block.block_id
    whole = count // block_size
    base = state.base.blocks if state.base is not None else 0
    ranges = layout.stored_ranges(count, block_size)
    groups: list[TurnGroupSpec] = []
    saves: list[SaveJob] = []
    copied: list[Any] = []
    for g, spec in enumerate(layout.groups):
        if spec.kind == FULL_ATTENTION:
            groups.append(TurnGroupSpec(0, base, whole, list(state.group_steps[g])))
            continue
        if spec.is_state:
            stored = base_ranges[g] if base_ranges is not None and base >= ranges[g][1] else None
            group, save, held = _state_group(state, g, *ranges[g], req_id, stored)
            groups.append(group)
            if save is not None:
                saves.append(save)
                copied.append(held)
            continue
        first = min(ranges[g][0], whole)
        reuse = 0
        if base_ranges is not None and base_ranges[g][0] <= first:
            reuse = max(0, min(base, base_ranges[g][1], whole) - first)
        start = first + reuse
        live = list(block_ids[g]) if block_ids is not None and g < len(block_ids) else []
        ids: list[int] = []
        for i in range(start, whole):
            if i < len(live) and live[i] != null:
                ids.append(live[i])
                continue
            held = state.held.get((g, i))
            if held is None:
                logger.error("processfork: session %s: block %d of KV-cache group %d was freed "
                             "before the turn ended; the turn is not committed", state.ref, i, g)
                let_go(pool, list(state.held.values()))
                state.held = {}
                return None
            ids.append(held.block_id)
            copied.append(held)
        steps: list[str] = []
        if ids:
            job = step_job(state.job, g, start)
            saves.append(SaveJob(job=job, req_id=req_id, first_block=start, block_ids=ids,
                                 final=True, background=True, release=True))
            steps.append(job)
        groups.append(TurnGroupSpec(first, reuse, whole, steps))
    kept = {id(b) for b in copied}
    let_go(pool, [b for b in state.held.values() if id(b) not in kept])
    state.held = {}
    return GroupFinish(groups, saves, copied)


def let_go(pool: BlockPool, blocks: list[Any]) -> None:
    """Drop the references this module took (vLLM frees a block once nobody holds it)."""
    if blocks:
        pool.free_blocks(blocks)
