"""Transparent restores: a client request loads its stored prefix with no checkout, through
vLLM's real scheduler (no model, no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from engine_harness import (
    BLOCK,
    PAGE_PATHS,
    damage_page,
    page_digests,
    take_snapshot,
    tokens,
)
from processfork.plugin.jobs import PARAMS_KEY
from processfork.plugin.prefix_lookup import is_restore_job
from processfork.store import Store


def _loads(engine):
    return [job for step in engine.steps for job in step.plan.loads]


@pytest.mark.parametrize(("length", "loaded"), [(100, 96), (96, 80), (33, 32), (16, 0)])
def test_a_plain_request_loads_its_stored_prefix_at_a_checkouts_split(engine, length, loaded):
    seq = tokens(length)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    rid = engine.add(seq, max_tokens=3)
    step = engine.step()
    if loaded:
        [load] = step.plan.loads
        assert (load.cid, load.seq, load.first_block) == (cid, 0, 0)
        assert load.block_ids == step.tables[rid][: loaded // BLOCK]
        assert is_restore_job(load.job)
    else:
        assert step.plan.loads == []
    assert step.scheduled[rid] == length - loaded
    engine.run(rid)
    expected = {PARAMS_KEY: {"loaded_tokens": loaded, "local_tokens": 0}} if loaded else None
    assert engine.finished[rid].kv_transfer_params == expected
    assert engine.holds(rid, seq)
    engine.assert_no_leaks()


def test_a_longer_prompt_loads_the_stored_blocks_and_computes_the_rest(engine):
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    longer = [*seq[:96], *tokens(50, seed=4)]
    rid = engine.add(longer)
    step = engine.step()
    [load] = step.plan.loads
    assert len(load.block_ids) == 6
    assert step.scheduled[rid] == 146 - 96
    engine.run(rid)
    assert engine.holds(rid, longer)


def test_only_what_the_prefix_cache_lacks_is_loaded(engine):
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    engine.run(engine.add(seq[:40]))  # computes blocks 0-1 (and loads them: it is a prefix too)
    engine.steps.clear()
    rid = engine.add(seq)
    step = engine.step()
    [load] = step.plan.loads
    assert (load.first_block, load.block_ids) == (2, step.tables[rid][2:6])
    engine.run(rid)
    assert engine.finished[rid].kv_transfer_params == {
        PARAMS_KEY: {"loaded_tokens": 64, "local_tokens": 32}
    }
    assert engine.holds(rid, seq)


def test_a_warm_hit_never_looks_the_store_up(engine):
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    lookups = engine.side.lookup.stats.lookups
    engine.run(engine.add(seq))  # every loadable block is in the prefix cache
    assert engine.side.lookup.stats.lookups == lookups
    assert _loads(engine) == []


def test_a_miss_loads_nothing_and_costs_one_lookup(engine):
    take_snapshot(engine, "s", tokens(100))
    engine.forget_cache()
    stats = engine.side.lookup.stats
    before = (stats.lookups, stats.hits)
    rid = engine.add(tokens(100, seed=9))
    engine.run(rid)
    assert (stats.lookups, stats.hits) == (before[0] + 1, before[1])
    assert _loads(engine) == []
    assert engine.finished[rid].kv_transfer_params is None
    engine.assert_no_leaks()


def test_another_cache_salt_loads_nothing(engine):
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    rid = engine.add(seq, cache_salt="tenant-2")
    engine.run(rid)
    assert _loads(engine) == []
    assert engine.holds(rid, seq)


def test_auto_restore_off_loads_nothing(make_engine):
    engine = make_engine(worker_extra={"auto_restore": False})
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    engine.run(engine.add(seq))
    assert _loads(engine) == []
    assert engine.side.lookup.stats.lookups == 0


@pytest.mark.parametrize("path", list(PAGE_PATHS))
def test_a_damaged_page_is_recomputed_and_leaves_no_record(make_engine, path):
    engine = make_engine(worker_extra=PAGE_PATHS[path])
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        damage_page(store, page_digests(store, cid)[3][0])
        jobs_before = store.meta_items("job:")
    engine.forget_cache()
    rid = engine.add(seq)
    first = engine.step()
    assert first.invalid_block_ids == {first.tables[rid][3]}
    engine.run(rid)
    assert engine.holds(rid, seq)
    assert engine.cached_prefix_blocks(seq)[:3] == engine.tables[rid][:3]
    with Store(engine.store_path) as store:
        assert store.meta_items("job:") == jobs_before  # nobody would read a record
    assert engine.side.lookup.stats.failed_blocks == 1
    engine.assert_no_leaks()


def _counted(engine) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in engine.kv_stats:
        for key, value in stats.items():
            total[key] = total.get(key, 0) + value
    return total


def test_restores_reach_vllms_stats_as_counter_increments(engine):
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    engine.kv_stats.clear()
    engine.run(engine.add(seq))
    engine.run(engine.add(tokens(100, seed=3)))  # a miss
    assert _counted(engine) == {"lookups": 2, "hits": 1, "restored_requests": 1,
                                "restored_tokens": 96}


def test_the_counters_on_metrics_add_up_what_the_engine_reports():
    from processfork.plugin.metrics import COUNTERS, ProcessForkPromMetrics, ProcessForkStats
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram

    config = SimpleNamespace(kv_transfer_config=None)
    metrics = ProcessForkPromMetrics(config, {Counter: Counter, Gauge: Gauge, Histogram: Histogram},
                                     ["model_name", "engine"], {0: ["m", "0"]})
    labels = {"model_name": "m", "engine": "0"}
    name = COUNTERS["restored_tokens"][0] + "_total"
    before = REGISTRY.get_sample_value(name, labels) or 0.0
    stats = ProcessForkStats(data={"restored_tokens": 96, "lookups": 1})
    stats.aggregate(ProcessForkStats(data={"restored_tokens": 32, "unknown": 5}))
    assert stats.reduce()["restored_tokens"] == 128 and not stats.is_empty()
    metrics.observe(stats.to_dict(), 0)
    assert REGISTRY.get_sample_value(name, labels) == before + 128
    assert REGISTRY.get_sample_value(COUNTERS["lookups"][0] + "_total", labels) == 1
