"""Transparent restores and sessions on a real server.

After a restart, a plain completion whose prompt starts with a stored snapshot's tokens loads those
blocks from the store by itself (no checkout) and continues exactly as the warm prefix-cache hit
did before the restart. A chat whose requests name a session commits every turn to
``sessions/NAME``, chained by parent, writing only the new blocks; after the restart its next turn
loads the session from the store. ``prepare_before_restart`` does the work before the restart;
the restart is the one the session server's modules share (conftest's ``restarted``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pf_http import cached_tokens, complete, headers, metric, pf, post, random_tokens, wait_for_ref
from processfork.store import Store
from typer.testing import CliRunner

from processfork_cli.app import app

pytestmark = pytest.mark.integration

BLOCK = 32
SESSION = "it-agent"
REF = f"sessions/{SESSION}"


def split_point(length: int) -> int:
    return (length - 1) // BLOCK * BLOCK


@dataclass
class Before:
    """What the engine computed and stored before the restart."""

    tokens: list[int] = field(default_factory=list)
    warm: dict[str, Any] = field(default_factory=dict)
    salted: list[int] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)
    #: per session turn: the reply's processfork fields, the prompt's token ids, the turn's cid
    turns: list[dict[str, Any]] = field(default_factory=list)


def _turn(client, server, store_path, history: list[dict[str, str]], message: str) -> dict:
    history.append({"role": "user", "content": message})
    with Store(store_path, readonly=True) as store:
        old = store.get_ref(REF)
    response = client.chat.completions.create(
        model=server.model_name, messages=history, max_tokens=12, temperature=0,
        extra_body={"kv_transfer_params": {"processfork": {"session": SESSION}},
                    "return_token_ids": True},
    )
    history.append({"role": "assistant", "content": response.choices[0].message.content})
    extra = response.model_extra
    return {"reply": extra["kv_transfer_params"]["processfork"],
            "prompt": list(extra["prompt_token_ids"]),
            "output": list(response.choices[0].model_extra["token_ids"]),
            "cid": wait_for_ref(store_path, REF, old)}


def _message(i: int) -> str:
    return f"Step {i}: read the ticket, search the logs and plan the next tool call. " * 4


def prepare_before_restart(server, pf_store, openai_client) -> Before:
    out = Before()
    # Seeds no other module of the session server uses: a prompt that begins like another
    # module's would load that module's pages after the restart.
    out.tokens = random_tokens(8110, 12 * BLOCK + 7)
    complete(server, out.tokens, max_tokens=8, logprobs=5)  # cold: computes and caches
    out.warm = complete(server, out.tokens, max_tokens=8, logprobs=5)  # the warm hit
    assert cached_tokens(out.warm) == split_point(len(out.tokens))
    pf(server, "snapshot", {"name": "auto/plain", "token_ids": out.tokens})
    out.salted = random_tokens(8111, 6 * BLOCK + 3)
    pf(server, "snapshot", {"name": "auto/salted", "token_ids": out.salted})
    out.history = [{"role": "system", "content": "You are a careful agent. " * 24}]
    for i in range(3):
        out.turns.append(_turn(openai_client, server, pf_store, out.history, _message(i)))
    return out


@pytest.fixture(scope="module")
def before(restarted) -> Before:
    return restarted.prepared[__name__]


def test_a_plain_completion_loads_its_stored_prefix_and_continues_exactly(server, before):
    split = split_point(len(before.tokens))
    external = metric(server, "vllm:external_prefix_cache_hits_total")
    # Other modules' tests may have restored on this engine since the restart.
    restored_before = metric(server, "processfork_restored_tokens_total")
    restored = complete(server, before.tokens, max_tokens=8, logprobs=5)
    assert cached_tokens(restored) == split
    assert metric(server, "vllm:external_prefix_cache_hits_total") - external == split
    assert restored["kv_transfer_params"] == {
        "processfork": {"loaded_tokens": split, "local_tokens": 0}
    }
    got, want = restored["choices"][0]["logprobs"], before.warm["choices"][0]["logprobs"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert got[key] == want[key], key
    # The connector's own counters on /metrics (vLLM forwards them with its scheduler stats).
    deadline = time.monotonic() + 60
    while metric(server, "processfork_restored_tokens_total") - restored_before < split:
        assert time.monotonic() < deadline, "processfork_restored_tokens_total never counted"
        time.sleep(0.5)
    assert metric(server, "processfork_restored_requests_total") >= 1


def test_a_request_under_another_cache_salt_loads_nothing(server, before):
    external = metric(server, "vllm:external_prefix_cache_hits_total")
    salted = complete(server, before.salted, max_tokens=2, cache_salt="tenant-b")
    assert cached_tokens(salted) == 0
    assert metric(server, "vllm:external_prefix_cache_hits_total") == external
    assert salted.get("kv_transfer_params") is None
    # The same tokens without a salt are the snapshot's partition: they load.
    plain = complete(server, before.salted, max_tokens=2)
    assert cached_tokens(plain) == split_point(len(before.salted))


def test_each_session_turn_is_a_snapshot_chained_to_the_last(before, pf_store):
    with Store(pf_store, readonly=True) as store:
        manifests = [store.get_snapshot(t["cid"]) for t in before.turns]
        stored = [store.get_tokens(m.sequences[0].tokens) for m in manifests]
    assert [m.parents for m in manifests] == [[], [before.turns[0]["cid"]],
                                              [before.turns[1]["cid"]]]
    for turn, manifest, tokens in zip(before.turns, manifests, stored):
        reply = turn["reply"]
        assert reply["session"] == REF
        # Every token the engine computed: the prompt and the output but the last sampled
        # token; pages for the whole blocks only (a partial last block is never loaded, and
        # the next turn stores it whole), and the manifest says where they stop.
        assert tokens == turn["prompt"] + turn["output"][:-1]
        assert reply["session_tokens"] == len(tokens)
        [seq] = manifest.sequences
        assert reply["session_blocks"] == len(seq.pages) == len(tokens) // BLOCK
        assert seq.tokens_with_pages == len(tokens) // BLOCK * BLOCK
        assert seq.paged_tokens == (None if len(tokens) % BLOCK == 0 else len(tokens) // BLOCK * BLOCK)
    assert any(m.sequences[0].paged_tokens is not None for m in manifests)  # a partial tail
    # fsck finds nothing wrong with the turns: no missing page for a tail that has none.
    cids = {t["cid"] for t in before.turns}
    with Store(pf_store, readonly=True) as store:
        assert store.meta_get("format")["version"] == 2
        issues = [i for i in store.fsck() if i.object in cids or cids & set(i.snapshots)]
    assert issues == []
    # pf log shows the same counts, newest first.
    result = CliRunner().invoke(app, ["--store", str(pf_store), "log", REF, "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["entries"]
    assert [e["num_tokens"] for e in entries] == [len(t) for t in reversed(stored)]
    # Later turns write only the blocks the earlier ones did not hold.
    for earlier, later in zip(before.turns, before.turns[1:]):
        new = later["reply"]["session_new_blocks"]
        assert 0 < new < later["reply"]["session_blocks"]
        assert new <= later["reply"]["session_blocks"] - len(earlier["prompt"]) // BLOCK


def test_the_next_turn_after_a_restart_loads_the_session_from_the_store(
    server, openai_client, before, pf_store
):
    with Store(pf_store, readonly=True) as store:
        last = store.get_tokens(store.get_snapshot(before.turns[-1]["cid"]).sequences[0].tokens)
    turn = _turn(openai_client, server, pf_store, before.history, _message(3))
    prompt = turn["prompt"]
    common = 0
    while common < min(len(prompt), len(last)) and prompt[common] == last[common]:
        common += 1
    expected = min(common // BLOCK * BLOCK, split_point(len(prompt)))
    assert expected >= len(before.turns[-1]["prompt"]) // BLOCK * BLOCK  # turns 1-3 at least
    assert turn["reply"]["loaded_tokens"] == expected
    # Every whole block the previous turn stored that this prompt starts with came from the
    # store; its partial last block (no page) was computed.
    assert expected >= min(common, len(last)) // BLOCK * BLOCK
    with Store(pf_store, readonly=True) as store:
        assert store.get_snapshot(turn["cid"]).parents == [before.turns[-1]["cid"]]


def test_a_session_rolled_back_continues_from_the_turn_it_was_reset_to(
    server, openai_client, before, pf_store
):
    # POST /reset: what `pf reset REF 'REF~N'` does, over HTTP; errors first, in the error shape.
    for body, status in [({"ref": "sessions/nobody", "rev": REF}, 404),
                         ({"ref": REF, "rev": f"{REF}~1", "old": before.turns[0]["cid"]}, 409),
                         ({"ref": "a..b", "rev": REF}, 400), ({"ref": REF}, 422)]:
        response = post(server, "/v1/processfork/reset", body)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()["error"]) == {"type", "message"}
    with Store(pf_store, readonly=True) as store:
        current = store.get_ref(REF)
        back = len(store.log(REF)) - 1  # turns since the first, on the ref's first-parent line
    moved = pf(server, "reset", {"ref": REF, "rev": f"{REF}~{back}"})
    assert moved == {"ref": REF, "cid": before.turns[0]["cid"], "old": current}
    history = before.history[:3]  # system, the first message and its answer
    turn = _turn(openai_client, server, pf_store, history, "Another plan, from step 1. " * 4)
    with Store(pf_store, readonly=True) as store:
        assert store.get_snapshot(turn["cid"]).parents == [before.turns[0]["cid"]]


def _post_with_session(server, body: dict, session: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300,
                      headers={**headers(server), "X-Processfork-Session": session},
                      trust_env=False)


def test_the_session_header_commits_like_kv_transfer_params(server, before, pf_store):
    body = {"model": server.model_name, "messages": before.history[:2], "max_tokens": 4,
            "temperature": 0}
    response = _post_with_session(server, body, "it-header")
    assert response.status_code == 200, response.text
    assert response.json()["kv_transfer_params"]["processfork"]["session"] == "sessions/it-header"
    wait_for_ref(pf_store, "sessions/it-header", None)
    bad = _post_with_session(server, body, "a..b")
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request"
