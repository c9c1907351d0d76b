"""Checkout after a restart: the restored KV really loads, and continues bit-exactly.

``prepare_before_restart`` does everything that needs the *first* engine (references, snapshots
of every kind, several clients' sequences resident at once); then the session server restarts
(the one restart its modules share, conftest's ``restarted``) so its prefix cache is cold. The
tests then check out into the fresh engine and compare.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from pf_http import PF, cached_tokens, complete, damage_page, get, metric, pf, post, random_tokens
from processfork.store import Store

pytestmark = pytest.mark.integration

BLOCK = 32
# 29 whole blocks + 1 token, and a length that is not a whole number of blocks plus one.
LENGTHS = (29 * BLOCK + 1, 941)
TEXT_PROMPT = (
    "Agents keep long contexts: a system prompt, tool descriptions, the user's goal, and every "
    "observation so far. Restoring that context without recomputing it is what makes branching "
    "cheap. " * 6
)
MESSAGES = [
    {"role": "system", "content": "You are a careful planner. " * 20},
    {"role": "user", "content": "List three ways to cross a river without a bridge. " * 4},
]


def split_point(length: int) -> int:
    """Tokens vLLM's prefix cache serves for a prompt it has seen: whole blocks, never the last."""
    return (length - 1) // BLOCK * BLOCK


@dataclass
class Before:
    """What the first engine computed and stored before the restart."""

    prompts: dict[int, list[int]] = field(default_factory=dict)
    cold: dict[int, dict[str, Any]] = field(default_factory=dict)
    warm: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    clients: list[list[int]] = field(default_factory=list)
    by_request: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)


def _stream_tokens(server, prompt: list[int], max_tokens: int, into: list[int]) -> list[int]:
    """Stream a long greedy completion, appending output token ids to ``into`` as they come."""
    import json as _json

    import httpx

    body = {"model": server.model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=headers,
                      timeout=300, trust_env=False) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = _json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    into.extend(choice.get("token_ids") or [])
    return into


def _wait_for(tokens: list[int], count: int) -> None:
    import time

    deadline = time.monotonic() + 60
    while len(tokens) < count:
        if time.monotonic() > deadline:
            raise AssertionError("the streaming request produced no output")
        time.sleep(0.01)


def _logprobs(completion: dict[str, Any]) -> dict[str, Any]:
    return completion["choices"][0]["logprobs"]


def prepare_before_restart(server, pf_store, openai_client) -> Before:
    out = Before()
    for i, length in enumerate(LENGTHS):
        prompt = random_tokens(1000 + i, length)
        out.prompts[length] = prompt
        out.cold[length] = complete(server, prompt, logprobs=5)
        out.warm[length] = complete(server, prompt, logprobs=5)
        assert cached_tokens(out.warm[length]) == split_point(length)
        out.snapshots[f"fidelity/{length}"] = pf(
            server, "snapshot", {"name": f"fidelity/{length}", "token_ids": prompt}
        )

    out.prompts[0] = random_tokens(1100, 700)  # only checked out by the metrics test
    out.snapshots["proof"] = pf(server, "snapshot", {"name": "proof", "token_ids": out.prompts[0]})

    # Several clients' sequences resident at once, then a name-only snapshot of everything.
    client_prompts = [random_tokens(2000 + i, 250 + 70 * i) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(
            pool.map(
                lambda p: complete(server, p, max_tokens=12, return_token_ids=True), client_prompts
            )
        )
    out.clients = [p + r["choices"][0]["token_ids"] for p, r in zip(client_prompts, results)]
    out.snapshots["resident"] = pf(server, "snapshot", {"name": "resident"})

    # A request still decoding is part of the resident state too.
    running_prompt = random_tokens(2500, 200)
    streamed: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_stream_tokens, server, running_prompt, 3800, streamed)
        _wait_for(streamed, 8)
        seen = len(streamed)
        out.snapshots["running"] = pf(server, "snapshot", {"name": "running"})
        print("streamed before/after snapshot:", seen, len(streamed))
        out.running = running_prompt + stream.result()

    answer = complete(server, random_tokens(3000, 400), max_tokens=16, return_token_ids=True)
    out.by_request = random_tokens(3000, 400) + answer["choices"][0]["token_ids"]
    out.snapshots["by-request"] = pf(
        server, "snapshot", {"name": "by-request", "request_id": answer["id"]}
    )
    out.snapshots["by-prompt"] = pf(server, "snapshot", {"name": "by-prompt", "prompt": TEXT_PROMPT})
    out.snapshots["by-messages"] = pf(
        server, "snapshot", {"name": "by-messages", "messages": MESSAGES}
    )
    # Last, so no name-only snapshot above holds this sequence: only its own checkout loads it.
    out.prompts[1] = random_tokens(1200, 500)  # its stored pages get damaged after the restart
    out.warm[1] = complete(server, out.prompts[1], logprobs=5)
    out.snapshots["damaged"] = pf(server, "snapshot", {"name": "damaged",
                                                       "token_ids": out.prompts[1]})
    return out


