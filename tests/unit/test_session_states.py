"""Session turns of a model with a state (Mamba) group: which block a turn saves as the state at
its split point (plugin/session_groups.py), against vLLM's own ``MambaManager`` in its ``align``
mode allocating and freeing the state blocks, and how the store commits and checks such a turn
(store/sessions.py, store/fsck.py)."""

from __future__ import annotations

import pytest
import torch
from processfork.plugin.kv_groups import FULL_ATTENTION, MAMBA, GroupLayout, GroupSpec
from processfork.plugin.session_groups import (
    finish_groups,
    hold_offered,
    let_go,
    plan_group_step,
    start_groups,
)
from processfork.plugin.sessions import SessionState
from processfork.store import Store
from processfork.store.manifest import FORMAT_STATE
from processfork.store.prefix_index import PrefixHit
from processfork.store.sessions import SessionTurn, TurnGroup
from store_helpers import random_pages

BS = 16
POOL = 128
LAYOUT = GroupLayout((GroupSpec(MAMBA, (0,), state=(((3, 8), "float32"),)),
                      GroupSpec(FULL_ATTENTION, (1,))))
GARBAGE = -1


class _Turn:
    """One session request computed step by step the way vLLM's scheduler allocates its blocks:
    the state group by vLLM's ``MambaManager`` (align mode: it frees a state block two steps
    after the one that wrote it), the attention group append-only. ``content`` says, per block
    id, how many tokens the state in it has seen; a block nobody references may be handed to
    another request at any time, so its content is garbage."""

    def __init__(self, base: PrefixHit | None = None, hit: int = 0):
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.single_type_kv_cache_manager import MambaManager
        from vllm.v1.kv_cache_interface import MambaSpec

        spec = MambaSpec(block_size=BS, shapes=((3, 8),), dtypes=(torch.float32,),
                         mamba_cache_mode="align")
        self.pool = BlockPool(POOL, enable_caching=False, hash_block_size=BS)
        self.mamba = MambaManager(spec, self.pool, enable_caching=False, kv_cache_group_id=0,
                                  scheduler_block_size=BS)
        self.attention: list = []
        self.content: dict[int, int] = {}
        self.state = SessionState(job="j", ref="sessions/t", cache_salt=None, base=base,
                                  next_block=base.blocks if base is not None else 0)
        start_groups(self.state, LAYOUT)
        self.computed = 0
        self.hit_block = None
        if hit:
            # A prefix hit (or a load) on a boundary: null slots, then the block of the state.
            self.hit_block = self.pool.get_new_blocks(1)[0]
            self.content[self.hit_block.block_id] = hit
            self.mamba.req_to_blocks["r"] = [self.pool.null_block] * (hit // BS - 1) + [
                self.hit_block]
            self.attention = self.pool.get_new_blocks(hit // BS)
            self.state.group_ids = [[b.block_id for b in self.mamba.req_to_blocks["r"]],
                                    [b.block_id for b in self.attention]]
            self.computed = hit

    def step(self, n: int, num_prompt: int) -> None:
        before, after = self.computed, self.computed + n
        self.mamba.remove_skipped_blocks("r", before)
        self.mamba.get_num_blocks_to_allocate("r", after, [], before, before, after)
        new = self.mamba.allocate_new_blocks("r", after, after)
        self.state.group_ids[0].extend(b.block_id for b in new)
        more = self.pool.get_new_blocks(-(-after // BS) - len(self.attention))
        self.attention += more
        self.state.group_ids[1].extend(b.block_id for b in more)
        plan_group_step(self.state, LAYOUT, BS, self.pool, "r", num_prompt, before, after)
        # The forward pass: the running block (the table's last) now holds the state at `after`.
        self.content[self.mamba.req_to_blocks["r"][-1].block_id] = after
        self.computed = after
        for block in self.pool.blocks:
            if block.ref_cnt == 0:
                self.content[block.block_id] = GARBAGE

    def run(self, prompt: int, end: int, chunk: int) -> None:
        while self.computed < end:
            left = prompt - self.computed
            self.step(min(chunk, left) if left > 0 else 1, prompt)

    def finish(self, count: int, base_ranges=None):
        live = ([b.block_id for b in self.mamba.req_to_blocks["r"]],
                [b.block_id for b in self.attention])
        return finish_groups(self.state, LAYOUT, BS, self.pool, "r", count, live, base_ranges)

    def release(self, finish) -> None:
        """The worker has copied the saves' blocks, and vLLM frees the request's."""
        let_go(self.pool, finish.held)
        self.pool.free_blocks([b for b in self.mamba.req_to_blocks["r"] if not b.is_null])
        self.pool.free_blocks(self.attention)
        assert self.pool.get_num_free_blocks() == POOL - 1  # nothing leaked, nothing held


@pytest.mark.parametrize("prompt", [20, 32, 40])
def test_a_turn_saves_the_state_at_its_split_whatever_token_it_ends_on(prompt):
    for end in range(prompt, prompt + 3 * BS + 2):
        turn = _Turn()
        turn.run(prompt, end, chunk=BS)  # vLLM's CPU engines prefill a block at a time
        split = (end - 1) // BS * BS
        finish = turn.finish(end)
        assert finish is not None
        state, full = finish.groups
        assert state.state and not full.state
        if split == 0:
            assert (state.first, state.end, finish.saves) == (0, 0, [])
        else:
            assert (state.first, state.base_blocks, state.end) == (split // BS - 1, 0, split // BS)
            [save] = finish.saves
            assert save.state_group == 0 and save.release and save.background
            assert save.first_block == split // BS - 1 and save.job in state.steps
            # The block holds the state after exactly `split` tokens: held past vLLM's free of
            # it, so nobody else was given it meanwhile.
            [block] = save.block_ids
            assert turn.content[block] == split, end
        assert (full.first, full.end) == (0, end // BS)
        turn.release(finish)


def test_a_split_inside_a_prefill_chunk_stores_no_state():
    # One chunk of 40 tokens runs past the boundaries at 16 and 32: vLLM keeps no state there.
    turn = _Turn()
    turn.run(40, 41, chunk=40)
    finish = turn.finish(41)
    state, _ = finish.groups
    assert (state.first, state.base_blocks, state.end, state.steps) == (2, 0, 2, [])
    assert finish.saves == []
    turn.release(finish)
    # A longer turn whose split the decode steps reach is stored again.
    turn = _Turn()
    turn.run(40, 50, chunk=40)
    finish = turn.finish(50)
    [save] = finish.saves
    assert turn.content[save.block_ids[0]] == 48
    turn.release(finish)


def test_a_state_vllm_hands_over_is_held_like_one_the_turn_found():
    # An engine that prefills 40 tokens in one step and exports the state at 32 from inside
    # the chunk (a GPU's prefill checkpoint) hands that block over in the step.
    turn = _Turn()
    checkpoint = turn.pool.get_new_blocks(1)[0]
    turn.content[checkpoint.block_id] = 32
    turn.pool.free_blocks([checkpoint])  # vLLM does not keep it for the request
    hold_offered(turn.state, LAYOUT, BS, turn.pool,
                 [(1, 7, 32), (0, checkpoint.block_id, 32), (0, 3, 20)])
    assert list(turn.state.held) == [(0, 1)]  # not the attention group, nor inside a block
    turn.run(40, 41, chunk=40)
    finish = turn.finish(41)
    [save] = finish.saves
    assert save.block_ids == [checkpoint.block_id] and turn.content[checkpoint.block_id] == 32
    turn.release(finish)


def test_a_turn_resumed_on_a_boundary_saves_the_state_it_resumed_from():
    # Admitted with a hit of 32 tokens; ends before the next boundary: its split is 32.
    turn = _Turn(hit=32)
    turn.run(40, 45, chunk=BS)
    finish = turn.finish(45)
    [save] = finish.saves
    assert save.block_ids == [turn.hit_block.block_id] and turn.content[save.block_ids[0]] == 32
    turn.release(finish)


def test_a_turn_names_the_state_its_base_stores_at_its_split():
    base = PrefixHit(cid="sha256:" + "0" * 64, seq=0, blocks=2)
    turn = _Turn(base=base)
    turn.run(40, 41, chunk=40)  # never held the state at 32 on its own
    finish = turn.finish(41, base_ranges=[(1, 2), (0, 2)])
    state, full = finish.groups
    assert (state.first, state.base_blocks, state.end, finish.saves) == (1, 1, 2, [])
    assert (full.base_blocks, full.end) == (2, 2)
    turn.release(finish)
    # Also when the turn holds that state itself: the base's page is named, nothing is saved.
    turn = _Turn(base=base)
    turn.run(40, 41, chunk=BS)
    finish = turn.finish(41, base_ranges=[(1, 2), (0, 2)])
    assert (finish.groups[0].base_blocks, finish.saves) == (1, [])
    turn.release(finish)
    # A base whose state is at another split point gives nothing.
    turn = _Turn(base=base)
    turn.run(40, 41, chunk=40)
    finish = turn.finish(41, base_ranges=[(0, 1), (0, 2)])
    assert (finish.groups[0].first, finish.groups[0].end, finish.saves) == (2, 2, [])
    turn.release(finish)


FINGERPRINT = {"block_size": BS, "model": "hy", "kv_groups": [g.to_json() for g in LAYOUT.groups]}


def _pages(store: Store, n: int) -> list[tuple[str, str]]:
    digests = [d.hex() for d in store.put_pages(random_pages(2 * n)).digests]
    return [(digests[i], digests[i + 1]) for i in range(0, 2 * n, 2)]


def test_a_state_turn_commits_a_state_manifest_that_fsck_accepts(tmp_path):
    with Store(tmp_path / "s") as store:
        tokens = list(range(3 * BS + 5))  # split 48: the state after block 2
        state, full = _pages(store, 1), _pages(store, 3)
        first = store.commit_turn(SessionTurn(
            ref="sessions/a", tokens=tokens, base=None, base_seq=0, base_blocks=0, pages=[],
            fingerprint=FINGERPRINT, paged_tokens=3 * BS,
            groups=[TurnGroup(2, 0, state, state=True), TurnGroup(0, 0, full)]))
        manifest = store.get_snapshot(first.cid)
        assert manifest.format == FORMAT_STATE
        assert store.meta_get("format")["version"] == 3
        [seq] = manifest.sequences
        assert seq.groups[0].state and seq.group_pages(0) == (2, state)
        # The next turn ends on a block boundary (split 48, as for any sequence of 64 tokens); one
        # more (split 64) stores none: the engine never held that state on its own.
        more = tokens + list(range(1000, 1000 + BS - 5))
        second = store.commit_turn(SessionTurn(
            ref="sessions/a", tokens=more, base=first.cid, base_seq=0, base_blocks=0, pages=[],
            fingerprint=FINGERPRINT,
            groups=[TurnGroup(2, 0, _pages(store, 1), state=True),
                    TurnGroup(0, 3, _pages(store, 1))]))
        again = more + [7] * 3
        third = store.commit_turn(SessionTurn(
            ref="sessions/a", tokens=again, base=first.cid, base_seq=0, base_blocks=0, pages=[],
            fingerprint=FINGERPRINT, paged_tokens=4 * BS,
            groups=[TurnGroup(4, 0, [], state=True), TurnGroup(0, 3, _pages(store, 1))]))
        assert store.get_snapshot(third.cid).sequences[0].groups[0].count == 0
        assert second.parent == first.cid and third.parent == second.cid
        assert list(store.fsck()) == []
        # A state at another split point than the sequence's is refused by fsck.
        wrong = store.commit_turn(SessionTurn(
            ref="sessions/b", tokens=tokens, base=None, base_seq=0, base_blocks=0, pages=[],
            fingerprint=FINGERPRINT, paged_tokens=3 * BS,
            groups=[TurnGroup(1, 0, state, state=True), TurnGroup(0, 0, full)]))
        assert [(i.kind, i.object) for i in store.fsck()] == [("bad-block-count", wrong.cid)]
