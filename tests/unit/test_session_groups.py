"""Session turns of a model with several KV-cache groups: which blocks of which group a turn
saves (plugin/session_groups.py, against vLLM's real block pool, freeing sliding-window blocks
the way vLLM does), and how the store commits such a turn (store/sessions.py)."""

from __future__ import annotations

import pytest
from processfork.plugin.kv_groups import FULL_ATTENTION, SLIDING_WINDOW, GroupLayout, GroupSpec
from processfork.plugin.session_groups import finish_groups, let_go, plan_group_step, start_groups
from processfork.plugin.sessions import SessionState
from processfork.store import InvalidManifest, Store
from processfork.store.manifest import FORMAT_GROUPED
from processfork.store.prefix_index import PrefixHit
from processfork.store.sessions import SessionTurn, TurnGroup
from store_helpers import random_pages

BS = 32
POOL = 256


def _layout(window: int) -> GroupLayout:
    return GroupLayout((GroupSpec(SLIDING_WINDOW, (0, 2), window),
                        GroupSpec(FULL_ATTENTION, (1, 3))))


def _run_turn(layout: GroupLayout, prompt: int, end: int, chunk: int = 64):
    """Compute ``end`` tokens (the prompt in chunks, then one token per step) the way vLLM's
    scheduler allocates and frees each group's blocks, planning the session's saves each step;
    then finish the turn. Returns the pool, the finish, every block id each group's block
    index was given, and the full-attention group's saves."""
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(POOL, enable_caching=False, hash_block_size=BS)
    null = pool.null_block
    state = SessionState(job="j", ref="sessions/t", cache_salt=None, base=None, next_block=0)
    start_groups(state, layout)
    tables: list[list] = [[] for _ in layout.groups]  # vLLM's own tables (block objects)
    given: list[list[int]] = [[] for _ in layout.groups]
    full_saves = []
    sliding = layout.groups[0]
    computed = 0
    while computed < end:
        # vLLM frees the blocks its sliding window has passed before it allocates the step's.
        for i in range(min(sliding.first_kept(computed, BS), len(tables[0]))):
            if tables[0][i] is not null:
                pool.free_blocks([tables[0][i]])
                tables[0][i] = null
        step = min(chunk, prompt - computed) if computed < prompt else 1
        blocks = -(-(computed + step) // BS)
        for g, table in enumerate(tables):
            new = pool.get_new_blocks(blocks - len(table))
            table.extend(new)
            given[g].extend(b.block_id for b in new)
            state.group_ids[g].extend(b.block_id for b in new)
        saves = plan_group_step(state, layout, BS, pool, "r", prompt, computed, computed + step)
        full_saves += saves
        computed += step
    for i in range(min(sliding.first_kept(computed, BS), len(tables[0]))):
        if tables[0][i] is not null:  # the finish frees what the last token's window passed
            pool.free_blocks([tables[0][i]])
            tables[0][i] = null
    live = tuple([b.block_id for b in table] for table in tables)
    finish = finish_groups(state, layout, BS, pool, "r", computed, live, None)
    return pool, tables, finish, given, full_saves


@pytest.mark.parametrize("window", [64, 40, 100])
@pytest.mark.parametrize("prompt", [70, 96, 200])
def test_a_turn_saves_the_window_of_its_split_whatever_token_it_ends_on(window, prompt):
    layout = _layout(window)
    used_held = 0
    for end in range(prompt + 1, prompt + 3 * BS + 2):
        pool, tables, finish, given, full_saves = _run_turn(layout, prompt, end)
        assert finish is not None, end
        whole = end // BS
        first = layout.stored_ranges(end, BS)[0][0]
        sliding, full = finish.groups
        assert (sliding.first, sliding.base_blocks, sliding.end) == (first, 0, whole)
        [save] = finish.saves
        assert save.release and save.background and save.first_block == first
        # The very blocks the engine computed those positions in, none of them given to
        # anyone else meanwhile (each still referenced: by the request or by a hold).
        assert save.block_ids == given[0][first:whole]
        assert all(pool.blocks[b].ref_cnt > 0 for b in save.block_ids)
        used_held += len(finish.held)
        # The full-attention group saved every whole block once, in the steps.
        assert (full.first, full.base_blocks, full.end) == (0, 0, whole)
        assert [j.job for j in full_saves] == full.steps
        assert [b for j in full_saves for b in j.block_ids] == given[1][:whole]
        # Once the worker has copied them and vLLM has freed the request, nothing is held.
        let_go(pool, finish.held)
        for table in tables:
            pool.free_blocks([b for b in table if not b.is_null])
        assert pool.get_num_free_blocks() == POOL - 1
    # Some ends need a block vLLM had freed from the request by then: only a hold kept it.
    assert used_held > 0


def test_a_turn_takes_the_window_blocks_its_base_stores():
    layout = _layout(64)
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(POOL, enable_caching=False, hash_block_size=BS)
    base = PrefixHit(cid="sha256:" + "0" * 64, seq=0, blocks=6)
    state = SessionState(job="j", ref="sessions/t", cache_salt=None, base=base, next_block=6)
    start_groups(state, layout)
    blocks = pool.get_new_blocks(8)
    state.group_ids = [[b.block_id for b in blocks], [b.block_id for b in blocks]]
    live = ([0] * 5 + [b.block_id for b in blocks[5:]], [b.block_id for b in blocks])
    # 7 whole blocks (230 tokens): the window of the split (224) starts at block 5; the base
    # stores the sliding group's blocks 4-6 and its first 6 blocks are the turn's.
    finish = finish_groups(state, layout, BS, pool, "r", 230, live, [(4, 7), (0, 7)])
    assert finish is not None
    sliding, full = finish.groups
    assert (sliding.first, sliding.base_blocks, sliding.end) == (5, 1, 7)
    [save] = finish.saves
    assert (save.first_block, save.block_ids) == (6, [blocks[6].block_id])
    assert (full.first, full.base_blocks, full.end) == (0, 6, 7)
    # A base whose window starts after the turn's: the turn saves its window whole.
    finish = finish_groups(state, layout, BS, pool, "r", 230, live, [(6, 7), (0, 7)])
    assert finish is not None and finish.saves[0].first_block == 5


def _pages(store: Store, n: int) -> list[tuple[str, str]]:
    digests = [d.hex() for d in store.put_pages(random_pages(2 * n)).digests]
    return [(digests[i], digests[i + 1]) for i in range(0, 2 * n, 2)]


FINGERPRINT = {"block_size": BS, "model": "sw", "kv_groups": [
    {"kind": "sliding_window", "layers": [0, 2], "window": 64},
    {"kind": "full_attention", "layers": [1, 3]},
]}


def test_a_grouped_turn_commits_each_group_with_its_bases_pages_first(tmp_path):
    with Store(tmp_path / "s") as store:
        tokens = list(range(5 * BS + 7))
        window, full = _pages(store, 3), _pages(store, 5)  # blocks 2-4 and 0-4
        first = store.commit_turn(SessionTurn(
            ref="sessions/a", tokens=tokens, base=None, base_seq=0, base_blocks=0, pages=[],
            fingerprint=FINGERPRINT, paged_tokens=5 * BS,
            groups=[TurnGroup(2, 0, window), TurnGroup(0, 0, full)]))
        more = tokens + list(range(1000, 1000 + 2 * BS))  # 7 whole blocks, 7 tokens more
        new_window, new_full = _pages(store, 2), _pages(store, 2)
        second = store.commit_turn(SessionTurn(
            ref="sessions/a", tokens=more, base=first.cid, base_seq=0, base_blocks=0, pages=[],
            fingerprint=FINGERPRINT, paged_tokens=7 * BS,
            groups=[TurnGroup(4, 1, new_window), TurnGroup(0, 5, new_full)]))
        assert second.parent == first.cid and not second.new_line
        manifest = store.get_snapshot(second.cid)
        assert manifest.format == FORMAT_GROUPED
        [seq] = manifest.sequences
        assert seq.paged_tokens == 7 * BS
        assert seq.group_pages(0) == (4, window[2:] + new_window)
        assert seq.group_pages(1) == (0, full + new_full)
        assert store.meta_get("format")["version"] == 2
        assert list(store.fsck()) == []
        # A base that does not store the blocks a group takes from it: nothing is committed.
        with pytest.raises(InvalidManifest, match="KV-cache group 0"):
            store.commit_turn(SessionTurn(
                ref="sessions/a", tokens=more + [5] * BS, base=first.cid, base_seq=0,
                base_blocks=0, pages=[], fingerprint=FINGERPRINT, paged_tokens=8 * BS,
                groups=[TurnGroup(1, 2, _pages(store, 5)), TurnGroup(0, 5, _pages(store, 3))]))
        assert store.get_ref("sessions/a") == second.cid
