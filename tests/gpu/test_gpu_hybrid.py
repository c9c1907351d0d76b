"""A model with Mamba2 layers beside attention on a real ``vllm serve`` on CUDA: its state group
goes through the staged page path, the one every GPU engine takes.

The tiny Granite-4-style model of the CPU suite (``model_builder`` preset ``hybrid``), in the
suite's dtype (bf16). vLLM picks the block size itself (a block must hold a Mamba2 state; the
test reads the size from the engine's fingerprint), and a prompt of several blocks is prefilled
in several steps. Snapshot, restart (a cold cache), checkout: the next completion's 20 greedy
tokens and their logprobs are bit-identical to the first engine's warm prefix hit.

A vLLM that cannot cache prefixes of Mamba layers (their ``align`` cache mode) refuses the model
or makes the connector refuse it at start: the test is then skipped, with the engine's words.
With ``PF_GPU_SUITE_BLOCK`` set (a dry run on vLLM's CPU backend) the server takes the staged
page path explicitly, and the block and step sizes the CPU backend needs for this model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pf_http import PF, cached_tokens, complete, get, pf, random_tokens
from processfork.plugin.kv_groups import MAMBA
from processfork.plugin.server_process import ServerStartError

DRY_RUN = bool(os.environ.get("PF_GPU_SUITE_BLOCK"))
#: What the connector says (plugin/kv_groups.py) when vLLM runs the model's Mamba layers without
#: their `align` cache mode; and what a line of vLLM's that refuses (or turns off) prefix caching
#: for such a model names.
CONNECTOR_REFUSAL = "needs prefix caching on (the 'align' Mamba cache mode"
NEGATION = re.compile(r"(?i)(?<!\w)(not|cannot|unsupported|disabled|disabling|invalid)(?!\w)|n't\b")
CACHING = re.compile(r"(?i)prefix[ _-]caching|mamba_cache_mode|cache mode")
MAMBA_WORDS = re.compile(r"(?i)mamba|hybrid")


def _unsupported(error: ServerStartError) -> str | None:
    """The engine's line saying it cannot cache Mamba prefixes, from the whole server log."""
    text = str(error)
    path = re.search(r"; log (\S+):\n", text)
    if path is not None:
        try:
            text = Path(path.group(1)).read_text(errors="replace")
        except OSError:
            pass
    for line in text.splitlines():
        # Not the engine's config dump: its option names say "disable_...", "hybrid" and
        # "prefix_caching" whatever the outcome.
        if CONNECTOR_REFUSAL in line or (
            len(line) < 400 and CACHING.search(line) and MAMBA_WORDS.search(line)
            and NEGATION.search(line)
        ):
            return line.strip()[-300:]
    return None


@pytest.fixture(scope="module")
def hybrid_gpu_server(hybrid_gpu_launched):
    try:
        return hybrid_gpu_launched.wait()
    except ServerStartError as exc:
        reason = _unsupported(exc)
        if reason is None:
            raise
        pytest.skip(f"this vLLM does not cache prefixes of Mamba layers: {reason}")


def _logprobs(completion: dict[str, Any]) -> dict[str, Any]:
    return completion["choices"][0]["logprobs"]


def test_a_hybrid_model_restores_bit_identical_to_a_warm_prefix_hit(hybrid_gpu_server):
    server = hybrid_gpu_server
    fingerprint = get(server, f"{PF}/status").json()["engine"]["fingerprint"]
    print("hybrid GPU fingerprint:", json.dumps(fingerprint, sort_keys=True))
    assert fingerprint["device"] == ("cpu" if DRY_RUN else "cuda")
    assert sorted(g["kind"] for g in fingerprint["kv_groups"]) == ["full_attention", MAMBA]
    block = fingerprint["block_size"]
    length = max(3, 2048 // block) * block + 17  # several blocks, and a ragged end
    split = (length - 1) // block * block
    prompt = random_tokens(9100, length)

    snap = pf(server, "snapshot", {"name": "hybrid/gpu", "token_ids": prompt})
    assert snap["num_tokens"] == length
    warm = complete(server, prompt, logprobs=5, ignore_eos=True)
    assert cached_tokens(warm) == split
    server.restart()

    checkout = pf(server, "checkout", {"cid": "hybrid/gpu"})
    assert checkout["tokens_loaded"] == split
    assert checkout["tokens_already_resident"] == 0  # the restart left the cache cold
    restored = complete(server, prompt, logprobs=5, ignore_eos=True)
    assert cached_tokens(restored) == split
    assert len(_logprobs(restored)["tokens"]) == 20
    assert _logprobs(restored)["tokens"] == _logprobs(warm)["tokens"]
    assert _logprobs(restored)["token_logprobs"] == _logprobs(warm)["token_logprobs"]
    assert _logprobs(restored)["top_logprobs"] == _logprobs(warm)["top_logprobs"]
