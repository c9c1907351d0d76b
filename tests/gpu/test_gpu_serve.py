"""The product on a real ``vllm serve`` on a CUDA GPU: what the CPU integration suite proves there.

One module fixture does everything that needs the first engine (warm references, snapshots of
every kind, a fork and its extended branches), then restarts the server so its prefix cache is
cold, and the tests check out into the fresh engine.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from pf_http import PF, cached_tokens, complete, damage_page, get, pf, post, random_tokens
from processfork.store import Store

# vLLM's default block size on CUDA (tests/gpu/conftest.py leaves it as it is)
BLOCK = int(os.environ.get("PF_GPU_SUITE_BLOCK") or 16)
# 40 whole blocks (+1 token, so the split point is the whole prompt but one block), and a ragged
# length; both longer than the 256-token step budget: the prefill runs in chunks.
LENGTHS = (40 * BLOCK + 1, 40 * BLOCK + 9)
TEXT_PROMPT = "Snapshots of a GPU's paged KV cache, restored without a prefill. " * 12


def split_point(length: int) -> int:
    return (length - 1) // BLOCK * BLOCK


def _lp(completion: dict[str, Any]) -> dict[str, Any]:
    return completion["choices"][0]["logprobs"]


def _same_continuation(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert _lp(a)["tokens"] == _lp(b)["tokens"]
    assert _lp(a)["token_logprobs"] == _lp(b)["token_logprobs"]
    assert _lp(a)["top_logprobs"] == _lp(b)["top_logprobs"]


@dataclass
class Before:
    prompts: dict[int, list[int]] = field(default_factory=dict)
    warm: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    fork: dict[str, Any] = field(default_factory=dict)
    damaged_prompt: list[int] = field(default_factory=list)
    damaged_warm: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def before(gpu_server) -> Before:
    server, out = gpu_server, Before()
    for length in LENGTHS:
        prompt = random_tokens(600 + length, length)
        out.prompts[length] = prompt
        out.snapshots[f"gpu/{length}"] = pf(server, "snapshot",
                                            {"name": f"gpu/{length}", "token_ids": prompt})
        out.warm[length] = complete(server, prompt, logprobs=5)
        assert cached_tokens(out.warm[length]) == split_point(length)

    # Every snapshot mode.
    answer = complete(server, random_tokens(700, 300), max_tokens=16, return_token_ids=True)
    out.snapshots["by-request"] = pf(server, "snapshot",
                                     {"name": "by-request", "request_id": answer["id"]})
    out.snapshots["by-prompt"] = pf(server, "snapshot", {"name": "by-prompt",
                                                         "prompt": TEXT_PROMPT})
    out.snapshots["by-messages"] = pf(server, "snapshot", {"name": "by-messages", "messages": [
        {"role": "system", "content": "You plan carefully. " * 20},
        {"role": "user", "content": "Three ways to cross a river? " * 4}]})
    out.snapshots["resident"] = pf(server, "snapshot", {"name": "resident"})

    # A fork, each branch continued differently and snapshotted: only suffix pages are new.
    base_tokens = random_tokens(800, 300)
    base = pf(server, "snapshot", {"name": "tree", "token_ids": base_tokens})
    children = pf(server, "fork", {"cid": "tree", "n": 2})["cids"]
    branches = []
    for i in range(2):
        sampled = complete(server, base_tokens, max_tokens=40, temperature=1.0, seed=10 + i,
                           return_token_ids=True)
        tokens = base_tokens + sampled["choices"][0]["token_ids"]
        branches.append(pf(server, "snapshot", {"name": f"tree/{i}", "token_ids": tokens}))
    out.fork = {"base": base, "children": children, "branches": branches}

    # Its pages get damaged after the restart; nothing else above holds this sequence.
    out.damaged_prompt = random_tokens(900, 500)
    out.snapshots["damaged"] = pf(server, "snapshot", {"name": "damaged",
                                                       "token_ids": out.damaged_prompt})
    out.damaged_warm = complete(server, out.damaged_prompt, logprobs=5)
    server.restart()
    return out


def test_engine_runs_on_cuda_with_a_gpu_layout(gpu_server, before):
    fingerprint = get(gpu_server, f"{PF}/status").json()["engine"]["fingerprint"]
    assert fingerprint["device"] == "cuda"
    assert fingerprint["block_size"] == BLOCK
    assert fingerprint["kv_dtype"] == "bfloat16"
    assert fingerprint["layout"] in ("split_last/BHN2D", "stacked_kv/2BNHD", "block_kv/B2NHD")
    print("GPU fingerprint:", json.dumps(fingerprint, sort_keys=True))


@pytest.mark.parametrize("length", LENGTHS)
def test_restore_is_bit_identical_to_a_warm_prefix_hit(gpu_server, before, length):
    out = pf(gpu_server, "checkout", {"cid": f"gpu/{length}"})
    assert out["tokens_loaded"] == split_point(length)
    assert out["tokens_already_resident"] == 0  # the restart left the cache cold
    restored = complete(gpu_server, before.prompts[length], logprobs=5)
    assert cached_tokens(restored) == split_point(length)
    _same_continuation(restored, before.warm[length])


def test_snapshots_were_saved_across_chunked_prefill_steps(before):
    for length in LENGTHS:
        snap = before.snapshots[f"gpu/{length}"]
        assert snap["num_tokens"] == length
        assert snap["num_pages"] == -(-length // BLOCK)


@pytest.mark.parametrize("mode", ["by-request", "by-prompt", "by-messages", "resident"])
def test_every_snapshot_mode_checks_out(gpu_server, before, mode):
    snap = before.snapshots[mode]
    assert snap["num_tokens"] > BLOCK
    out = pf(gpu_server, "checkout", {"cid": snap["cid"]})
    # Sequences that earlier checkouts made resident are not loaded again.
    restored = out["tokens_loaded"] + out["tokens_already_resident"]
    assert restored >= out["num_tokens"] - out["num_sequences"] * BLOCK
    if mode != "resident":
        assert out["tokens_loaded"] > 0


def test_fork_children_share_pages_and_branches_store_only_their_suffix(gpu_server, before,
                                                                         gpu_store):
    tree = before.fork
    with Store(gpu_store, readonly=True) as store:
        base = store.get_snapshot(tree["base"]["cid"])
        for cid in tree["children"]:
            assert store.get_snapshot(cid).sequences[0].pages == base.sequences[0].pages
    shared = 300 // BLOCK
    for branch in tree["branches"]:
        assert branch["parents"] == [tree["children"][tree["branches"].index(branch)]]
        assert branch["new_pages"] == branch["num_pages"] - shared
    out = pf(gpu_server, "checkout", {"cid": "tree/1"})
    assert out["tokens_loaded"] > 300 - BLOCK


def test_unknown_revision_is_404(gpu_server):
    response = post(gpu_server, f"{PF}/checkout", {"cid": "no-such-ref"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_other_model_is_409_and_a_missing_key_is_401(other_gpu_launched, before):
    other = other_gpu_launched.wait()
    try:
        response = post(other, f"{PF}/checkout", {"cid": f"gpu/{LENGTHS[0]}"})
        assert response.status_code == 409, response.text
        assert response.json()["error"]["type"] == "incompatible_snapshot"
        unauthorized = post(other, f"{PF}/checkout", {"cid": f"gpu/{LENGTHS[0]}"}, api_key=None)
        assert unauthorized.status_code == 401
    finally:
        other.stop()


def test_a_damaged_page_is_caught_and_recomputed(gpu_server, before, gpu_store):
    with Store(gpu_store, readonly=True) as store:
        pages = store.get_snapshot(before.snapshots["damaged"]["cid"]).sequences[0].pages
    damage_page(gpu_store, pages[3][1])
    response = post(gpu_server, f"{PF}/checkout", {"cid": "damaged"})
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "integrity_error" and pages[3][1] in error["message"], error
    again = complete(gpu_server, before.damaged_prompt, logprobs=5)
    assert _lp(again)["tokens"] == _lp(before.damaged_warm)["tokens"]


# -- batch-invariant kernels: restored == cold full prefill, also under concurrent load -------
@pytest.fixture(scope="module")
def invariant(invariant_launched):
    """The batch-invariant server of conftest.py, launched at the start of the session."""
    return invariant_launched.wait()


def test_batch_invariant_restore_under_load_equals_a_warm_hit_alone(invariant):
    """With batch-invariant kernels, a restore computed beside other requests is bit-identical
    to the same engine's warm prefix hit computed alone. Against a cold full prefill (one pass,
    no split) the greedy tokens match; the logprobs differ where the split changes how the
    attention over the prefix is reduced: the largest difference is printed (docs/gpu.md).

    The other requests have one-token prompts, so every row beside the restored one is a decode
    row. On Hopper, FlashAttention 3 picks its tiling from the longest query of the step, so a
    long prefill in the same step changes a decode row's result even with batch invariance on
    (vLLM issue 51902): an engine's own warm hit differs from itself that way, restore or not."""
    fingerprint = get(invariant, f"{PF}/status").json()["engine"]["fingerprint"]
    assert fingerprint["batch_invariant"] is True
    prompts = {n: random_tokens(1000 + n, n) for n in (40 * BLOCK + 1, 40 * BLOCK + 9)}
    cold, warm = {}, {}
    for n, p in prompts.items():
        cold[n] = complete(invariant, p, logprobs=5)
        assert cached_tokens(cold[n]) == 0
        warm[n] = complete(invariant, p, logprobs=5)
        assert cached_tokens(warm[n]) == split_point(n)
        pf(invariant, "snapshot", {"name": f"inv/{n}", "token_ids": p})
    invariant.restart()
    log = invariant.process.log_path.read_text(errors="replace")
    kept = re.search(r"host tier .* (\d+) pages kept from before", log)
    assert kept and int(kept.group(1)) > 0, "the snapshots' pages outlive the engine in the tier"
    stop = threading.Event()

    def load() -> int:
        sent = 0
        while not stop.is_set():
            complete(invariant, random_tokens(5000 + sent, 1), max_tokens=48)
            sent += 1
        return sent

    restored = {}
    with ThreadPoolExecutor(3) as pool:
        background = [pool.submit(load) for _ in range(3)]
        try:
            for n, p in prompts.items():
                out = pf(invariant, "checkout", {"cid": f"inv/{n}"})
                assert out["tokens_loaded"] == split_point(n)
                restored[n] = complete(invariant, p, logprobs=5)
                assert cached_tokens(restored[n]) == split_point(n)
        finally:
            stop.set()
            sent = [f.result() for f in background]
    assert sum(sent) >= 3  # the restores really ran beside other requests
    for n in prompts:
        _same_continuation(restored[n], warm[n])
        assert _lp(restored[n])["tokens"] == _lp(cold[n])["tokens"]
        delta = max(abs(a - b) for a, b in zip(_lp(restored[n])["token_logprobs"],
                                               _lp(cold[n])["token_logprobs"]))
        print(f"batch-invariant, length {n}: max |delta logprob| vs cold full prefill = "
              f"{delta:.3g}")
