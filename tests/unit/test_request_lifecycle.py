"""Requests that end early, wait, or are preempted, with our connector in vLLM's real scheduler.

Whatever happens to a request, the connector must answer ``request_finished`` once, never ask
vLLM to keep its blocks (saves finish inside the step that computed them), release every block
it held, and leave no state behind: in the scheduler side, in the worker, in the store.
"""

from __future__ import annotations

from engine_harness import Engine, blocks_of, take_snapshot, tokens
from processfork.plugin.jobs import PARAMS_KEY, JobRecord, job_meta_key
from processfork.store import Store


def _snapshot_op(job: str, n: int) -> dict:
    return {"op": "snapshot", "job": job, "skip_blocks": 0, "num_tokens": n}


def _record(engine: Engine, job: str) -> JobRecord | None:
    with Store(engine.store_path) as store:
        raw = store.meta_get(job_meta_key(job))
    return None if raw is None else JobRecord.from_json(raw)


def _pin_size(engine: Engine, pin: str) -> int | None:
    with Store(engine.store_path) as store:
        info = store.list_pins().get(pin)
    return None if info is None else len(info.digests)


# --- request_finished ---------------------------------------------------------------------------
def test_request_finished_never_delays_freeing_blocks(engine):
    requests = [
        engine.request(tokens(40)),
        engine.request(tokens(40), params=_snapshot_op("s", 40)),
        engine.request(tokens(40), params={"op": "checkout", "job": "c", "cid": "x", "seq": 0}),
        engine.request([0], params={"op": "capture"}),
    ]
    replies = [engine.connector.request_finished(r, []) for r in requests]
    assert [delay for delay, _ in replies] == [False] * 4
    assert [params for _, params in replies] == [
        None,
        None,  # a snapshot answers through its job record
        None,  # a checkout never considered for scheduling has nothing to say
        {PARAMS_KEY: {"sequences": []}},
    ]


# --- snapshots that end early -------------------------------------------------------------------
def test_a_snapshot_aborted_before_it_runs_saves_nothing(engine):
    rid = engine.add(tokens(100), params=_snapshot_op("s", 100))
    engine.abort(rid)
    engine.run()
    assert all(not s.plan.saves for s in engine.steps)
    assert _record(engine, "s") is None and _pin_size(engine, "s") is None
    engine.assert_no_leaks()


def test_a_snapshot_aborted_between_chunks_stops_saving(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    rid = engine.add(tokens(100), params=_snapshot_op("s", 100))
    engine.step()  # blocks 0-3 saved, no record yet: the job is not final
    assert _record(engine, "s") is None and _pin_size(engine, "s") == 8
    engine.abort(rid)
    engine.add(tokens(20, seed=5))
    engine.run()
    assert [len(s.plan.saves) for s in engine.steps][1:] == [0] * (len(engine.steps) - 1)
    assert _record(engine, "s") is None
    assert engine.worker_side._stats == {}  # the worker forgot the job when its request ended
    engine.assert_no_leaks()


def test_a_failed_save_is_forgotten_once_its_request_ends(make_engine, monkeypatch):
    from processfork.store import StoreFull

    engine = make_engine(max_num_batched_tokens=64)
    store = engine.worker_side.store

    def full(*args, **kwargs):
        raise StoreFull(str(engine.store_path), "no space left on device")

    monkeypatch.setattr(store, "put_pages_from", full)
    rid = engine.add(tokens(100), params=_snapshot_op("s", 100))
    engine.step()
    record = _record(engine, "s")
    assert record.error is not None and not record.final  # recorded at once
    engine.abort(rid)
    engine.add(tokens(20, seed=5))
    engine.run()
    assert engine.worker_side._stats == {}
    engine.assert_no_leaks()


# --- preemption ---------------------------------------------------------------------------------
def test_a_preempted_snapshot_saves_the_same_pages_as_an_undisturbed_one(make_engine):
    """Preempted mid-prefill when the cache runs out of blocks, it resumes with new block ids;
    the pages saved before and after are those of the sequence, in order."""
    engine = make_engine(num_blocks=10, max_num_batched_tokens=64)  # 9 usable blocks
    seq = tokens(100)
    # Two full blocks, then decoding: it takes a third block in the snapshot's second step,
    # so the snapshot (the newest request) finds none left for its last block in the third.
    first = engine.add(tokens(32, seed=9), max_tokens=20)
    rid = engine.add(seq, params=_snapshot_op("preempted", 100))
    engine.run(first, rid, max_steps=400)
    assert engine.added[rid].num_preemptions > 0

    engine.forget_cache()
    calm = engine.add(seq, params=_snapshot_op("calm", 100))
    engine.run(calm)
    preempted, undisturbed = _record(engine, "preempted"), _record(engine, "calm")
    assert preempted.succeeded and len(preempted.pages) == blocks_of(100)
    assert preempted.pages == undisturbed.pages
    engine.assert_no_leaks()


def test_a_checkout_preempted_after_its_load_reports_its_first_admission(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    busy = engine.add(tokens(126, seed=3), max_tokens=5)  # leaves 2 tokens of budget in step 2
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    engine.step()
    loading = engine.step()
    assert len(loading.plan.loads) == 1 and loading.scheduled[rid] == 2
    engine.preempt(rid)
    engine.run(busy, rid)
    assert sum(len(s.plan.loads) for s in engine.steps) == 1  # the prefix cache had them then
    assert engine.finished[rid].kv_transfer_params == {
        PARAMS_KEY: {"loaded_tokens": 96, "local_tokens": 0}
    }
    assert engine.holds(rid, seq)
    engine.assert_no_leaks()


# --- checkouts that wait or end early -----------------------------------------------------------
def test_a_checkout_that_waits_for_free_blocks_loads_once_admitted(make_engine):
    engine = make_engine(num_blocks=10, max_num_batched_tokens=256)
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    big = engine.add(tokens(100, seed=4), max_tokens=20)  # holds 7 of 9 blocks for a while
    engine.step()
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    waited = engine.step()
    assert rid not in waited.scheduled and not waited.plan.loads
    engine.run(big, rid)
    loads = [load for s in engine.steps for load in s.plan.loads]
    assert len(loads) == 1 and len(loads[0].block_ids) == 6
    assert engine.finished[rid].kv_transfer_params[PARAMS_KEY]["loaded_tokens"] == 96
    assert engine.holds(rid, seq)
    engine.assert_no_leaks()


def test_a_checkout_aborted_before_it_runs_loads_nothing(engine):
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    engine.abort(rid)
    engine.run()
    assert all(not s.plan.loads for s in engine.steps)
    assert engine.cached_prefix_blocks(seq) == []
    engine.assert_no_leaks()


def test_a_checkout_aborted_after_its_load_leaves_a_usable_prefix(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    busy = engine.add(tokens(126, seed=3), max_tokens=5)
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    engine.step()
    assert engine.step().plan.loads  # loaded, 2 of its 4 remaining tokens computed
    engine.abort(rid)
    later = engine.add(seq)
    engine.run(busy, later)
    assert engine.steps[-1].scheduled.get(later, 0) <= 100 - 96  # served by the loaded blocks
    assert engine.holds(later, seq)
    engine.assert_no_leaks()
