"""Saves of a rank of a tensor-parallel engine: pages of one KV head (format v4) of the heads the
rank holds, under the rank's own job record, and nothing from a replica that another rank saves.

The harness engine holds ``KV_HEADS`` heads in its tensors; telling its worker that it is a rank
of a model with more heads makes it the rank that holds those heads, which is what a worker of
a TP-2 engine sees of its share."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from engine_harness import (
    BLOCK,
    HEAD_DIM,
    KV_HEADS,
    LAYER_NAMES,
    LAYERS,
    PAGE_PATHS,
    Engine,
    blocks_of,
    control_for,
    damage_page,
    take_snapshot,
    tokens,
)
from processfork.plugin.api_models import CheckoutBody
from processfork.plugin.jobs import JobRecord, SaveJob
from processfork.plugin.tp_ranks import RankHeads, gather_ranks, rank_job_meta_key
from processfork.store import Store
from processfork.store.manifest import FORMAT, FORMAT_HEADS


def _record(engine: Engine, job: str, rank: int) -> JobRecord | None:
    with Store(engine.store_path) as store:
        raw = store.meta_get(rank_job_meta_key(job, rank))
    return None if raw is None else JobRecord.from_json(raw)


def _save(engine: Engine, job: str, seq: list[int]) -> None:
    rid = engine.add(seq, params={"op": "snapshot", "job": job, "num_tokens": len(seq)})
    engine.run(rid)


def _heads_of(store: Store, digest: str) -> list[bytes]:
    """A whole-block page cut into its heads' parts (every layer's row of one head)."""
    raw = bytearray(store.get_page(bytes.fromhex(digest)))
    t = torch.frombuffer(raw, dtype=torch.float32).view(LAYERS, KV_HEADS, -1)
    return [t[:, h].contiguous().numpy().tobytes() for h in range(KV_HEADS)]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_saves_pages_of_each_of_its_heads_under_its_own_record(make_engine, rank):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"])
    seq = tokens(100)  # the last block is partial: its slots past the end are zeroed
    _save(engine, "whole", seq)
    engine.worker_side.rank_heads = RankHeads(2 * KV_HEADS, 2, rank)
    _save(engine, "s", seq)
    whole, part = _record(engine, "whole", 0), _record(engine, "s", rank)
    assert part is not None and part.succeeded
    assert part.blocks == blocks_of(100) and len(part.pages) == blocks_of(100) * KV_HEADS
    if rank == 1:
        assert _record(engine, "s", 0) is None  # rank 0's record is rank 0's to write
    with Store(engine.store_path) as store:
        for b, (k, v) in enumerate(whole.pages):
            k_heads, v_heads = _heads_of(store, k), _heads_of(store, v)
            for h in range(KV_HEADS):
                hk, hv = part.pages[b * KV_HEADS + h]
                assert store.get_page(bytes.fromhex(hk)) == k_heads[h]
                assert store.get_page(bytes.fromhex(hv)) == v_heads[h]


def test_a_replica_of_a_head_another_rank_saves_writes_no_pages(make_engine):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"])
    engine.worker_side.rank_heads = RankHeads(1, 2, 1)  # one head, held by both ranks
    _save(engine, "s", tokens(3 * BLOCK))
    record = _record(engine, "s", 1)
    assert record is not None and record.succeeded
    assert record.pages == [] and record.bytes_written == 0
    with Store(engine.store_path) as store:
        assert store.status().num_pages == 0


def test_two_ranks_records_gather_into_every_head_of_every_block(make_engine):
    """The same engine saving as rank 0 then as rank 1 of a model of twice its heads: the
    gathered record lists rank 0's heads before rank 1's for every block."""
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"])
    seq = tokens(2 * BLOCK + 5)
    records = []
    for rank in range(2):
        engine.worker_side.rank_heads = RankHeads(2 * KV_HEADS, 2, rank)
        engine.forget_cache()
        _save(engine, "s", seq)
        records.append(_record(engine, "s", rank))
    gathered = gather_ranks(records, 2 * KV_HEADS)
    assert gathered is not None and gathered.succeeded and gathered.blocks == 3
    for b in range(3):
        for rank in range(2):
            got = gathered.pages[(b * 2 + rank) * KV_HEADS : (b * 2 + rank + 1) * KV_HEADS]
            assert got == records[rank].pages[b * KV_HEADS : (b + 1) * KV_HEADS]


def test_a_session_turn_is_not_saved_by_a_rank(make_engine):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"])
    worker = engine.worker_side
    worker.rank_heads = RankHeads(2 * KV_HEADS, 2, 1)
    with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
        worker._save_background(SaveJob(job="t", req_id="r", first_block=0, block_ids=[1], background=True))


@pytest.mark.parametrize("sessions", [None, False, True])
def test_sessions_are_off_at_tensor_parallel_sizes_unless_asked_for(vllm_config, tmp_path,
                                                                    sessions):
    """A TP-2 engine starts with sessions unset (they are off) or off; only asking for them is
    refused. At TP size 1 they stay on unless turned off."""
    from processfork.plugin.connector import ProcessForkConnector
    from processfork.plugin.connector_config import ConnectorConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    extra_config = {"store": str(tmp_path)}
    if sessions is not None:
        extra_config["sessions"] = sessions
    config = ConnectorConfig.from_extra(extra_config)
    assert config.sessions_at(1) is (sessions is not False)
    parallel = vllm_config.parallel_config
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config
    tp = parallel.tensor_parallel_size
    try:
        parallel.tensor_parallel_size = 2
        vllm_config.kv_transfer_config.kv_connector_extra_config = extra_config
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                                 dtype=torch.float32)
        kv_config = KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                                  kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)])
        if sessions:
            with pytest.raises(ValueError, match='sessions are not supported at '
                               'tensor_parallel_size=2; remove "sessions": true'):
                config.sessions_at(2)
            with pytest.raises(ValueError, match="tensor_parallel_size=2"):
                ProcessForkConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_config)
        else:
            assert config.sessions_at(2) is False
            connector = ProcessForkConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_config)
            assert connector._scheduler is not None and connector._scheduler.committer is None
            connector.shutdown()
    finally:
        parallel.tensor_parallel_size = tp
        vllm_config.kv_transfer_config.kv_connector_extra_config = extra


@pytest.mark.parametrize(("states", "tier", "message"), [
    (True, 0, "Mamba"),
    (False, 64, "host tier"),
])
def test_a_rank_refuses_what_it_cannot_save_yet(states, tier, message):
    from processfork.plugin.worker_side import _check_tensor_parallel

    with pytest.raises(ValueError, match=message):
        _check_tensor_parallel(states, tier)
    _check_tensor_parallel(False, 0)  # either page path, no states, no tier


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_a_snapshot_of_two_ranks_is_one_v4_manifest_of_every_head(make_engine, path):
    """The API server gathers the ranks' records into a page table of every KV head, drops
    every rank's record with the snapshot, and the snapshot checks out into both ranks."""
    engine: Engine = make_engine(worker_extra=PAGE_PATHS[path], tp_size=2)
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        m = store.get_snapshot(cid)
        assert m.format == FORMAT_HEADS and m.fingerprint["tp_size"] == 2
        s = m.sequences[0]
        assert s.heads == 2 * KV_HEADS and s.num_blocks == blocks_of(100)
        # Rank 1's heads hold the same bytes as rank 0's here: the same tensors back both.
        for pairs in s.block_pages():
            assert pairs[:KV_HEADS] == pairs[KV_HEADS:]
        assert store.meta_items("job:") == {}
    engine.forget_cache()
    out = asyncio.run(_checkout(engine, cid))
    assert out.tokens_loaded == 96
    rid = engine.add(seq)
    engine.run(rid)
    assert engine.holds(rid, seq)


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_a_child_snapshot_of_two_ranks_reuses_its_parents_head_pages(make_engine, path):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS[path], tp_size=2)
    seq = tokens(100)
    parent = take_snapshot(engine, "s", seq[:64])
    child = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        p, c = (store.get_snapshot(x).sequences[0] for x in (parent, child))
        assert store.get_snapshot(child).parents == [parent]
        assert c.pages[: len(p.pages)] == p.pages and c.num_blocks == blocks_of(100)


