"""The connector's worker side: the bytes it saves and loads, on every page path.

The KV tensors are real CPU-layout tensors that a fake forward pass fills (engine_harness), so
a page can be compared with the block it came from, and a restored block with the block the
engine would have computed.
"""

from __future__ import annotations

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
    damage_page,
    page_digests,
    restore_by_checkout,
    take_snapshot,
    tokens,
)
from processfork.plugin.jobs import JobErrorKind, JobRecord, engine_meta_key, job_meta_key
from processfork.store import Store, StoreFull


def _record(engine: Engine, job: str) -> JobRecord | None:
    with Store(engine.store_path) as store:
        raw = store.meta_get(job_meta_key(job))
    return None if raw is None else JobRecord.from_json(raw)


def _snapshot(engine: Engine, job: str, seq: list[int]) -> JobRecord:
    rid = engine.add(seq, params={"op": "snapshot", "job": job, "num_tokens": len(seq)})
    engine.run(rid)
    record = _record(engine, job)
    assert record is not None and record.succeeded
    return record


def _k_page(store: Store, digest: str) -> torch.Tensor:
    """A K page as ``[layer, head, head_dim, token]`` (the CPU backend's ``vec`` layout)."""
    raw = bytearray(store.get_page(bytes.fromhex(digest)))
    return torch.frombuffer(raw, dtype=torch.float32).view(LAYERS, KV_HEADS, HEAD_DIM, BLOCK)


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_a_saved_page_is_its_block_with_the_slots_past_the_end_zeroed(make_engine, path):
    engine = make_engine(worker_extra=PAGE_PATHS[path])
    engine.forget_cache()  # every slot holds garbage until computed
    seq = tokens(100)
    record = _snapshot(engine, "s", seq)
    table = engine.steps[-1].tables[engine.steps[-1].plan.saves[0].req_id]
    with Store(engine.store_path) as store:
        for index, (k, _) in enumerate(record.pages):
            page = _k_page(store, k)
            block = engine.kv.buffer[:, table[index]]
            expected = block.reshape(LAYERS, KV_HEADS, 2, -1)[:, :, 0].reshape(page.shape)
            valid = min(BLOCK, 100 - index * BLOCK)
            assert torch.equal(page[..., :valid], expected[..., :valid])
            assert torch.count_nonzero(page[..., valid:]) == 0


def test_every_page_path_stores_the_same_pages(make_engine):
    seq = tokens(100)
    pages = {}
    for path, extra in PAGE_PATHS.items():
        engine = make_engine(worker_extra=extra)
        engine.forget_cache()
        pages[path] = _snapshot(engine, f"s-{path}", seq).pages
    assert pages["pipelined"] == pages["direct"] == pages["staged"]


@pytest.mark.parametrize("path", list(PAGE_PATHS))
def test_a_restored_block_holds_what_the_engine_computed(make_engine, path):
    engine = make_engine(worker_extra=PAGE_PATHS[path])
    seq = tokens(200)
    cid = take_snapshot(engine, "s", seq)
    engine.forget_cache()
    restore_by_checkout(engine, seq, cid, loaded=192)
    assert _record(engine, "c") is None


def test_loads_skip_the_rehash_when_told_to(make_engine):
    """``verify_loads: false`` trades the integrity check for speed (docs/architecture.md)."""
    engine = make_engine(worker_extra={"verify_loads": False})
    seq = tokens(100)
    cid = take_snapshot(engine, "s", seq)
    with Store(engine.store_path) as store:
        damage_page(store, page_digests(store, cid)[1][0])
    engine.forget_cache()
    rid = engine.add(seq, params={"op": "checkout", "job": "c", "cid": cid, "seq": 0})
    assert engine.step().invalid_block_ids == set()
    engine.run(rid)
    assert not engine.holds(rid, seq, blocks=2)


def test_a_save_that_fails_keeps_its_error_through_the_final_step(make_engine, monkeypatch):
    """A full disk in the first chunk: the job is recorded as failed at once, its later saves
    write nothing, and the final step's record still carries the error."""
    engine = make_engine(max_num_batched_tokens=64)
    store = engine.worker_side.store
    put = store.put_pages_from
    calls = []

    def full_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise StoreFull(str(engine.store_path), "no space left on device")
        return put(*args, **kwargs)

    monkeypatch.setattr(store, "put_pages_from", full_once)
    rid = engine.add(tokens(100), params={"op": "snapshot", "job": "s", "num_tokens": 100})
    engine.step()
    failed = _record(engine, "s")
    assert failed.error is not None and failed.error.kind is JobErrorKind.STORE_FULL
    assert not failed.final and failed.settled
    engine.run(rid)
    final = _record(engine, "s")
    assert final.final and final.error == failed.error and not final.succeeded
    assert final.pages == [] and len(calls) == 1  # the final step wrote no page


def test_the_final_step_of_a_failed_save_does_not_bring_back_a_forgotten_record(
    make_engine, monkeypatch
):
    """The API server reads a recorded failure at once, aborts the request and deletes the
    record; the job's final save, in a step already under way, must not write it again (it
    would stay in the store, read by nothing)."""
    engine = make_engine(max_num_batched_tokens=64)
    store = engine.worker_side.store

    def full(*args, **kwargs):
        raise StoreFull(str(engine.store_path), "no space left on device")

    monkeypatch.setattr(store, "put_pages_from", full)
    rid = engine.add(tokens(100), params={"op": "snapshot", "job": "s", "num_tokens": 100})
    engine.step()
    assert _record(engine, "s").error.kind is JobErrorKind.STORE_FULL
    with Store(engine.store_path) as st:
        assert st.meta_delete(job_meta_key("s"))  # what the API server does with a failed job
    engine.run(rid)
    assert _record(engine, "s") is None
    assert engine.worker_side._stats == {}


