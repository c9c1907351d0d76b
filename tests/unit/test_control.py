"""The control plane (``Control``), driving vLLM's real scheduler and our connector in-process.

These are the API server's snapshot and checkout, minus HTTP: what they ask of the engine,
what they commit to the store, and how they answer when the engine or the store fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from engine_harness import (
    Engine,
    InProcessEngine,
    blocks_of,
    control_for,
    damage_page,
    page_digests,
    tokens,
)
from processfork.plugin.api_errors import ApiError
from processfork.plugin.api_models import (
    CheckoutBody,
    CheckoutResponse,
    SnapshotBody,
    SnapshotResponse,
)
from processfork.store import Store, StoreFull


@pytest.fixture
def control(engine: Engine) -> Iterator[Any]:
    control = control_for(engine)
    yield control
    control.close()


@pytest.fixture
def store(engine: Engine) -> Iterator[Store]:
    with Store(engine.store_path) as store:
        yield store


def _snapshot(control: Any, name: str, **body: Any) -> SnapshotResponse:
    return asyncio.run(control.snapshot(SnapshotBody(name=name, **body)))


def _checkout(control: Any, rev: str) -> CheckoutResponse:
    return asyncio.run(control.checkout(CheckoutBody(cid=rev)))


def _requests(engine: Engine, kind: str) -> list[str]:
    return [r for r in engine.added if r.startswith(f"pf-{kind}-")]


def _leftovers(store: Store) -> tuple[dict, dict]:
    """Job records and pins still in the store."""
    return store.meta_items("job:"), store.list_pins()


def test_a_snapshot_of_the_resident_state_checks_out_every_sequence(engine, control, store):
    a, b = tokens(100, seed=1), tokens(70, seed=2)
    ra, rb = engine.add(a), engine.add(b)
    engine.run(ra, rb)
    full = [[*a, *engine.finished[ra].output_token_ids], [*b, *engine.finished[rb].output_token_ids]]

    snap = _snapshot(control, "state")
    manifest = store.get_snapshot(snap.cid)
    assert [store.get_tokens(s.tokens) for s in manifest.sequences] == full
    assert snap.num_pages == blocks_of(101) + blocks_of(71) == snap.new_pages
    assert _leftovers(store) == ({}, {})

    engine.forget_cache()
    out = _checkout(control, "state")
    assert (out.tokens_loaded, out.tokens_already_resident) == (96 + 64, 0)
    assert out.pages_loaded == 6 + 4
    for rid, seq in zip(_requests(engine, "checkout"), full):
        assert engine.holds(rid, seq)
    assert store.head().ref == "state"
    assert _leftovers(store) == ({}, {})
    engine.assert_no_leaks()


def test_a_branch_saves_only_the_blocks_its_parent_lacks(engine, control, store):
    base = tokens(100)
    first = _snapshot(control, "b", token_ids=base)
    branch = [*base[:80], *tokens(40, seed=3)]  # shares 5 whole blocks with its parent
    second = _snapshot(control, "b", token_ids=branch)
    assert second.parents == [first.cid]
    [save] = [j for s in engine.steps for j in s.plan.saves if j.req_id in _requests(engine,
              "snapshot")[1:]]
    assert save.first_block == 5
    pages = page_digests(store, second.cid)
    assert pages[:5] == page_digests(store, first.cid)[:5]
    assert second.num_pages == len(pages) == blocks_of(120)


def test_a_snapshot_of_cached_blocks_runs_no_forward_pass(engine, control, store, monkeypatch):
    from processfork.plugin import scheduler_side

    # However slow the machine, the request waits for the control plane to end it.
    monkeypatch.setattr(scheduler_side, "RESIDENT_SAVE_WAIT_S", 3600.0)
    seq = tokens(96)
    engine.run(engine.add(seq))  # every block of it is in the prefix cache
    snap = _snapshot(control, "warm", token_ids=seq)
    [rid] = _requests(engine, "snapshot")
    assert all(rid not in s.scheduled for s in engine.steps)
    assert engine.finished[rid].finish_reason == "abort"  # the control plane ended it
    assert snap.num_pages == 6
    assert _leftovers(store) == ({}, {})

    engine.forget_cache()
    _checkout(control, "warm")
    [checkout] = _requests(engine, "checkout")
    assert engine.holds(checkout, seq)


def test_a_checkout_counts_loaded_and_resident_tokens(engine, control):
    seq = tokens(100)
    _snapshot(control, "s", token_ids=seq)
    engine.forget_cache()
    engine.run(engine.add(seq[:40]))  # 2 blocks back in the prefix cache
    out = _checkout(control, "s")
    assert (out.tokens_loaded, out.tokens_already_resident) == (64, 32)
    again = _checkout(control, "s")
    assert (again.tokens_loaded, again.tokens_already_resident) == (0, 96)


def test_a_damaged_snapshot_checks_out_as_an_integrity_error(engine, control, store):
    seq = tokens(100)
    _snapshot(control, "good", token_ids=tokens(50, seed=8))
    bad = _snapshot(control, "bad", token_ids=seq).cid
    asyncio.run(control.checkout(CheckoutBody(cid="good")))
    damage_page(store, page_digests(store, bad)[3][1])
    engine.forget_cache()

    with pytest.raises(ApiError) as err:
        _checkout(control, "bad")
    assert (err.value.status, err.value.type) == (500, "integrity_error")
    assert "recomputed" in err.value.message
    assert store.head().ref == "good"  # HEAD moved back
    checkout = _requests(engine, "checkout")[-1]
    assert engine.holds(checkout, seq)  # the engine recomputed what it could not load
    assert _leftovers(store) == ({}, {})
    engine.assert_no_leaks()


def _fill_disk(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    store = engine.worker_side.store

    def full(*args: Any, **kwargs: Any) -> Any:
        raise StoreFull(str(engine.store_path), "no space left on device")

    monkeypatch.setattr(store, "put_pages_from", full)


def test_a_full_disk_fails_the_snapshot_with_507_and_leaves_nothing(
    engine, control, store, monkeypatch
):
    _fill_disk(engine, monkeypatch)
    with pytest.raises(ApiError) as err:
        _snapshot(control, "s", token_ids=tokens(100))
    assert (err.value.status, err.value.type) == (507, "store_full")
    assert "StoreFull" in err.value.message
    assert store.list_refs() == {} and _leftovers(store) == ({}, {})
    engine.assert_no_leaks()


def test_a_full_disk_is_507_even_when_the_last_save_ran_before_the_abort(
    make_engine, store, monkeypatch
):
    """The save fails in the first chunk; the engine's next step, already under way when the
    control plane asks it to stop, runs the last save and records the job as final, with the
    error kept."""
    engine = make_engine(max_num_batched_tokens=64)
    control = control_for(engine, late_aborts=True)
    _fill_disk(engine, monkeypatch)
    try:
        with pytest.raises(ApiError) as err:
            _snapshot(control, "s", token_ids=tokens(100))
    finally:
        control.close()
    assert (err.value.status, err.value.type) == (507, "store_full")
    [rid] = _requests(engine, "snapshot")
    assert engine.finished[rid].finish_reason != "abort"  # it ran to its end
    assert _leftovers(store) == ({}, {})


def test_a_snapshot_of_nothing_is_409_and_of_an_unknown_request_404(control):
    with pytest.raises(ApiError) as err:
        _snapshot(control, "s")
    assert (err.value.status, err.value.type) == (409, "nothing_resident")
    with pytest.raises(ApiError) as err:
        _snapshot(control, "s", request_id="cmpl-nope")
    assert (err.value.status, err.value.type) == (404, "not_found")


def test_a_snapshot_by_request_id_holds_the_prompt_and_the_output(engine, control, store):
    seq = tokens(60)
    rid = engine.add(seq, request_id="cmpl-42-0-9a8b", max_tokens=4)
    engine.run(rid)
    snap = _snapshot(control, "r", request_id="cmpl-42")
    [sequence] = store.get_snapshot(snap.cid).sequences
    assert store.get_tokens(sequence.tokens) == [*seq, *engine.finished[rid].output_token_ids]


def test_the_engine_client_stand_in_ends_aborted_requests_like_vllm(engine):
    """The stand-in's abort gives the final output vLLM's AsyncLLM gives: finished, with no
    kv_transfer_params."""
    client = InProcessEngine(engine)

    async def run() -> Any:
        from vllm.sampling_params import SamplingParams

        async def consume() -> list[Any]:
            sampling = SamplingParams(max_tokens=50)
            return [o async for o in client.generate({"prompt_token_ids": tokens(20)}, sampling,
                                                     "r1")]

        task = asyncio.ensure_future(consume())
        while not engine.steps:  # running
            await asyncio.sleep(0)
        await client.abort("r1")
        return await task

    [final] = asyncio.run(run())
    assert final.finished and final.kv_transfer_params is None
    assert engine.finished["r1"].finish_reason == "abort"
    engine.assert_no_leaks()