async def _checkout(engine: Engine, cid: str):
    control = control_for(engine)
    try:
        return await control.checkout(CheckoutBody(cid=cid))
    finally:
        control.close()


def test_a_damaged_page_of_a_tp2_snapshot_is_recomputed_by_both_ranks(make_engine):
    from processfork.plugin.repair import repair_snapshot

    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"], tp_size=2)
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        pages = store.get_snapshot(cid).sequences[0].pages
        damage_page(store, pages[KV_HEADS + 1][0])  # block 0, a head of rank 1
    engine.forget_cache()
    control = control_for(engine)
    try:
        out = asyncio.run(repair_snapshot(control, cid))
    finally:
        control.close()
    assert out.result == "restored" and out.recomputed_sequences == 1
    with Store(engine.store_path) as store:
        assert store.find_damage(cid).intact
        assert store.meta_items("job:") == {}


def test_a_tp2_engine_does_not_repair_whole_block_pages(make_engine):
    from processfork.plugin.api_errors import ApiError
    from processfork.plugin.repair import repair_snapshot

    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"], tp_size=2)
    with Store(engine.store_path) as store:
        cid = take_snapshot(engine, "s", tokens(100))
        m = store.get_snapshot(cid)
        seq = m.sequences[0]
        whole = dataclasses.replace(m, format=FORMAT, name="whole", sequences=[
            dataclasses.replace(seq, pages=seq.pages[::2 * KV_HEADS], heads=None)])
        bad = store.write_snapshot(whole)
        damage_page(store, whole.sequences[0].pages[0][0])
    control = control_for(engine)
    try:
        with pytest.raises(ApiError) as err:
            asyncio.run(repair_snapshot(control, bad))
    finally:
        control.close()
    assert err.value.status == 409 and "whole-block pages" in err.value.message
