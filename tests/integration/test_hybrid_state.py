"""A model with Mamba2 (state-space) layers interleaved with attention layers, on a real server.

vLLM gives it two KV-cache groups: a state group (``MambaSpec``: one block per block boundary,
the state after exactly that many tokens) and a full-attention group. A snapshot stores the
attention group's blocks and the one state a request resuming at the split point reads; after a
restart a checkout followed by the same completion is bit-identical to the first engine's warm
prefix hit, for a prompt that spans several blocks (the state carried across several prefill
chunks), one shorter than two blocks (the first boundary's state) and one within a block (no
state stored, nothing loaded); so is a client request
that extends a snapshot and loads it from the store by itself (transparent restore), also when
the prefix cache holds its first block and the state after it, while one that shares only a
prefix short of the stored state computes; repair recomputes a damaged state page. Session
turns store the state at their split point: after the restart, the next turn of a session loads
the last turn's blocks and state from the store by itself, bit-identical to the first engine's
warm prefix hit of the same prompt. One server, one restart.

The same model on the staged page path (the one every GPU engine takes; here through vLLM's CPU
backend, with staging slots of one block and a host tier): a second server on the same store,
no restart. Its snapshot of a prompt stores the very pages (the state's too) that the direct
path stored; it checks out and transparently restores snapshots the direct path took, bit for bit
like the direct engine's warm prefix hit; the direct engine checks out its snapshot like its own
warm hit; it repairs a damaged state page; and a session turn it computes stores the direct
path's snapshot's pages, the state's among them.

vLLM 0.32's CPU backend serves the model with prefix caching only in prefill chunks of at most
one block (``--max-num-batched-tokens`` 128 = the block size; longer chunks fail inside vLLM's
Mamba2 kernel).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import EAGER, model_server
from pf_http import (
    PF,
    cached_tokens,
    complete,
    damage_page,
    extended_snapshot,
    get,
    pf,
    post,
    random_tokens,
    wait_for_ref,
    warm_snapshots,
)
from processfork.plugin.kv_groups import MAMBA, GroupLayout
from processfork.plugin.launch_plan import kv_transfer_config
from processfork.store import Store
from processfork.store.sessions import SessionTurn, TurnGroup

from processfork_dev.model_builder import HYBRID

pytestmark = pytest.mark.integration

STAGED = f"{__name__}:staged"  # the staged server's key in ``servers.ahead``
BLOCK = 128  # a block holds a Mamba2 state (fp32); vLLM would raise 32 to 96
HYBRID_ARGS = ("--block-size", str(BLOCK), "--max-num-batched-tokens", str(BLOCK),
               "--max-model-len", "2048")
# Several blocks (several prefill chunks); fewer than two blocks: the split point is then the
# first block boundary, and the state there is the first one the engine keeps; and within one
# block: no state to store, nothing to load.
LENGTHS = (3 * BLOCK + 17, BLOCK + 40, 60)
RESTORED = 2 * BLOCK + 50  # a snapshot a client request extends by EXTRA tokens after the restart
EXTRA = 20
CROSS = 3 * BLOCK + 50  # snapshotted cold by both page paths: the same pages
SESSION = "hy-chat"
# Two session turns, each ending within the block of its prompt's last token: the split point of
# each is its prompt's last block boundary, the state vLLM keeps for a later prefix hit too.
TURN_PROMPTS = (BLOCK + 22, 2 * BLOCK + 40)  # the first prompt, then the second prompt's length
TURN_OUTPUT = 8
# A turn whose last computed token ends a block (its split point is a block before its end), and
# one whose output runs past a block boundary (the state there is the one a decode step reached).
ALIGNED_TURN = (BLOCK + 72, BLOCK - 71)  # prompt, output: 2 * BLOCK tokens computed
DECODE_TURN = (100, 40)  # 139 tokens computed: the state at BLOCK, reached in decode


@dataclass
class Before:
    prompts: dict[int, list[int]] = field(default_factory=dict)
    warm: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    extended: list[int] = field(default_factory=list)
    extended_warm: dict[str, Any] = field(default_factory=dict)
    diverging: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    partial_warm: dict[str, Any] = field(default_factory=dict)
    repair: dict[str, Any] = field(default_factory=dict)
    cross: list[int] = field(default_factory=list)
    cross_snapshot: dict[str, Any] = field(default_factory=dict)
    #: per session turn: the prompt, the reply, the committed cid
    turns: list[dict[str, Any]] = field(default_factory=list)
    next_turn: list[int] = field(default_factory=list)
    next_turn_warm: dict[str, Any] = field(default_factory=dict)
    #: per other turn (ALIGNED_TURN, DECODE_TURN): the turn, and a prompt extending it
    other_turns: dict[str, dict[str, Any]] = field(default_factory=dict)
    aligned_warm: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def _session_turn(server, prompt: list[int], max_tokens: int, session: str = SESSION,
                  **extra: Any) -> dict[str, Any]:
    """A completion that is a turn of ``session``; its reply, and the cid it committed."""
    ref = f"sessions/{session}"
    with Store(server.store, readonly=True) as store:
        old = store.get_ref(ref)
    out = complete(server, prompt, max_tokens=max_tokens, logprobs=5, ignore_eos=True,
                   return_token_ids=True,
                   kv_transfer_params={"processfork": {"session": session}}, **extra)
    output = list(out["choices"][0]["token_ids"])
    return {"prompt": prompt, "out": out, "output": output,
            "cid": wait_for_ref(server.store, ref, old),
            "next": prompt + output + random_tokens(len(prompt), EXTRA)}


def launch_ahead(servers):
    # Compared only with itself: eager mode starts sooner.
    return servers.launch(servers.build("tiny-hybrid", HYBRID), store=servers.new_store("hybrid"),
                          extra_args=(*HYBRID_ARGS, *EAGER))


@pytest.fixture(scope="module")
def hybrid_server(servers):
    yield from model_server(servers, __name__, launch_ahead)


@pytest.fixture(scope="module")
def before(request, servers, hybrid_server) -> Before:
    out = Before()
    out.prompts, out.warm, out.snapshots = warm_snapshots(hybrid_server, LENGTHS, seed=8000,
                                                          prefix="hy", block=BLOCK)
    base, out.snapshots[RESTORED], out.extended, out.extended_warm = extended_snapshot(
        hybrid_server, seed=8100, name="hy/extended", length=RESTORED, extra=EXTRA, block=BLOCK)
    # Shares one block with the snapshot, then differs: the state after that block is not
    # stored (only the state at the snapshot's split point is).
    out.diverging = base[: BLOCK + 3] + random_tokens(8102, 60)
    # A snapshot of three blocks and a bit, extended by a request that, after the restart, finds
    # its first block (and the state after it) in the prefix cache and the rest in the store.
    base = random_tokens(8200, 3 * BLOCK + 10)
    pf(hybrid_server, "snapshot", {"name": "hy/partial", "token_ids": base})
    out.partial = base + random_tokens(8201, EXTRA)
    out.partial_warm = complete(hybrid_server, out.partial, max_tokens=12, logprobs=5)
    assert cached_tokens(out.partial_warm) == 3 * BLOCK
    out.repair = pf(hybrid_server, "snapshot",
                    {"name": "hy/repair", "token_ids": random_tokens(8300, 2 * BLOCK + 30)})
    out.cross = random_tokens(8400, CROSS)
    out.cross_snapshot = pf(hybrid_server, "snapshot", {"name": "hy/cross", "token_ids": out.cross})
    # Two turns of a session; the second prompt extends the first turn's prompt and output.
    prompt = random_tokens(8700, TURN_PROMPTS[0])
    for length in TURN_PROMPTS[1:]:
        turn = _session_turn(hybrid_server, prompt, TURN_OUTPUT)
        out.turns.append(turn)
        prompt = turn["prompt"] + turn["output"]
        prompt += random_tokens(8701, length - len(prompt))
    turn = _session_turn(hybrid_server, prompt, TURN_OUTPUT)
    out.turns.append(turn)
    out.next_turn = turn["prompt"] + turn["output"] + random_tokens(8702, EXTRA)
    out.next_turn_warm = complete(hybrid_server, out.next_turn, max_tokens=12, logprobs=5,
                                  ignore_eos=True, return_token_ids=True)
    for name, (length, output) in (("aligned", ALIGNED_TURN), ("decode", DECODE_TURN)):
        out.other_turns[name] = _session_turn(hybrid_server, random_tokens(8710 + length, length),
                                              output, session=f"hy-{name}")
    # The engine kept the state at the aligned turn's prompt's last boundary, its split point.
    out.aligned_warm = complete(hybrid_server, out.other_turns["aligned"]["next"], max_tokens=12,
                                logprobs=5)
    out.log = hybrid_server.log_path.read_text(errors="replace") if hybrid_server.log_path else ""
    if any("staged_server" in getattr(item, "fixturenames", ())
           for item in request.session.items):
        # Nothing it does depends on the engine before, and both starts run at once.
        servers.ahead.setdefault(STAGED, _launch_staged(servers, hybrid_server))
    hybrid_server.restart()
    return out


def _groups(server) -> GroupLayout:
    engine = get(server, f"{PF}/status").json()["engine"]
    return GroupLayout.from_fingerprint(engine["fingerprint"].get("kv_groups"))


def test_the_engine_has_a_state_group_beside_attention(hybrid_server, before):
    assert "Turning off hybrid kv cache manager" not in before.log
    layout = _groups(hybrid_server)
    assert sorted(g.kind for g in layout.groups) == ["full_attention", MAMBA]
    state = next(g for g in layout.groups if g.kind == MAMBA)
    assert state.layers == (0, 2)
    # Mamba2's convolution window and SSM state, as the fingerprint records them.
    assert [shape for shape, _ in state.state] == [(3, 576), (8, 64, 32)]


@pytest.mark.parametrize("length", LENGTHS)
def test_a_snapshot_stores_the_state_at_its_split_point(hybrid_server, before, length):
    layout = _groups(hybrid_server)
    snap = before.snapshots[length]
    split = (length - 1) // BLOCK * BLOCK
    with Store(hybrid_server.store, readonly=True) as store:
        manifest = store.get_snapshot(snap["cid"])
        assert [i.kind for i in store.fsck()] == []
    [seq] = manifest.sequences
    for g, spec in enumerate(layout.groups):
        first, pages = seq.group_pages(g)
        if spec.kind == MAMBA:
            assert (first, len(pages)) == ((split // BLOCK - 1, 1) if split else (0, 0))
            assert seq.groups[g].state
        else:
            assert (first, len(pages)) == (0, -(-length // BLOCK))
    assert snap["num_pages"] == len(seq.pages)


@pytest.mark.parametrize("length", LENGTHS)
def test_checkout_continues_like_a_warm_prefix_hit(hybrid_server, before, length):
    checkout = pf(hybrid_server, "checkout", {"cid": f"hy/{length}"})
    split = (length - 1) // BLOCK * BLOCK
    assert checkout["tokens_loaded"] == split
    assert checkout["tokens_already_resident"] == 0  # the restart left the cache cold
    restored = complete(hybrid_server, before.prompts[length], max_tokens=12, logprobs=5)
    warm = before.warm[length]
    assert cached_tokens(restored) == cached_tokens(warm) == split
    assert restored["choices"][0]["logprobs"] == warm["choices"][0]["logprobs"]


def test_a_request_extending_a_snapshot_restores_it_like_a_warm_hit(hybrid_server, before):
    restored = complete(hybrid_server, before.extended, max_tokens=12, logprobs=5)
    split = RESTORED // BLOCK * BLOCK
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == split
    assert cached_tokens(restored) == cached_tokens(before.extended_warm) == split
    assert restored["choices"][0]["logprobs"] == before.extended_warm["choices"][0]["logprobs"]


def test_a_prefix_short_of_the_stored_state_is_computed(hybrid_server, before):
    # After the request above, which loaded the snapshot's attention blocks and its state at
    # its split point only: neither the store nor the prefix cache has the state after the
    # one block this prompt shares with it.
    out = complete(hybrid_server, before.diverging, max_tokens=4)
    assert not (out.get("kv_transfer_params") or {}).get("processfork", {}).get("loaded_tokens")
    assert cached_tokens(out) == 0


def test_a_restore_after_a_local_prefix_hit_loads_the_rest_and_the_state(hybrid_server, before):
    # Computes the first block and more: the engine keeps the state after that block.
    first = complete(hybrid_server, before.partial[: BLOCK + 5] + random_tokens(8202, 60),
                     max_tokens=2)
    assert cached_tokens(first) == 0
    restored = complete(hybrid_server, before.partial, max_tokens=12, logprobs=5)
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == 2 * BLOCK
    assert cached_tokens(restored) == cached_tokens(before.partial_warm) == 3 * BLOCK
    assert restored["choices"][0]["logprobs"] == before.partial_warm["choices"][0]["logprobs"]


def test_repair_recomputes_a_damaged_state_and_attention_page(hybrid_server, before):
    cid = before.repair["cid"]
    layout = _groups(hybrid_server)
    with Store(hybrid_server.store, readonly=True) as store:
        seq = store.get_snapshot(cid).sequences[0]
    damaged = [seq.group_pages(g)[1][-1][1] for g in range(len(layout.groups))]
    for digest in damaged:
        damage_page(hybrid_server.store, digest)
    result = pf(hybrid_server, "repair", {"cid": "hy/repair"})
    assert result["damaged_pages"] == len(damaged) and result["recomputed_sequences"] == 1
    assert result["result"] in ("restored", "replaced")
    repaired = result.get("new_cid") or cid
    with Store(hybrid_server.store, readonly=True) as store:
        assert store.get_ref("hy/repair") == repaired
        assert store.find_damage(repaired).intact
        again = store.get_snapshot(repaired).sequences[0]
    assert again.groups == seq.groups  # the state group stores the same one block as before


def _split(count: int) -> int:
    return (count - 1) // BLOCK * BLOCK


def test_session_turns_store_the_state_at_their_split_point(hybrid_server, before):
    assert "session turns store each turn's state" in before.log
    layout = _groups(hybrid_server)
    with Store(hybrid_server.store, readonly=True) as store:
        assert [i.kind for i in store.fsck()] == []
        manifests = [store.get_snapshot(turn["cid"]) for turn in before.turns]
    assert manifests[1].parents == [before.turns[0]["cid"]]
    for turn, manifest in zip(before.turns, manifests):
        count = len(turn["prompt"]) + TURN_OUTPUT - 1  # the last sampled token has no KV yet
        reply = turn["out"]["kv_transfer_params"]["processfork"]
        assert reply["session_tokens"] == count
        assert manifest.format == "paged-batchinvariant-v3"
        [seq] = manifest.sequences
        assert seq.tokens.count == count and seq.paged_tokens == count // BLOCK * BLOCK
        for g, spec in enumerate(layout.groups):
            first, pages = seq.group_pages(g)
            if spec.kind == MAMBA:
                assert seq.groups[g].state
                assert (first, len(pages)) == (_split(count) // BLOCK - 1, 1)
            else:
                assert (first, len(pages)) == (0, count // BLOCK)


def test_a_turn_ending_on_a_block_boundary_restores_from_the_block_before(hybrid_server,
                                                                         before):
    turn = before.other_turns["aligned"]
    count = sum(ALIGNED_TURN) - 1
    assert count % BLOCK == 0
    with Store(hybrid_server.store, readonly=True) as store:
        [seq] = store.get_snapshot(turn["cid"]).sequences
    assert seq.paged_tokens is None and seq.tokens.count == count
    state = next(g for g in seq.groups if g.state)
    assert (state.first, state.count) == (count // BLOCK - 2, 1)  # the state at count - BLOCK
    # The next prompt shares every block of the turn: it resumes where the state is.
    restored = complete(hybrid_server, turn["next"], max_tokens=12, logprobs=5)
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == count - BLOCK
    assert cached_tokens(restored) == cached_tokens(before.aligned_warm) == count - BLOCK
    assert restored["choices"][0]["logprobs"] == before.aligned_warm["choices"][0]["logprobs"]


def test_a_state_a_decode_step_reached_restores_like_a_cold_prefill(hybrid_server, before):
    """The engine keeps no state a decode step reaches for its prefix cache, so there is no warm
    hit to compare with: the continuation matches a cold prefill, as any restore does."""
    turn = before.other_turns["decode"]
    with Store(hybrid_server.store, readonly=True) as store:
        [seq] = store.get_snapshot(turn["cid"]).sequences
    state = next(g for g in seq.groups if g.state)
    assert (state.first, state.count) == (0, 1) and DECODE_TURN[0] < BLOCK
    restored = complete(hybrid_server, turn["next"], max_tokens=12, logprobs=5)
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == BLOCK
    cold = complete(hybrid_server, turn["next"], max_tokens=12, logprobs=5,
                    cache_salt="hy-cold")
    assert cached_tokens(restored) == BLOCK and cached_tokens(cold) == 0
    restored_lp, cold_lp = (c["choices"][0]["logprobs"] for c in (restored, cold))
    assert restored_lp["tokens"] == cold_lp["tokens"]
    delta = max(abs(a - b) for a, b in zip(restored_lp["token_logprobs"],
                                           cold_lp["token_logprobs"]))
    print(f"a state reached in decode: max |delta logprob| vs cold prefill = {delta:.3g}")
    assert delta <= 1e-4


def test_a_turn_that_stores_no_state_is_never_resumed_from(hybrid_server, before):
    """A turn whose state at its split point the engine never held (a split inside a prefill
    chunk: not on this engine, whose chunks end on block boundaries) stores none, as written
    here from the last turn's attention pages. Neither a checkout nor a restore resumes from
    its attention blocks alone."""
    layout = _groups(hybrid_server)
    last = before.turns[-1]
    with Store(hybrid_server.store) as store:
        manifest = store.get_snapshot(last["cid"])
        [seq] = manifest.sequences
        tokens = list(store.get_tokens(seq.tokens))
        whole = seq.paged_tokens // BLOCK
        store.commit_turn(SessionTurn(
            ref="sessions/hy-nostate", tokens=tokens, base=last["cid"], base_seq=0,
            base_blocks=0, pages=[], fingerprint=manifest.fingerprint,
            paged_tokens=seq.paged_tokens, cache_salt="hy-nostate",
            groups=[TurnGroup(whole, 0, [], state=True) if spec.kind == MAMBA
                    else TurnGroup(0, whole, []) for spec in layout.groups]))
        assert [i.kind for i in store.fsck()] == []
    response = post(hybrid_server, f"{PF}/checkout", {"cid": "sessions/hy-nostate"})
    assert response.status_code == 409, response.text
    assert response.json()["error"]["type"] == "pages_not_stored"
    # The same salt: the prefix index of that partition holds this turn alone.
    out = complete(hybrid_server, tokens + random_tokens(8720, EXTRA), max_tokens=4,
                   cache_salt="hy-nostate")
    assert not (out.get("kv_transfer_params") or {}).get("processfork", {}).get("loaded_tokens")
    assert cached_tokens(out) == 0


def test_the_next_session_turn_restores_the_last_one_like_a_warm_hit(hybrid_server, before):
    last = before.turns[-1]
    turn = _session_turn(hybrid_server, before.next_turn, 12)
    restored, warm = turn["out"], before.next_turn_warm
    split = (len(last["prompt"]) + TURN_OUTPUT - 1) // BLOCK * BLOCK
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == split
    assert cached_tokens(restored) == cached_tokens(warm) == split
    assert turn["output"] == warm["choices"][0]["token_ids"]
    assert restored["choices"][0]["logprobs"] == warm["choices"][0]["logprobs"]
    # The third turn stores the state it resumed from again: the very pages the store held.
    with Store(hybrid_server.store, readonly=True) as store:
        assert [i.kind for i in store.fsck()] == []
        before_seq = store.get_snapshot(last["cid"]).sequences[0]
        after_seq = store.get_snapshot(turn["cid"]).sequences[0]
        assert store.get_snapshot(turn["cid"]).parents == [last["cid"]]
    state = next(g for g, spec in enumerate(after_seq.groups) if spec.state)
    assert after_seq.group_pages(state) == before_seq.group_pages(state)


# -- the staged page path ------------------------------------------------------------------------
@dataclass
class Staged:
    cross: dict[str, Any] = field(default_factory=dict)
    own: list[int] = field(default_factory=list)
    own_snapshot: dict[str, Any] = field(default_factory=dict)
    own_warm: dict[str, Any] = field(default_factory=dict)
    repair: dict[str, Any] = field(default_factory=dict)
    turn: dict[str, Any] = field(default_factory=dict)


def _launch_staged(servers, direct):
    """The hybrid model on the staged page path, on the direct server's store: staging slots of
    one block (a K and V page of this model are 256 KiB), so a save or load of several blocks
    runs in several chunks, and a host tier that loads go through. Its pages are read with
    ``pread`` (test_staged_path.py's server copies them out of the map, the default here)."""
    config = kv_transfer_config(direct.store)
    config["kv_connector_extra_config"].update({
        "page_path": "staged", "staging_mib": 1, "copy_threads": 2, "host_tier_mib": 16,
        "page_reader": "pread",
        "host_tier_dir": str(servers.tmp_path_factory.mktemp("pf-tier-hybrid")),
    })
    return servers.launch(direct.model, store=direct.store,
                          extra_args=(*HYBRID_ARGS, *EAGER, "--kv-transfer-config",
                                      json.dumps(config)))


@pytest.fixture(scope="module")
def staged_server(servers, hybrid_server, before):
    # Launched beside the direct server's restart (``before``).
    live = (servers.take(STAGED) or _launch_staged(servers, hybrid_server)).wait()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def staged(staged_server, before) -> Staged:
    """Snapshots on the staged engine, taken before any client request could load a stored
    prefix into its cache, so it computes what it saves."""
    out = Staged()
    out.cross = pf(staged_server, "snapshot", {"name": "st/cross", "token_ids": before.cross})
    out.own = random_tokens(8500, 2 * BLOCK + 90)
    out.own_snapshot = pf(staged_server, "snapshot", {"name": "st/own", "token_ids": out.own})
    out.own_warm = complete(staged_server, out.own, max_tokens=12, logprobs=5)
    assert cached_tokens(out.own_warm) == 2 * BLOCK
    out.repair = pf(staged_server, "snapshot",
                    {"name": "st/repair", "token_ids": random_tokens(8600, 2 * BLOCK + 30)})
    # A session turn of the prompt both paths snapshotted, under a salt of its own: nothing to
    # restore, so the engine computes it, and its split point is the snapshots'.
    out.turn = _session_turn(staged_server, before.cross, TURN_OUTPUT, session="st-chat",
                             cache_salt="st-chat")
    return out


def test_the_staged_engine_has_the_direct_engines_fingerprint(hybrid_server, staged_server,
                                                              staged):
    log = staged_server.log_path.read_text(errors="replace")
    assert "staged page path" in log and "chunks of 1 blocks" in log and "host tier" in log
    fingerprints = [get(s, f"{PF}/status").json()["engine"]["fingerprint"]
                    for s in (hybrid_server, staged_server)]
    assert fingerprints[0] == fingerprints[1]  # the page path is not part of what it computes
    assert any(g["kind"] == MAMBA for g in fingerprints[1]["kv_groups"])


def test_both_page_paths_store_the_same_pages_for_the_same_tokens(hybrid_server, before, staged):
    """The state page too: its padding is zeroed alike, so the pages are content-addressed
    alike and the staged save wrote no page of its own."""
    with Store(hybrid_server.store, readonly=True) as store:
        direct = store.get_snapshot(before.cross_snapshot["cid"]).sequences[0]
        via_slots = store.get_snapshot(staged.cross["cid"]).sequences[0]
    assert via_slots.groups == direct.groups and any(g.state for g in direct.groups)
    assert via_slots.pages == direct.pages
    assert staged.cross["new_pages"] == 0 and staged.cross["num_pages"] == len(direct.pages)


def test_a_session_turn_on_the_staged_path_stores_the_snapshots_state(before, staged,
                                                                      staged_server):
    """The state a turn saves after its request has ended goes through the staging slots with
    its padding zeroed, as a snapshot's does: the same pages as the direct path's snapshot."""
    with Store(staged_server.store, readonly=True) as store:
        snapshot = store.get_snapshot(before.cross_snapshot["cid"]).sequences[0]
        turn = store.get_snapshot(staged.turn["cid"]).sequences[0]
        assert [i.kind for i in store.fsck()] == []
    assert cached_tokens(staged.turn["out"]) == 0
    for g, group in enumerate(turn.groups):
        first, pages = turn.group_pages(g)
        if group.state:
            assert (first, pages) == snapshot.group_pages(g)
        else:
            assert pages == snapshot.group_pages(g)[1][: CROSS // BLOCK]


def test_the_staged_path_checks_out_the_direct_paths_snapshot_like_its_warm_hit(
    staged_server, before, staged
):
    length = LENGTHS[0]
    split = (length - 1) // BLOCK * BLOCK
    checkout = pf(staged_server, "checkout", {"cid": f"hy/{length}"})
    assert checkout["tokens_loaded"] == split and checkout["tokens_already_resident"] == 0
    restored = complete(staged_server, before.prompts[length], max_tokens=12, logprobs=5)
    assert cached_tokens(restored) == split
    assert restored["choices"][0]["logprobs"] == before.warm[length]["choices"][0]["logprobs"]


def test_the_staged_path_restores_a_stored_prefix_by_itself(staged_server, before, staged):
    restored = complete(staged_server, before.extended, max_tokens=12, logprobs=5)
    split = RESTORED // BLOCK * BLOCK
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == split
    assert cached_tokens(restored) == split
    assert restored["choices"][0]["logprobs"] == before.extended_warm["choices"][0]["logprobs"]


def test_the_direct_path_checks_out_the_staged_paths_snapshot(hybrid_server, staged):
    checkout = pf(hybrid_server, "checkout", {"cid": "st/own"})
    assert checkout["tokens_loaded"] == 2 * BLOCK and checkout["tokens_already_resident"] == 0
    restored = complete(hybrid_server, staged.own, max_tokens=12, logprobs=5)
    assert cached_tokens(restored) == 2 * BLOCK
    assert restored["choices"][0]["logprobs"] == staged.own_warm["choices"][0]["logprobs"]


def test_the_staged_path_repairs_a_damaged_state_page(staged_server, staged):
    cid = staged.repair["cid"]
    with Store(staged_server.store, readonly=True) as store:
        seq = store.get_snapshot(cid).sequences[0]
    state = next(g for g, spec in enumerate(seq.groups) if spec.state)
    damage_page(staged_server.store, seq.group_pages(state)[1][0][0])
    result = pf(staged_server, "repair", {"cid": "st/repair"})
    assert result["damaged_pages"] == 1 and result["recomputed_sequences"] == 1
    repaired = result.get("new_cid") or cid
    with Store(staged_server.store, readonly=True) as store:
        assert store.get_ref("st/repair") == repaired
        assert store.find_damage(repaired).intact
        assert store.get_snapshot(repaired).sequences[0].groups == seq.groups
