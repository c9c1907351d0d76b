"""A model with sliding-window layers interleaved with full-attention layers, on a real server.

vLLM's hybrid KV cache manager stays on with the connector (it declares ``SupportsHMA``), so the
engine has one KV-cache group per kind of layer. A snapshot stores each group's blocks (the
sliding-window group only those inside its window), and after a restart a checkout followed by
the same completion is bit-identical to the first engine's warm prefix hit, for a prompt longer
than the window and one shorter; so is a client request that extends a snapshot and loads it
from the store by itself (transparent restore). Session turns commit each group's pages (the
sliding-window group only its window), chained by parent, and after the restart the next turn
loads the session from the store and continues exactly as the warm prefix hit did; repair
recomputes damaged pages of either group. One server for the module, one restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import EAGER, SESSION_SERVER_ARGS, model_server
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
from processfork.plugin.kv_groups import GroupLayout
from processfork.store import Manifest, Store

from processfork_dev.model_builder import SLIDING

pytestmark = pytest.mark.integration

BLOCK = 32
WINDOW = SLIDING.sliding_window
# Longer than the window, in several prefill chunks; and shorter than the window.
LENGTHS = (9 * BLOCK + 12, 40)
RESTORED = 10 * BLOCK + 5  # a snapshot a client request extends by EXTRA tokens after the restart
EXTRA = 20
SESSION = "sw-chat"
REF = f"sessions/{SESSION}"


@dataclass
class Before:
    prompts: dict[int, list[int]] = field(default_factory=dict)
    warm: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    log: str = ""
    extended: list[int] = field(default_factory=list)
    extended_warm: dict[str, Any] = field(default_factory=dict)
    diverging: list[int] = field(default_factory=list)
    #: per session turn before the restart: the reply's processfork fields, the turn's tokens
    #: (prompt and output but the last sampled token), its cid
    turns: list[dict[str, Any]] = field(default_factory=list)
    next_prompt: list[int] = field(default_factory=list)  # the turn after the restart
    next_warm: dict[str, Any] = field(default_factory=dict)  # its warm prefix hit, no session
    repair: dict[str, Any] = field(default_factory=dict)


def _turn(server, prompt: list[int]) -> dict[str, Any]:
    with Store(server.store, readonly=True) as store:
        old = store.get_ref(REF)
    out = complete(server, prompt, max_tokens=12, logprobs=5, return_token_ids=True,
                   kv_transfer_params={"processfork": {"session": SESSION}})
    output = list(out["choices"][0]["token_ids"])
    return {"reply": out["kv_transfer_params"]["processfork"], "completion": out,
            "tokens": prompt + output[:-1], "output": output,
            "cid": wait_for_ref(server.store, REF, old)}


def launch_ahead(servers):
    # Compared only with itself: eager mode starts sooner.
    model = servers.build("tiny-sliding", SLIDING)
    return servers.launch(model, store=servers.new_store("sliding"),
                          extra_args=(*SESSION_SERVER_ARGS, *EAGER))


@pytest.fixture(scope="module")
def sw_server(servers):
    yield from model_server(servers, __name__, launch_ahead)


@pytest.fixture(scope="module")
def before(sw_server) -> Before:
    out = Before()
    out.prompts, out.warm, out.snapshots = warm_snapshots(sw_server, LENGTHS, seed=7000,
                                                          prefix="sw", block=BLOCK)
    base, out.snapshots[RESTORED], out.extended, out.extended_warm = extended_snapshot(
        sw_server, seed=7100, name="sw/extended", length=RESTORED, extra=EXTRA, block=BLOCK)
    # Shares 4 blocks with the snapshot, then differs: the window group stored none of them.
    out.diverging = base[: 4 * BLOCK + 3] + random_tokens(7102, 60)
    # A session: two turns, each prompt the last one's tokens and output and a new message,
    # every prompt longer than the window; the third turn's prompt runs once without a session:
    # the warm prefix hit on the second turn's blocks, which it must match after the restart.
    prompt = random_tokens(7200, 5 * BLOCK + 10)
    for i in range(2):
        out.turns.append(_turn(sw_server, prompt))
        prompt = prompt + out.turns[-1]["output"] + random_tokens(7201 + i, 40)
    out.next_prompt = prompt
    out.next_warm = complete(sw_server, prompt, max_tokens=12, logprobs=5)
    out.repair = pf(sw_server, "snapshot",
                    {"name": "sw/repair", "token_ids": random_tokens(7300, 7 * BLOCK + 5)})
    out.log = sw_server.log_path.read_text(errors="replace") if sw_server.log_path else ""
    sw_server.restart()
    return out


def _groups(server) -> GroupLayout:
    engine = get(server, f"{PF}/status").json()["engine"]
    return GroupLayout.from_fingerprint(engine["fingerprint"].get("kv_groups"))


def test_the_hybrid_kv_cache_manager_stays_on(sw_server, before):
    assert "Turning off hybrid kv cache manager" not in before.log
    kinds = sorted((g.kind, g.window) for g in _groups(sw_server).groups)
    assert kinds == [("full_attention", None), ("sliding_window", WINDOW)]


@pytest.mark.parametrize("length", LENGTHS)
def test_each_group_stores_what_it_keeps(sw_server, before, length):
    layout = _groups(sw_server)
    snap = before.snapshots[length]
    ranges = layout.stored_ranges(length, BLOCK)
    assert snap["num_pages"] == sum(end - first for first, end in ranges)
    with Store(sw_server.store, readonly=True) as store:
        seq = store.get_snapshot(snap["cid"]).sequences[0]
    for g, (first, end) in enumerate(ranges):
        assert seq.group_pages(g)[0] == first and len(seq.group_pages(g)[1]) == end - first
        if layout.groups[g].window is not None and length > WINDOW + BLOCK:
            assert first > 0  # blocks behind the window are not stored


@pytest.mark.parametrize("length", LENGTHS)
def test_checkout_continues_like_a_warm_prefix_hit(sw_server, before, length):
    checkout = pf(sw_server, "checkout", {"cid": f"sw/{length}"})
    split = (length - 1) // BLOCK * BLOCK
    assert checkout["tokens_loaded"] == split
    assert checkout["tokens_already_resident"] == 0  # the restart left the cache cold
    restored = complete(sw_server, before.prompts[length], max_tokens=12, logprobs=5)
    warm = before.warm[length]
    assert cached_tokens(restored) == cached_tokens(warm) == split
    assert restored["choices"][0]["logprobs"] == warm["choices"][0]["logprobs"]


def test_a_snapshot_of_another_group_layout_is_refused_by_name(sw_server, before):
    engine = get(sw_server, f"{PF}/status").json()["engine"]["fingerprint"]
    plain = {k: v for k, v in engine.items() if k != "kv_groups"}
    with Store(sw_server.store) as store:
        cid = store.write_snapshot(Manifest(name="plain-layout", fingerprint=plain),
                                   ref="plain-layout")
    response = post(sw_server, f"{PF}/checkout", {"cid": cid})
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["type"] == "incompatible_snapshot"
    assert "kv_groups" in error["message"] and "one full_attention group" in error["message"]


def test_a_prefix_short_of_the_stored_window_is_computed(sw_server, before):
    # Before anything loads the snapshot's blocks into this engine's prefix cache.
    out = complete(sw_server, before.diverging, max_tokens=4)
    assert not (out.get("kv_transfer_params") or {}).get("processfork", {}).get("loaded_tokens")
    assert cached_tokens(out) == 0


def test_a_request_extending_a_snapshot_restores_it_like_a_warm_hit(sw_server, before):
    restored = complete(sw_server, before.extended, max_tokens=12, logprobs=5)
    split = RESTORED // BLOCK * BLOCK
    assert restored["kv_transfer_params"]["processfork"]["loaded_tokens"] == split
    assert cached_tokens(restored) == cached_tokens(before.extended_warm) == split
    assert restored["choices"][0]["logprobs"] == before.extended_warm["choices"][0]["logprobs"]


def _turn_groups(layout: GroupLayout, count: int) -> list[tuple[int, int]]:
    """Each group's stored blocks for a turn of ``count`` tokens: the whole blocks, a
    sliding-window group's from the window of the turn's split point."""
    whole = count // BLOCK
    return [(min(first, whole), whole) for first, _ in layout.stored_ranges(count, BLOCK)]


def test_session_turns_store_each_groups_blocks_chained_by_parent(sw_server, before):
    assert "no session commits" not in before.log
    layout = _groups(sw_server)
    sliding = next(i for i, g in enumerate(layout.groups) if g.window is not None)
    with Store(sw_server.store, readonly=True) as store:
        manifests = [store.get_snapshot(t["cid"]) for t in before.turns]
        stored = [list(store.get_tokens(m.sequences[0].tokens)) for m in manifests]
        assert [i.kind for i in store.fsck()] == []
    for turn, manifest, tokens in zip(before.turns, manifests, stored):
        count = len(turn["tokens"])
        assert tokens == turn["tokens"]
        assert turn["reply"]["session"] == REF
        assert turn["reply"]["session_tokens"] == count
        assert turn["reply"]["session_blocks"] == count // BLOCK
        [seq] = manifest.sequences
        assert seq.tokens_with_pages == count // BLOCK * BLOCK
        ranges = _turn_groups(layout, count)
        got = []
        for g in range(len(layout.groups)):
            first, pages = seq.group_pages(g)
            got.append((first, first + len(pages)))
        assert got == ranges
        assert ranges[sliding][0] > 0  # the blocks behind the window are not stored
    assert manifests[0].parents == []
    assert manifests[1].parents == [before.turns[0]["cid"]]
    # The second turn's prompt holds the first turn whole: those blocks were not saved again.
    first_blocks = len(before.turns[0]["tokens"]) // BLOCK
    reply = before.turns[1]["reply"]
    assert reply["session_new_blocks"] == reply["session_blocks"] - first_blocks > 0


def test_the_next_turn_after_a_restart_loads_the_session_like_a_warm_hit(sw_server, before):
    split = len(before.turns[-1]["tokens"]) // BLOCK * BLOCK
    assert cached_tokens(before.next_warm) == split
    turn = _turn(sw_server, before.next_prompt)
    assert turn["reply"]["loaded_tokens"] == split
    assert cached_tokens(turn["completion"]) == split
    got = turn["completion"]["choices"][0]["logprobs"]
    assert got == before.next_warm["choices"][0]["logprobs"]
    with Store(sw_server.store, readonly=True) as store:
        manifest = store.get_snapshot(turn["cid"])
    assert manifest.parents == [before.turns[-1]["cid"]]
    assert turn["reply"]["session_new_blocks"] == turn["reply"]["session_blocks"] - split // BLOCK


def test_repair_recomputes_damaged_pages_of_every_group(sw_server, before):
    cid = before.repair["cid"]
    layout = _groups(sw_server)
    with Store(sw_server.store, readonly=True) as store:
        seq = store.get_snapshot(cid).sequences[0]
    damaged = [seq.group_pages(g)[1][-1][0] for g in range(len(layout.groups))]
    for digest in damaged:
        damage_page(sw_server.store, digest)
    with Store(sw_server.store, readonly=True) as store:
        assert set(store.find_damage(cid).pages) == set(damaged)
    result = pf(sw_server, "repair", {"cid": "sw/repair"})
    assert result["damaged_pages"] == len(damaged) and result["recomputed_sequences"] == 1
    assert result["result"] in ("restored", "replaced")
    repaired = result.get("new_cid") or cid
    with Store(sw_server.store, readonly=True) as store:
        assert store.get_ref("sw/repair") == repaired
        assert store.find_damage(repaired).intact
        again = store.get_snapshot(repaired).sequences[0]
    assert again.groups == seq.groups  # each group stores the same blocks as before
