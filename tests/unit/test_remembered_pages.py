"""Saves that name a block's pages from memory, through vLLM's real scheduler.

The staged page path remembers which pages each block holds once it saved or loaded them, and a
later snapshot of those blocks copies and hashes nothing. That is only right while no forward
pass has written the blocks since: the scheduler side tells the worker, every step, which blocks
vLLM handed out for computing. Here a small cache makes vLLM hand the same blocks to other
sequences again and again, and every snapshot must still name exactly the pages its tokens have.
"""

from __future__ import annotations

import pytest
from engine_harness import BLOCK, PAGE_PATHS, Engine, page_digests, snapshot_reply, tokens
from processfork.plugin.worker_side import WorkerSide
from processfork.store import Store


def _pages(engine: Engine, cid: str) -> list[tuple[str, str]]:
    with Store(engine.store_path) as store:
        return page_digests(store, cid)


@pytest.mark.parametrize("told", [True, False])
def test_snapshots_name_the_pages_their_tokens_have_while_blocks_change_hands(
    make_engine, monkeypatch, told
):
    """With the scheduler's word on which blocks are written afresh, every snapshot names its
    own pages; without it (the control run), the same steps name stale pages somewhere, which
    shows the steps do hand remembered blocks to other sequences."""
    seqs = {name: tokens(7 * BLOCK + 5, seed=seed)
            for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4))}
    # What each sequence's pages are, from an engine that copies every page.
    reference = make_engine(num_blocks=64)
    expected = {name: _pages(reference, snapshot_reply(reference, f"ref/{name}", seq).cid)
                for name, seq in seqs.items()}
    reference.close()
    if not told:
        monkeypatch.setattr(WorkerSide, "begin_step", lambda self, plan: None)

    # 24 blocks: two sequences of 8 blocks and a completion fit; more evicts the oldest.
    engine = make_engine(num_blocks=24, worker_extra=PAGE_PATHS["staged"])
    first = snapshot_reply(engine, "a/1", seqs["a"])
    assert first.reused_pages == 0 and _pages(engine, first.cid) == expected["a"]
    again = snapshot_reply(engine, "a/2", seqs["a"])  # resident: every full block named from memory
    assert again.reused_pages == 7 and _pages(engine, again.cid) == expected["a"]
    reused, wrong = 0, []
    for round_ in range(2):
        for i, name in enumerate(("b", "a", "c", "a", "d", "b")):
            reply = snapshot_reply(engine, f"{name}/r{round_}/{i}", seqs[name])
            if _pages(engine, reply.cid) != expected[name]:
                wrong.append((round_, i, name))
            reused += reply.reused_pages
            # A completion between snapshots: its blocks are written afresh, and some of them
            # held an earlier snapshot's pages.
            rid = engine.add(tokens(5 * BLOCK, seed=100 + round_ * 10 + i), max_tokens=3)
            engine.run(rid)
    assert reused > 0, "no snapshot found a block it remembered: the test shows nothing"
    if told:
        assert not wrong
    else:
        assert wrong, "no remembered block was handed to another sequence: the test shows nothing"


def test_a_checked_out_block_is_remembered_and_a_recomputed_one_is_not(make_engine):
    seq = tokens(6 * BLOCK + 3, seed=9)
    engine = make_engine(num_blocks=32, worker_extra=PAGE_PATHS["staged"])
    cid = snapshot_reply(engine, "s", seq).cid
    engine.forget_cache()  # as after a restart
    rid = engine.add(seq, params={"op": "checkout", "job": "j1", "cid": cid, "seq": 0})
    engine.run(rid)
    reply = snapshot_reply(engine, "s/again", seq)
    assert reply.reused_pages == 6 and _pages(engine, reply.cid) == _pages(engine, cid)