def test_the_worker_publishes_its_engine_fingerprint(engine):
    with Store(engine.store_path) as store:
        record = store.meta_get(engine_meta_key(engine.auth))
    fingerprint = record["fingerprint"]
    assert (fingerprint["block_size"], fingerprint["num_layers"], fingerprint["num_kv_heads"],
            fingerprint["head_dim"]) == (BLOCK, LAYERS, KV_HEADS, HEAD_DIM)
    assert fingerprint["layout"] == "cpu_attn/BHN2D" and fingerprint["isa"] == "vec"
    assert record["page_bytes"] == LAYERS * KV_HEADS * BLOCK * HEAD_DIM * 4


def _state_worker(vllm_config, tmp_path, page_path: str, state_shape: list[int],
                  view_bytes: int = 1000, split: int | None = None):
    """A worker whose engine has a Mamba group (model layer 2) beside attention (layers 0, 1):
    the state layer's KV is a byte view into layer 1's tensor, as vLLM 0.32 registers it, or
    (``split``: the byte where the second one starts) two float32 views, one per state tensor,
    as other vLLM versions register a Mamba layer's convolution window and SSM state."""
    from engine_harness import FakeKVCache
    from processfork.plugin.worker_side import WorkerSide

    store = tmp_path / f"s-{page_path}"
    vllm_config.kv_transfer_config.kv_connector_extra_config = {"store": str(store)}
    shapes = [state_shape] if split is None else [[split // 4], [(view_bytes - split) // 4]]
    groups = [{"kind": "mamba", "layers": [2],
               "state": [{"dtype": "float32", "shape": shape} for shape in shapes]},
              {"kind": "full_attention", "layers": [0, 1]}]
    worker = WorkerSide(vllm_config, str(store), verify_loads=True, page_path=page_path,
                        kv_groups=groups)
    kv = FakeKVCache(8)
    block = kv.layers[LAYER_NAMES[1]].view(torch.int8).view(8, -1)
    if split is None:
        state = block[:, :view_bytes].view(8, 1, 1, view_bytes)
    else:  # as vLLM's as_strided views: a block's page apart, each in its own dtype
        floats = kv.layers[LAYER_NAMES[1]].view(8, -1)
        state = [floats[:, : split // 4], floats[:, split // 4 : view_bytes // 4]]
    return worker, {**kv.layers, "model.layers.2.mixer": state}, kv


@pytest.mark.parametrize("path", ["direct", "staged"])
@pytest.mark.parametrize("split", [None, 400], ids=["byte-view", "per-tensor-views"])
@pytest.mark.parametrize("background", [False, True], ids=["snapshot", "session-turn"])
def test_a_state_block_is_saved_with_its_padding_zeroed_on_either_page_path(
    vllm_config, tmp_path, path, split, background
):
    """1200 state bytes: all of head 0's K of the block and the start of its V. The pages hold
    them where a gather puts them, and zeros elsewhere, whichever page path copies them, in a
    snapshot's save or in a session turn's (copied in the step, written by the page writer)."""
    from processfork.plugin.jobs import SaveJob, StepPlan

    worker, caches, kv = _state_worker(vllm_config, tmp_path, path, [300], 1200, split)
    worker.register_kv_caches(caches)
    kv.buffer[:, 3].copy_(torch.randn(kv.buffer[:, 3].shape))
    expected = kv.buffer.clone()
    expected[:, 3].zero_()
    state_bytes = kv.buffer[1, 3].view(torch.int8).view(-1)[:1200]
    expected[1, 3].view(torch.int8).view(-1)[:1200].copy_(state_bytes)
    worker.save(StepPlan(saves=[SaveJob(job="s", req_id="r", first_block=3, block_ids=[3],
                                        final=True, state_group=0, background=background)]))
    worker.writer.flush()
    with Store(tmp_path / f"s-{path}") as store:
        record = JobRecord.from_json(store.meta_get(job_meta_key("s")))
        [(k, v)] = record.pages
        pages = [bytes(store.get_page(bytes.fromhex(d))) for d in (k, v)]
    kv.buffer.copy_(expected)  # the pages of the block with everything but the state zeroed
    staged = worker.codec.gather([3], worker.codec.new_staging(1))
    worker.shutdown()
    assert pages == [staged[0, i].view(torch.int8).numpy().tobytes() for i in (0, 1)]
    assert any(pages[0]) and any(pages[1])  # the state spans K and V


def test_a_state_view_of_another_size_than_the_spec_is_refused(vllm_config, tmp_path):
    worker, caches, _ = _state_worker(vllm_config, tmp_path, "direct", [300])
    with pytest.raises(ValueError, match=r"states of \[1000\] bytes, its spec says 1200"):
        worker.register_kv_caches(caches)
    worker.shutdown()
    worker, caches, _ = _state_worker(vllm_config, tmp_path, "staged", [250])
    worker.register_kv_caches(caches)  # 250 float32 values: the view's 1000 bytes
    worker.shutdown()
