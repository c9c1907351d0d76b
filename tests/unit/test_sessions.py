"""Session turns: a client request that names a session is committed to ``sessions/NAME`` when it
finishes, through vLLM's real scheduler (no model, no server)."""

from __future__ import annotations

import pytest
from engine_harness import BLOCK, take_snapshot, tokens
from processfork.plugin.jobs import PARAMS_KEY
from processfork.store import Store


def _session(name: str) -> dict:
    return {PARAMS_KEY: {"session": name}}


def _turn(engine, prompt: list[int], name: str = "a", max_tokens: int = 40):
    rid = engine.add(prompt, client_params=_session(name), max_tokens=max_tokens)
    engine.run(rid)
    engine.side.committer.flush()
    request = engine.added[rid]
    return rid, list(request.all_token_ids)


def _saves(engine, rid):
    return [job for step in engine.steps for job in step.plan.saves if job.req_id == rid]


def test_a_turn_commits_every_token_of_its_prompt_and_output_the_engine_computed(engine):
    prompt = tokens(100)
    rid, everything = _turn(engine, prompt)  # 100 + 40 tokens; the engine computed 139
    reply = engine.finished[rid].kv_transfer_params[PARAMS_KEY]
    assert reply == {"session": "sessions/a", "session_tokens": 139, "session_blocks": 8,
                     "session_new_blocks": 8}
    # Whole blocks are saved in the steps that complete them, prompt blocks and output blocks
    # alike, off the step's critical path; the partial last block (11 tokens) gets no page.
    saves = _saves(engine, rid)
    assert [j.first_block for j in saves][:1] == [0] and sum(len(j.block_ids) for j in saves) == 8
    # A session turn's saves are synced by the page writer's own commits.
    assert all(j.background and j.durable and j.valid_in_last is None for j in saves)
    with Store(engine.store_path) as store:
        cid = store.get_ref("sessions/a")
        manifest = store.get_snapshot(cid)
        [seq] = manifest.sequences
        assert store.get_tokens(seq.tokens) == everything[:139]
        assert len(seq.pages) == 8 and seq.paged_tokens == 128
        assert store.meta_get("format")["version"] == 2  # version-1 readers refuse the store
        assert list(store.fsck()) == []
        assert manifest.parents == [] and manifest.name == "sessions/a"
        assert store.head().cid != cid  # a session turn leaves HEAD alone
        assert store.list_pins() == {} and store.meta_items("job:") == {}
        turn_pages = seq.pages
    # A commit runs after its request; vLLM collects the count with its next step.
    engine.run(engine.add(tokens(20, seed=11)))
    counted: dict[str, int] = {}
    for stats in engine.kv_stats:
        for key, value in stats.items():
            counted[key] = counted.get(key, 0) + value
    assert counted["session_turns"] == 1 and counted["session_blocks_saved"] == 8
    # The same pages a snapshot of those tokens stores: the engine's own KV, byte for byte. The
    # snapshot, unlike the turn, stores its partial last block too.
    with Store(engine.store_path) as store:
        check = store.get_snapshot(take_snapshot(engine, "check", everything[:139])).sequences[0]
        assert check.pages[:8] == turn_pages and len(check.pages) == 9
        assert check.paged_tokens is None
    engine.assert_no_leaks()


def test_the_next_turn_writes_only_its_new_blocks_and_chains_to_the_last(engine):
    _, first = _turn(engine, tokens(100))
    with Store(engine.store_path) as store:
        parent = store.get_ref("sessions/a")
    prompt = first + tokens(30, seed=2)  # the whole history, and a new message
    rid, second = _turn(engine, prompt, max_tokens=10)
    saves = _saves(engine, rid)
    assert saves[0].first_block == 8  # blocks 0-7 are the first turn's pages
    reply = engine.finished[rid].kv_transfer_params[PARAMS_KEY]
    blocks = (len(second) - 1) // BLOCK
    assert reply["session_blocks"] == blocks and reply["session_new_blocks"] == blocks - 8
    with Store(engine.store_path) as store:
        cid = store.get_ref("sessions/a")
        manifest = store.get_snapshot(cid)
        assert manifest.parents == [parent]
        assert store.get_tokens(manifest.sequences[0].tokens) == second[:-1]
        assert manifest.sequences[0].pages[:8] == store.get_snapshot(parent).sequences[0].pages[:8]
        assert [e.action for e in store.reflog("sessions/a")] == ["snapshot", "snapshot"]


def test_a_rolled_back_session_continues_from_where_it_was_set(engine):
    _, first = _turn(engine, tokens(100))
    with Store(engine.store_path) as store:
        turn1 = store.get_ref("sessions/a")
    _turn(engine, first + tokens(40, seed=3), max_tokens=4)
    with Store(engine.store_path) as store:
        store.set_ref("sessions/a", turn1, message="reset")
    _turn(engine, first + tokens(40, seed=4), max_tokens=4)
    with Store(engine.store_path) as store:
        assert store.get_snapshot(store.get_ref("sessions/a")).parents == [turn1]


def test_a_turn_that_does_not_continue_the_session_starts_a_new_line(engine):
    _turn(engine, tokens(100))
    _turn(engine, tokens(100, seed=5))
    with Store(engine.store_path) as store:
        manifest = store.get_snapshot(store.get_ref("sessions/a"))
        assert manifest.parents == []
        assert "new line of history" in store.reflog("sessions/a")[-1].message


def test_two_sessions_with_one_system_prompt_share_its_pages(engine):
    system = tokens(64, seed=7)
    _turn(engine, system + tokens(40, seed=8), name="x")
    rid, _ = _turn(engine, system + tokens(40, seed=9), name="y")
    shared = 64 // BLOCK
    assert _saves(engine, rid)[0].first_block == shared  # the system prompt's blocks are stored
    with Store(engine.store_path) as store:
        x = store.get_snapshot(store.get_ref("sessions/x")).sequences[0].pages
        y = store.get_snapshot(store.get_ref("sessions/y")).sequences[0].pages
    assert x[:shared] == y[:shared] and x[shared] != y[shared]


def test_an_aborted_turn_commits_nothing_and_leaves_no_pins(engine):
    rid = engine.add(tokens(100), client_params=_session("a"), max_tokens=40)
    for _ in range(3):
        engine.step()
    engine.abort(rid)
    engine.run()
    engine.side.committer.flush()
    with Store(engine.store_path) as store:
        assert store.get_ref("sessions/a") is None
        assert store.list_pins() == {} and store.meta_items("job:") == {}
    engine.assert_no_leaks()


@pytest.mark.parametrize("name", ["", "a..b", "bad name", 7])
def test_a_request_with_an_invalid_session_name_runs_without_a_commit(engine, name):
    rid = engine.add(tokens(100), client_params=_session(name), max_tokens=4)
    engine.run(rid)
    assert engine.finished[rid].kv_transfer_params is None
    assert all(not s.plan.saves for s in engine.steps)


def test_sessions_off_commit_nothing(make_engine):
    engine = make_engine(worker_extra={"sessions": False})
    rid = engine.add(tokens(100), client_params=_session("a"), max_tokens=4)
    engine.run(rid)
    assert engine.side.committer is None
    assert all(not s.plan.saves for s in engine.steps)
