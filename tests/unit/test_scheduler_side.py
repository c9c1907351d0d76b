"""The connector's scheduler side, driven by vLLM's real scheduler (no model, no server).

What it plans is checked step by step: which blocks a snapshot saves as chunked prefill computes
them, which blocks a checkout loads, what a capture reports, and what each finished request
answers in its ``kv_transfer_params``.
"""

from __future__ import annotations

import pytest
from engine_harness import BLOCK, Engine, blocks_of, take_snapshot, tokens
from processfork.plugin.jobs import (
    PARAMS_KEY,
    CaptureOp,
    CheckoutOp,
    JobRecord,
    SnapshotOp,
    job_meta_key,
    params_for,
    parse_op,
)
from processfork.store import Store


def _record(engine: Engine, job: str) -> JobRecord | None:
    with Store(engine.store_path) as store:
        raw = store.meta_get(job_meta_key(job))
    return None if raw is None else JobRecord.from_json(raw)


def _snapshot_op(job: str, n: int, skip: int = 0) -> dict:
    return {"op": "snapshot", "job": job, "skip_blocks": skip, "num_tokens": n}


# --- snapshots ----------------------------------------------------------------------------------
def test_snapshot_saves_each_block_in_the_step_that_completes_it(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    seq = tokens(100)  # 6 full blocks and 4 tokens
    rid = engine.add(seq, params=_snapshot_op("j", 100))
    engine.run(rid)
    table = engine.steps[-1].tables[rid]

    saves = [s.plan.saves for s in engine.steps]
    assert [[(j.first_block, j.block_ids, j.valid_in_last, j.final) for j in step]
            for step in saves] == [
        [(0, table[0:4], None, False)],  # 64 tokens: blocks 0-3
        [(4, table[4:7], 4, True)],  # the rest, with the partial tail
    ]
    # The snapshot's own durable commit, after the record, makes the saves durable.
    assert not any(j.durable for step in saves for j in step)
    record = _record(engine, "j")
    assert record is not None and record.succeeded
    assert record.blocks == len(record.pages) == blocks_of(100)
    assert engine.finished[rid].kv_transfer_params is None  # the record is the answer
    engine.assert_no_leaks()


def test_snapshot_starts_at_the_first_block_the_parent_lacks(engine):
    rid = engine.add(tokens(100), params=_snapshot_op("j", 100, skip=5))
    step = engine.step()
    [save] = step.plan.saves
    table = step.tables[rid]
    assert (save.first_block, save.block_ids, save.final) == (5, table[5:7], True)
    assert len(_record(engine, "j").pages) == 2


def test_snapshot_stops_at_num_tokens(engine):
    """The control plane appends a token to a block-aligned sequence; it is not saved."""
    seq = tokens(96)
    rid = engine.add([*seq, seq[-1]], params=_snapshot_op("j", 96))
    engine.run(rid)
    [save] = [j for s in engine.steps for j in s.plan.saves]
    assert (save.first_block, len(save.block_ids), save.valid_in_last) == (0, 6, None)


def test_snapshot_of_cached_blocks_holds_them_and_runs_no_forward_pass(engine):
    seq = tokens(96)
    engine.run(engine.add(seq))  # computes and caches all 6 blocks
    cached = engine.cached_prefix_blocks(seq)
    assert len(cached) == 6

    rid = engine.add([*seq, seq[-1]], params=_snapshot_op("j", 96))
    step = engine.step()
    assert rid not in step.scheduled  # no forward pass for it
    [save] = step.plan.saves
    assert (save.first_block, save.block_ids, save.final, save.durable) == (0, cached, True, False)
    assert all(engine.pool.blocks[b].ref_cnt == 1 for b in cached)  # held, not evictable
    assert _record(engine, "j").succeeded

    engine.step()
    assert rid not in engine.finished  # it waits for the control plane to end it
    engine.abort(rid)
    assert all(engine.pool.blocks[b].ref_cnt == 0 for b in cached)
    engine.assert_no_leaks()


def test_snapshot_of_partly_cached_blocks_computes_the_rest(engine):
    seq = tokens(96)
    engine.run(engine.add(seq[:40]))  # 2 blocks cached
    rid = engine.add([*seq, seq[-1]], params=_snapshot_op("j", 96))
    step = engine.step()
    assert step.scheduled[rid] == 97 - 32
    assert [len(j.block_ids) for j in step.plan.saves] == [6]
    engine.run(rid)
    assert _record(engine, "j").succeeded


# --- checkouts ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("length", "loaded"), [(100, 96), (96, 80), (33, 32), (17, 16), (16, 0)])
def test_checkout_loads_whole_blocks_before_the_block_of_the_last_token(engine, length, loaded):
    seq = tokens(length)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    step = engine.step()
    table = step.tables[rid]
    if loaded:
        [load] = step.plan.loads
        assert (load.first_block, load.block_ids) == (0, table[: loaded // BLOCK])
        assert (load.cid, load.seq, load.job) == (cid, 0, "c")
    else:
        assert step.plan.loads == []
    assert step.scheduled[rid] == length - loaded
    engine.run(rid)
    assert engine.finished[rid].kv_transfer_params == {
        PARAMS_KEY: {"loaded_tokens": loaded, "local_tokens": 0}
    }
    assert engine.holds(rid, seq)
    engine.assert_no_leaks()


def test_checkout_loads_only_what_the_prefix_cache_lacks(engine):
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    engine.run(engine.add(seq[:40]))  # the prefix cache holds 2 blocks again
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    step = engine.step()
    [load] = step.plan.loads
    assert (load.first_block, load.block_ids) == (2, step.tables[rid][2:6])
    engine.run(rid)
    assert engine.finished[rid].kv_transfer_params == {
        PARAMS_KEY: {"loaded_tokens": 64, "local_tokens": 32}
    }
    assert engine.holds(rid, seq)


def test_a_restored_prefix_serves_later_requests_from_the_prefix_cache(engine):
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    engine.run(engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0}))
    rid = engine.add([*seq, 7, 8, 9])
    assert engine.step().scheduled[rid] == 103 - 96  # vLLM's own prefix cache hit
    engine.run(rid)
    assert engine.holds(rid, seq)


# --- who may instruct the connector ---------------------------------------------------------------
@pytest.mark.parametrize("auth", [None, "forged", ""])
def test_ops_without_the_engines_id_are_ignored(make_engine, auth):
    # Without transparent restores, which would load this prefix for any request.
    engine = make_engine(worker_extra={"auto_restore": False})
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    forged = {"op": "checkout", "job": "c", "cid": cid, "seq": 0}
    requests = []
    for params in (forged, _snapshot_op("x", 100)):
        request = engine.request(seq)
        request.kv_transfer_params = {PARAMS_KEY: {**params, "auth": auth}}
        engine.scheduler.add_request(request)
        requests.append(request.request_id)
    engine.run(*requests)
    assert all(not s.plan.loads and not s.plan.saves for s in engine.steps)
    assert all(engine.finished[r].kv_transfer_params is None for r in requests)
    assert _record(engine, "x") is None
    engine.assert_no_leaks()


@pytest.mark.parametrize("params", [
    {"op": "snapshot"},  # no job
    {"op": "snapshot", "job": "j", "skip_blocks": -1},
    {"op": "snapshot", "job": "j", "num_tokens": "12"},
    {"op": "checkout", "job": "j", "cid": "sha256:00", "seq": True},
    {"op": "checkout", "job": "j"},
    {"op": "unknown", "job": "j"},
])
def test_a_malformed_op_is_ignored_and_the_request_runs(engine, params):
    rid = engine.add(tokens(40), params=params)
    engine.run(rid)
    assert engine.finished[rid].kv_transfer_params is None
    assert all(not s.plan.loads and not s.plan.saves for s in engine.steps)
    engine.assert_no_leaks()


@pytest.mark.parametrize("op", [
    SnapshotOp("j", skip_blocks=2, num_tokens=96),
    SnapshotOp("j"),
    CheckoutOp("j", "sha256:" + "0" * 64, 3),
    CaptureOp(),
    CaptureOp("cmpl-1"),
])
def test_ops_travel_as_kv_transfer_params(op):
    assert parse_op(params_for(op, "engine-1"), "engine-1") == op
    assert parse_op(params_for(op, "engine-1"), "engine-2") is None


# --- the resident-state index -------------------------------------------------------------------
def _capture(engine: Engine, request_id: str | None = None) -> list[list[int]]:
    rid = engine.add([0], params={"op": "capture", "request_id": request_id})
    engine.run(rid)
    return engine.finished[rid].kv_transfer_params[PARAMS_KEY]["sequences"]


def _full(engine: Engine, request_id: str, prompt: list[int]) -> list[int]:
    return [*prompt, *engine.finished[request_id].output_token_ids]


def test_capture_lists_finished_sequences_while_their_blocks_are_cached(engine):
    a, b = tokens(40, seed=1), tokens(50, seed=2)
    ra, rb = engine.add(a), engine.add(b)
    engine.run(ra, rb)
    full_a, full_b = _full(engine, ra, a), _full(engine, rb, b)
    assert _capture(engine) == [full_a, full_b]

    c = [*full_a, 5, 6, 7]  # continues a: its KV covers a's
    rc = engine.add(c)
    engine.run(rc)
    full_c = _full(engine, rc, c)
    assert _capture(engine) == [full_b, full_c]

    engine.pool.evict_blocks({engine.cached_prefix_blocks(b)[1]})
    assert _capture(engine) == [b[:16], full_c]  # only b's first block is still cached
    engine.assert_no_leaks()


def test_capture_includes_running_requests(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    seq = tokens(200)
    rid = engine.add(seq, max_tokens=50)
    engine.step()  # 64 of 200 tokens computed
    rc = engine.add([0], params={"op": "capture"})
    engine.run(rc)
    [found] = engine.finished[rc].kv_transfer_params[PARAMS_KEY]["sequences"]
    assert found[:200] == seq and rid not in engine.finished
    engine.run(rid)


def test_capture_of_a_running_snapshot_leaves_out_the_token_appended_to_it(make_engine):
    engine = make_engine(max_num_batched_tokens=64)
    seq = tokens(96)
    capture = engine.add([0], params={"op": "capture"})
    rid = engine.add([*seq, seq[-1]], params=_snapshot_op("j", 96))
    engine.run(capture)
    assert rid not in engine.finished  # still in its prefill
    assert engine.finished[capture].kv_transfer_params[PARAMS_KEY]["sequences"] == [seq]
    engine.run(rid)


def test_capture_finds_a_request_by_the_openai_id_it_was_derived_from(engine):
    seq = tokens(30)
    engine.run(engine.add(seq, request_id="cmpl-abc-0-1f2e", max_tokens=3))
    found = _capture(engine, "cmpl-abc")
    assert len(found) == 1 and found[0][:30] == seq and len(found[0]) == 33
    assert _capture(engine, "cmpl-ab") == []