@pytest.fixture(scope="module")
def before(restarted) -> Before:
    return restarted.prepared[__name__]


def test_long_prompts_were_prefilled_in_chunks(server, before):
    engine = get(server, "/v1/processfork/status").json()["engine"]
    assert engine["max_num_batched_tokens"] < min(LENGTHS)
    for length in LENGTHS:
        snap = before.snapshots[f"fidelity/{length}"]
        assert snap["num_tokens"] == length
        assert snap["num_pages"] == -(-length // BLOCK)


@pytest.mark.parametrize("length", LENGTHS)
def test_restore_is_bit_identical_to_a_warm_prefix_cache_hit(server, before, length):
    checkout = pf(server, "checkout", {"cid": f"fidelity/{length}"})
    assert checkout["tokens_loaded"] == split_point(length)
    assert checkout["tokens_already_resident"] == 0  # the restart left the cache cold

    restored = complete(server, before.prompts[length], logprobs=5)
    warm = before.warm[length]
    assert _logprobs(restored)["tokens"] == _logprobs(warm)["tokens"]
    assert _logprobs(restored)["token_logprobs"] == _logprobs(warm)["token_logprobs"]
    assert _logprobs(restored)["top_logprobs"] == _logprobs(warm)["top_logprobs"]


@pytest.mark.parametrize("length", LENGTHS)
def test_restore_matches_a_cold_full_prefill(server, before, length):
    pf(server, "checkout", {"cid": f"fidelity/{length}"})
    restored = complete(server, before.prompts[length], logprobs=5)
    cold = before.cold[length]
    assert _logprobs(restored)["tokens"] == _logprobs(cold)["tokens"]
    deltas = [
        abs(a - b)
        for a, b in zip(_logprobs(restored)["token_logprobs"], _logprobs(cold)["token_logprobs"])
    ]
    print(f"length {length}: max |delta logprob| vs cold prefill = {max(deltas):.3g}")
    assert max(deltas) <= 1e-4


def test_checkout_then_completion_computes_at_most_one_block(server, before):
    """Proof from vLLM's own counters: the prompt is served from cache, not recomputed."""
    prompt = before.prompts[0]
    length = len(prompt)
    external_before = metric(server, "vllm:external_prefix_cache_hits_total")
    checkout = pf(server, "checkout", {"cid": "proof"})
    assert checkout["tokens_loaded"] == split_point(length)
    external_after = metric(server, "vllm:external_prefix_cache_hits_total")
    assert external_after - external_before == checkout["tokens_loaded"]

    hits_before = metric(server, "vllm:prefix_cache_hits_total")
    prompt_before = metric(server, "vllm:prompt_tokens_total")
    completion = complete(server, prompt, max_tokens=1)
    hits = metric(server, "vllm:prefix_cache_hits_total") - hits_before
    prompt = metric(server, "vllm:prompt_tokens_total") - prompt_before
    assert prompt == length
    assert prompt - hits <= BLOCK
    assert length - cached_tokens(completion) <= BLOCK


def test_name_only_snapshot_restores_every_resident_sequence(server, before, pf_store):
    snap = before.snapshots["resident"]
    assert snap["num_sequences"] >= len(before.clients)
    with Store(pf_store, readonly=True) as store:
        manifest = store.get_snapshot(snap["cid"])
        stored = [store.get_tokens(s.tokens) for s in manifest.sequences]
    for client in before.clients:
        assert any(seq[: len(client)] == client for seq in stored), "a client sequence is missing"

    checkout = pf(server, "checkout", {"cid": "resident"})
    assert checkout["num_sequences"] == snap["num_sequences"]
    for client in before.clients:
        again = complete(server, client, max_tokens=1)
        assert cached_tokens(again) == split_point(len(client))


def test_name_only_snapshot_captures_a_request_still_decoding(server, before, pf_store):
    snap = before.snapshots["running"]
    with Store(pf_store, readonly=True) as store:
        manifest = store.get_snapshot(snap["cid"])
        stored = [store.get_tokens(s.tokens) for s in manifest.sequences]
    prompt_len = 200
    partial = [seq for seq in stored if seq[:prompt_len] == before.running[:prompt_len]]
    assert partial, "the running request is missing from the snapshot"
    longest = max(partial, key=len)
    assert prompt_len < len(longest) < len(before.running)  # caught mid-decode
    assert longest == before.running[: len(longest)]

    pf(server, "checkout", {"cid": "running"})
    again = complete(server, longest, max_tokens=1)
    assert cached_tokens(again) == split_point(len(longest))


def test_a_corrupt_page_is_caught_and_recomputed(server, before, pf_store):
    """A damaged page is never served: checkout reports it, vLLM recomputes the block, and the
    continuation still matches the original (as a cold prefill does)."""
    with Store(pf_store, readonly=True) as store:
        pages = store.get_snapshot(before.snapshots["damaged"]["cid"]).sequences[0].pages
    damage_page(pf_store, pages[3][0])
    response = post(server, f"{PF}/checkout", {"cid": "damaged"})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "integrity_error" and pages[3][0] in error["message"]

    again = complete(server, before.prompts[1], logprobs=5)
    assert _logprobs(again)["tokens"] == _logprobs(before.warm[1])["tokens"]
    deltas = [abs(a - b) for a, b in zip(_logprobs(again)["token_logprobs"],
                                         _logprobs(before.warm[1])["token_logprobs"])]
    assert max(deltas) <= 1e-4


def test_request_id_snapshot_holds_prompt_and_output(server, before, pf_store):
    snap = before.snapshots["by-request"]
    with Store(pf_store, readonly=True) as store:
        manifest = store.get_snapshot(snap["cid"])
        assert [store.get_tokens(s.tokens) for s in manifest.sequences] == [before.by_request]
    pf(server, "checkout", {"cid": "by-request"})
    again = complete(server, before.by_request, max_tokens=1)
    assert cached_tokens(again) == split_point(len(before.by_request))


def test_prompt_snapshot_serves_the_same_text_prompt(server, before):
    snap = before.snapshots["by-prompt"]
    pf(server, "checkout", {"cid": "by-prompt"})
    again = complete(server, TEXT_PROMPT, max_tokens=1)
    assert again["usage"]["prompt_tokens"] == snap["num_tokens"]
    assert cached_tokens(again) == split_point(snap["num_tokens"])


def test_messages_snapshot_serves_the_same_chat(server, before):
    snap = before.snapshots["by-messages"]
    pf(server, "checkout", {"cid": "by-messages"})

    response = post(
        server,
        "/v1/chat/completions",
        {"model": server.model_name, "messages": MESSAGES, "max_tokens": 1, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == snap["num_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == split_point(snap["num_tokens"])
