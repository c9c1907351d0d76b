"""Snapshots taken at one tensor-parallel size, loaded at another: a TP-1 engine's whole-block
pages (format v3) check out into the ranks of a TP-2 engine, each rank taking its own heads'
rows of every verified page; and transparent restores never cross TP sizes, since the bytes an
engine computes differ (slightly) between them: the request computes its prompt instead.

The harness engine at TP 2 poses as both ranks of a model of ``2 * KV_HEADS`` heads over the
same tensors (engine_harness.py), so both halves of each whole-block page built here hold its
bytes; which rows a rank takes is tested against a real TP-1 codec in test_head_pages.py."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_harness import (
    BLOCK,
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
from processfork.store.manifest import FORMAT, FORMAT_HEADS


def _as_whole_blocks(store: Store, cid: str, **fingerprint: object) -> str:
    """A v4 snapshot of every head of the model again as a TP-1 engine writes it: whole-block
    pages (each layer's rows of every head, in head order), under ``fingerprint``'s changes."""
    m = store.get_snapshot(cid)
    seq = m.sequences[0]
    heads = seq.heads
    pairs = []
    for b in range(seq.num_blocks):
        entries = seq.pages[b * heads : (b + 1) * heads]
        whole = []
        for half in range(2):
            rows = [torch.frombuffer(bytearray(store.get_page(bytes.fromhex(e[half]))),
                                     dtype=torch.float32).view(LAYERS, 1, -1) for e in entries]
            whole.append(torch.cat(rows, dim=1).numpy().tobytes())
        k, v = store.put_pages(whole).digests
        pairs.append((k.hex(), v.hex()))
    plain = Manifest(format=FORMAT, name="whole", fingerprint={**m.fingerprint, **fingerprint},
                     sequences=[SnapshotSequence(seq.tokens, pairs)])
    return store.write_snapshot(plain)


def _tp1_snapshot(engine: Engine, seq: list[int]) -> tuple[str, str]:
    """The TP-2 engine's own v4 snapshot of ``seq``, and that snapshot as a TP-1 engine's."""
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        m = store.get_snapshot(cid)
        assert m.format == FORMAT_HEADS and m.fingerprint["tp_size"] == 2
        whole = _as_whole_blocks(store, cid, tp_size=1, threads=m.fingerprint["threads"] + 1)
    return cid, whole


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_a_tp1_snapshot_checks_out_into_the_ranks_of_a_tp2_engine(make_engine, path):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS[path], tp_size=2)
    seq = tokens(100)
    _, whole = _tp1_snapshot(engine, seq)
    engine.forget_cache()
    control = control_for(engine)
    try:
        out = asyncio.run(control.checkout(CheckoutBody(cid=whole)))
    finally:
        control.close()
    assert out.tokens_loaded == 96
    rid = engine.add(seq)
    step = engine.step()
    assert step.scheduled[rid] == 100 - 96  # a prefix-cache hit of the loaded blocks
    engine.run(rid)
    assert engine.holds(rid, seq)
    engine.assert_no_leaks()


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_the_ranks_load_exactly_the_blocks_a_tp1_snapshot_holds(make_engine, path):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS[path], tp_size=2)
    seq = tokens(200)
    _, whole = _tp1_snapshot(engine, seq)
    engine.forget_cache()
    restore_by_checkout(engine, seq, whole, loaded=192)


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_a_damaged_whole_block_page_fails_the_ranks_blocks(make_engine, path):
    """A rank reads every page whole, so a page is checked against its digest before any of
    its rows is used, even the rows of heads another rank holds."""
    engine: Engine = make_engine(worker_extra=PAGE_PATHS[path], tp_size=2)
    seq = tokens(100)
    _, whole = _tp1_snapshot(engine, seq)
    with Store(engine.store_path) as store:
        damage_page(store, store.get_snapshot(whole).sequences[0].pages[2][1])
    engine.forget_cache()
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": whole, "seq": 0})
    assert engine.step().invalid_block_ids  # vLLM recomputes them
    engine.run(rid)
    assert engine.holds(rid, seq)
    with Store(engine.store_path) as store:
        record = JobRecord.from_json(store.meta_get(job_meta_key("c")))
    assert record.error is not None and "CorruptPage" in record.error.message


def test_whole_block_pages_of_a_tensor_parallel_engine_stay_refused(make_engine):
    """Only a TP-1 engine's whole-block pages hold every head of their block."""
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"], tp_size=2)
    seq = tokens(100)
    cid, _ = _tp1_snapshot(engine, seq)
    with Store(engine.store_path) as store:
        m = store.get_snapshot(cid)
        other = _as_whole_blocks(store, cid, tp_size=4, threads=m.fingerprint["threads"] + 1)
    control = control_for(engine)
    try:
        with pytest.raises(ApiError) as err:
            asyncio.run(control.checkout(CheckoutBody(cid=other)))
    finally:
        control.close()
    assert err.value.status == 409 and "tp_size=4" in err.value.message


def _loads(step):
    return step.plan.loads


def _keep_only(store: Store, cid: str) -> None:
    """Leave ``cid`` the store's only snapshot (HEAD on it): the engine's own snapshot, in its
    own partition of the prefix index, is gone."""
    store.set_ref("other", cid)
    store.checkout_head("other")
    store.delete_ref("s")
    store.gc(prune=0, expire="now")
    assert store.status().num_snapshots == 1


def test_a_tp2_engine_restores_its_own_snapshots_transparently(make_engine):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"], tp_size=2)
    seq = tokens(100)
    take_snapshot(engine, "s", seq)
    engine.forget_cache()
    longer = [*seq[:96], *tokens(40, seed=4)]
    rid = engine.add(longer)
    step = engine.step()
    [load] = _loads(step)
    assert len(load.block_ids) == 96 // BLOCK and step.scheduled[rid] == len(longer) - 96
    engine.run(rid)
    assert engine.holds(rid, longer)


def test_a_tp2_engine_computes_a_prompt_that_extends_a_tp1_snapshot(make_engine):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"], tp_size=2)
    seq = tokens(100)
    _, whole = _tp1_snapshot(engine, seq)
    with Store(engine.store_path) as store:
        _keep_only(store, whole)
    _computes_an_extension_of(engine, seq)


def test_a_tp1_engine_computes_a_prompt_that_extends_a_tp2_snapshot(make_engine):
    engine: Engine = make_engine(worker_extra=PAGE_PATHS["direct"])
    seq = tokens(100)
    with Store(engine.store_path) as store:
        plain = take_snapshot(engine, "s", seq)
        m = store.get_snapshot(plain)
        pairs = []
        for k, v in m.sequences[0].pages:
            kv = [torch.frombuffer(bytearray(store.get_page(bytes.fromhex(d))),
                                   dtype=torch.float32).view(LAYERS, KV_HEADS, -1) for d in (k, v)]
            for h in range(KV_HEADS):
                digests = store.put_pages([t[:, h].contiguous().numpy().tobytes()
                                           for t in kv]).digests
                pairs.append((digests[0].hex(), digests[1].hex()))
        heads = store.write_snapshot(Manifest(
            format=FORMAT_HEADS, name="tp2",
            fingerprint={**m.fingerprint, "tp_size": 2, "threads": m.fingerprint["threads"] + 1},
            sequences=[SnapshotSequence(m.sequences[0].tokens, pairs, heads=KV_HEADS)]))
        _keep_only(store, heads)
    _computes_an_extension_of(engine, seq)


def _computes_an_extension_of(engine: Engine, seq: list[int]) -> None:
    """A prompt extending ``seq``'s first 96 tokens loads nothing: the engine computes it all."""
    engine.forget_cache()
    longer = [*seq[:96], *tokens(40, seed=4)]
    rid = engine.add(longer)
    step = engine.step()
    assert _loads(step) == [] and step.scheduled[rid] == len(longer)
    engine.run(rid)
    assert engine.holds(rid, longer)
