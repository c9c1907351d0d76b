"""A failed restore (or checkout) load under vLLM's async scheduling (the CUDA default)."""
from __future__ import annotations

import pytest
from async_harness import GARBAGE, make_async, qrun
from engine_harness import PAGE_PATHS, damage_page, page_digests, take_snapshot, tokens
from processfork.store import Store

N = 200  # 12 whole blocks + 8: the rest of the prompt fits one step, which samples


def _expected(make_engine, seq, max_tokens):
    engine = make_async(make_engine(), async_scheduling=False)
    rid = engine.add(seq, max_tokens=max_tokens)
    return qrun(engine, rid).output_token_ids


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("path", ["staged", "pipelined"])
@pytest.mark.parametrize("damaged", [False, True])
def test_a_restore_continues_as_a_cold_prefill(make_engine, async_scheduling, path, damaged):
    seq = tokens(N, seed=5)
    want = _expected(make_engine, seq, 6)
    assert GARBAGE not in want and len(want) == 6
    engine = make_engine(worker_extra=PAGE_PATHS[path])
    cid = take_snapshot(engine, "s", seq)
    if damaged:
        with Store(engine.store_path) as store:
            damage_page(store, page_digests(store, cid)[3][1])
    engine.forget_cache()
    make_async(engine, async_scheduling=async_scheduling)
    rid = engine.add(seq, max_tokens=6)
    got = qrun(engine, rid)
    loads = [j for s in engine.steps for j in s.plan.loads]
    assert loads, "restored"
    assert bool([s for s in engine.steps if s.invalid_block_ids]) == damaged
    assert got.output_token_ids == want


def test_a_failed_checkout_then_a_completion_under_async_scheduling(make_engine):
    """The GPU suite's test_a_damaged_page_is_caught_and_recomputed, on vLLM's AsyncScheduler."""
    seq = tokens(N, seed=6)
    want = _expected(make_engine, seq, 6)
    engine = make_engine(worker_extra=PAGE_PATHS["staged"])
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        damage_page(store, page_digests(store, cid)[3][1])
    engine.forget_cache()
    make_async(engine)
    checkout = engine.add(seq, params={"op": "checkout", "job": "j1", "cid": cid, "seq": 0})
    qrun(engine, checkout)
    with Store(engine.store_path) as store:
        record = store.meta_get("job:j1") or {}
    assert "CorruptPage" in str(record), record
    loads_before = len([j for s in engine.steps for j in s.plan.loads])
    rid = engine.add(seq, max_tokens=6)
    assert qrun(engine, rid).output_token_ids == want
    # The checkout recomputed the blocks after the bad one; they are cached this time, so the
    # completion is a warm hit and does not load the damaged page again.
    assert len([j for s in engine.steps for j in s.plan.loads]) == loads_before
    engine.assert_no_leaks()


def test_a_load_that_fails_at_block_0_is_not_retried(make_engine):
    seq = tokens(N, seed=7)
    want = _expected(make_engine, seq, 4)
    engine = make_engine(worker_extra=PAGE_PATHS["pipelined"])
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        damage_page(store, page_digests(store, cid)[0][0])
    engine.forget_cache()
    make_async(engine)
    rid = engine.add(seq, max_tokens=4)
    assert qrun(engine, rid).output_token_ids == want
    assert len([j for s in engine.steps for j in s.plan.loads]) == 1
    engine.assert_no_leaks()


def test_a_request_aborted_during_its_async_load(make_engine):
    from async_harness import qstep
    from vllm.v1.request import RequestStatus

    seq = tokens(N, seed=8)
    engine = make_engine()
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    make_async(engine)
    rid = engine.add(seq, max_tokens=4)
    qstep(engine)  # the load is planned and runs; its outcome is not processed yet
    assert engine.steps[-1].plan.loads
    engine.scheduler.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
    for _ in range(6):
        qstep(engine)
    engine.assert_no_leaks()
