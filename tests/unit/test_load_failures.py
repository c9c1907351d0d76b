"""The contract vLLM sets for a connector's failed loads, through vLLM's real scheduler.

A load that fails must report exactly the blocks it could not fill
(``get_block_ids_with_load_errors``); vLLM then truncates the request at the first of them and
recomputes from there (``kv_load_failure_policy: recompute``, as ``pf serve`` sets it). Nothing
wrong may stay behind: no block that holds bad bytes may serve a later request as a prefix-cache
hit, and every request ends up with the KV the engine would have computed itself.

Each case runs on the three page paths: the pipelined CPU loader (the default), the direct one,
and the staged path that GPUs use.
"""

from __future__ import annotations

import pytest
from engine_harness import (
    PAGE_PATHS,
    Engine,
    damage_page,
    delete_page,
    page_digests,
    take_snapshot,
    tokens,
)
from processfork.plugin.jobs import JobErrorKind, JobRecord, job_meta_key
from processfork.store import Store


@pytest.fixture(params=list(PAGE_PATHS))
def engine(request, make_engine) -> Engine:
    return make_engine(worker_extra=PAGE_PATHS[request.param])


@pytest.fixture
def store(engine: Engine):
    with Store(engine.store_path) as store:
        yield store


def _checkout(engine: Engine, cid: str, seq_tokens: list[int], job: str, seq: int = 0) -> str:
    return engine.add(seq_tokens, params={"op": "checkout", "job": job, "cid": cid, "seq": seq})


def _record(store: Store, job: str) -> JobRecord | None:
    raw = store.meta_get(job_meta_key(job))
    return None if raw is None else JobRecord.from_json(raw)


@pytest.mark.parametrize("bad", [0, 2, 5])
def test_a_corrupt_page_reports_its_block_and_the_request_recomputes_from_it(engine, store, bad):
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    damage_page(store, page_digests(store, cid)[bad][1])  # V page of block `bad`
    engine.forget_cache()

    rid = _checkout(engine, cid, seq, "c")
    first = engine.step()
    table = first.tables[rid]
    assert first.invalid_block_ids == {table[bad]}
    request = engine.scheduler.requests[rid]
    assert request.num_computed_tokens == bad * 16  # vLLM truncates at the bad block
    assert rid not in engine.finished  # and discards the step's output

    second = engine.step()
    assert second.scheduled[rid] == 100 - bad * 16  # recomputed from the bad block on
    assert second.invalid_block_ids == set()
    engine.run(rid)
    assert engine.holds(rid, seq)
    record = _record(store, "c")
    assert record is not None and record.error is not None
    assert record.error.kind is JobErrorKind.FAILED and "CorruptPage" in record.error.message
    engine.assert_no_leaks()


def test_a_missing_page_fails_only_its_own_request(engine, store):
    one, two = tokens(100, seed=1), tokens(100, seed=2)
    cid_one, cid_two = take_snapshot(engine, "one", one), take_snapshot(engine, "two", two)
    delete_page(store, page_digests(store, cid_two)[3][0])
    engine.forget_cache()

    r1, r2 = _checkout(engine, cid_one, one, "c1"), _checkout(engine, cid_two, two, "c2")
    first = engine.step()
    assert set(first.scheduled) == {r1, r2}  # both load in the same step
    assert first.invalid_block_ids == {first.tables[r2][3]}
    engine.run(r1, r2)
    assert engine.holds(r1, one) and engine.holds(r2, two)
    assert _record(store, "c1") is None  # a load that succeeds records nothing
    assert "MissingObject" in _record(store, "c2").error.message
    engine.assert_no_leaks()


def test_tokens_that_differ_from_the_snapshot_fail_every_block_of_that_request(engine, store):
    seq, other = tokens(100, seed=1), tokens(100, seed=2)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    good, wrong = _checkout(engine, cid, seq, "good"), _checkout(engine, cid, other, "wrong")
    first = engine.step()
    assert first.invalid_block_ids == set(first.tables[wrong][:6])
    engine.run(good, wrong)
    assert engine.holds(good, seq) and engine.holds(wrong, other)
    assert _record(store, "good") is None
    assert "differ" in _record(store, "wrong").error.message


def test_a_failed_load_leaves_no_bad_block_in_the_prefix_cache(engine, store):
    """The request that loaded a bad page ends before it recomputes it (a client went away).

    vLLM caches a request's blocks when it allocates them; under the recompute policy it keeps
    a block that failed to load in the prefix cache, for the request to overwrite. If the request
    never does, the block would serve later requests its bad bytes.
    """
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    damage_page(store, page_digests(store, cid)[2][0])
    engine.forget_cache()

    rid = _checkout(engine, cid, seq, "c")
    assert engine.step().invalid_block_ids
    engine.abort(rid)  # between the failed step and the one that would recompute

    assert len(engine.cached_prefix_blocks(seq)) <= 2
    later = engine.add(seq)
    engine.run(later)
    assert engine.holds(later, seq)
    engine.assert_no_leaks()


def test_a_request_that_shares_a_bad_block_in_the_same_step_recomputes_too(engine, store):
    """A plain request admitted in the checkout's step hits the blocks being loaded."""
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    damage_page(store, page_digests(store, cid)[1][1])
    engine.forget_cache()

    rid = _checkout(engine, cid, seq, "c")
    plain = engine.add([*seq, 1, 2, 3])
    first = engine.step()
    assert first.tables[plain][:6] == first.tables[rid][:6]  # a prefix-cache hit on them
    assert first.invalid_block_ids == {first.tables[rid][1]}
    assert rid not in engine.finished and plain not in engine.finished
    engine.run(rid, plain)
    assert engine.holds(rid, seq) and engine.holds(plain, seq)
    engine.assert_no_leaks()


def test_after_a_failed_load_later_requests_compute_correct_kv(engine, store):
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    damage_page(store, page_digests(store, cid)[4][0])
    engine.forget_cache()
    engine.run(_checkout(engine, cid, seq, "c"))
    later = engine.add([*seq, 9])
    engine.run(later)
    assert engine.holds(later, seq)
