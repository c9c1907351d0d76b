"""The staged page path (every GPU engine's) at a rank of a tensor-parallel engine: it saves
the same pages of one KV head (format v4) as the CPU direct path, chunk by chunk, and names a
block's head pages from memory on a later snapshot, as it does whole-block pages at TP size 1.

The harness engine at TP 2 poses as both ranks of a model of ``2 * KV_HEADS`` heads over the
same tensors (engine_harness.py); the direct path's head pages are checked against whole-block
pages in test_rank_saves.py, so matching them here checks the staged path's cut."""

from __future__ import annotations

import pytest
from engine_harness import BLOCK, KV_HEADS, PAGE_PATHS, Engine, snapshot_reply, tokens
from processfork.store import Store
from processfork.store.manifest import FORMAT_HEADS


def _table(engine: Engine, cid: str) -> list[tuple[str, str]]:
    with Store(engine.store_path) as store:
        m = store.get_snapshot(cid)
        assert m.format == FORMAT_HEADS and m.sequences[0].heads == 2 * KV_HEADS
        return list(m.sequences[0].pages)


@pytest.mark.parametrize("chunk_blocks", [2, 3, 64])
def test_a_tp2_snapshot_on_the_staged_path_holds_the_direct_paths_head_pages(make_engine,
                                                                             chunk_blocks):
    """Byte for byte (a page's name is the digest of its bytes), with a partial last block
    whose slots past the end are zeroed, and chunks that cut the save between blocks."""
    seq = tokens(7 * BLOCK + 5)
    direct = make_engine(worker_extra=PAGE_PATHS["direct"], tp_size=2)
    direct.forget_cache()  # every slot holds garbage until computed
    expected = _table(direct, snapshot_reply(direct, "direct", seq).cid)
    direct.close()
    staged = make_engine(worker_extra=PAGE_PATHS["staged"], tp_size=2)
    staged.forget_cache()
    for worker in staged.workers:
        worker._worker._staged.chunk_blocks = chunk_blocks
    reply = snapshot_reply(staged, "staged", seq)
    assert len(expected) == 8 * 2 * KV_HEADS
    assert _table(staged, reply.cid) == expected
    with Store(staged.store_path) as store:
        for k, v in expected:
            for digest in (k, v):
                assert len(store.get_page(bytes.fromhex(digest))) == (
                    staged.worker_side.codec.page_bytes // KV_HEADS)


def test_a_rank_names_its_head_pages_from_memory_on_a_later_snapshot(make_engine):
    """Each rank remembers the head pages it saved; a snapshot of the same resident blocks
    names every full block's pages without copying them, and they are the same pages."""
    engine = make_engine(worker_extra=PAGE_PATHS["staged"], tp_size=2)
    seq = tokens(6 * BLOCK + 3, seed=5)
    first = snapshot_reply(engine, "s", seq)
    assert first.reused_pages == 0
    again = snapshot_reply(engine, "s/again", seq)
    assert again.reused_pages == 6
    assert _table(engine, again.cid) == _table(engine, first.cid)
    for worker in engine.workers:
        known = worker._worker._staged._known
        assert known and all(len(pages) == 2 * KV_HEADS for pages in known.values())
