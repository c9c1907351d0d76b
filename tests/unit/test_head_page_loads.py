"""Checkouts of snapshots of pages of one KV head (format v4) into an engine at TP size 1: the
worker joins every head's pages of each block into the block the engine computed, on every page
path, and a missing or damaged head page fails the job's blocks, which vLLM recomputes."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from engine_harness import (
    KV_HEADS,
    LAYERS,
    PAGE_PATHS,
    Engine,
    control_for,
    damage_page,
    restore_by_checkout,
    take_snapshot,
    tokens,
)
from processfork.plugin.api_errors import ApiError
from processfork.plugin.api_models import CheckoutBody
from processfork.plugin.jobs import JobRecord, job_meta_key
from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.manifest import FORMAT_HEADS


def _as_head_pages(store: Store, cid: str, **fingerprint: object) -> str:
    """The snapshot again as pages of one KV head: each whole-block page cut into its heads'
    parts (every layer's row of that head), under the same fingerprint unless told otherwise."""
    m = store.get_snapshot(cid)
    seq = m.sequences[0]
    pairs = []
    for k, v in seq.pages:
        kv = [torch.frombuffer(bytearray(store.get_page(bytes.fromhex(d))), dtype=torch.float32)
              .view(LAYERS, KV_HEADS, -1) for d in (k, v)]
        for h in range(KV_HEADS):
            pages = [t[:, h].contiguous().numpy().tobytes() for t in kv]
            digests = store.put_pages(pages).digests
            pairs.append((digests[0].hex(), digests[1].hex()))
    heads = Manifest(format=FORMAT_HEADS, name="heads", fingerprint={**m.fingerprint, **fingerprint},
                     sequences=[SnapshotSequence(seq.tokens, pairs, heads=KV_HEADS)])
    return store.write_snapshot(heads)


@pytest.mark.parametrize("path", list(PAGE_PATHS))
def test_a_head_page_snapshot_restores_the_blocks_the_engine_computed(make_engine, path):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS[path])
    seq = tokens(200)
    with Store(engine.store_path) as store:
        cid = _as_head_pages(store, take_snapshot(engine, "s", seq))
    engine.forget_cache()
    restore_by_checkout(engine, seq, cid, loaded=192)


def test_a_damaged_head_page_fails_the_jobs_blocks(make_engine):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"])
    seq = tokens(100)
    with Store(engine.store_path) as store:
        cid = _as_head_pages(store, take_snapshot(engine, "s", seq))
        damage_page(store, store.get_snapshot(cid).sequences[0].pages[5][1])  # block 2, head 1
    engine.forget_cache()
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    assert engine.step().invalid_block_ids  # vLLM recomputes them
    engine.run(rid)
    with Store(engine.store_path) as store:
        record = JobRecord.from_json(store.meta_get(job_meta_key("c")))
    assert record.error is not None and "CorruptPage" in record.error.message


def test_head_pages_of_another_tp_size_check_out_and_whole_block_ones_do_not(make_engine):
    engine: Engine = make_engine()
    seq = tokens(100)
    control = control_for(engine)
    try:
        with Store(engine.store_path) as store:
            plain = take_snapshot(engine, "s", seq)
            fingerprint = store.get_snapshot(plain).fingerprint
            other = {"tp_size": 2, "threads": fingerprint["threads"] + 1}
            heads = _as_head_pages(store, plain, **other)
            m = store.get_snapshot(plain)
            whole = store.write_snapshot(dataclasses.replace(
                m, name="whole", fingerprint={**m.fingerprint, **other}))
        engine.forget_cache()
        out = asyncio.run(control.checkout(CheckoutBody(cid=heads)))
        assert out.tokens_loaded == 96
        with pytest.raises(ApiError) as err:
            asyncio.run(control.checkout(CheckoutBody(cid=whole)))
        assert err.value.status == 409 and "tp_size=2" in err.value.message
    finally:
        control.close()
