"""Transparent restores on a real server: after a restart, a plain completion whose prompt starts
with a stored snapshot's tokens loads those blocks from the store by itself (no checkout) and
continues exactly as the warm prefix-cache hit did before the restart. One restart serves every
test of the module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pf_http import cached_tokens, complete, metric, pf, random_tokens

pytestmark = pytest.mark.integration

BLOCK = 32


def split_point(length: int) -> int:
    return (length - 1) // BLOCK * BLOCK


@dataclass
class Before:
    """What the engine computed and stored before the restart."""

    tokens: list[int] = field(default_factory=list)
    warm: dict[str, Any] = field(default_factory=dict)
    salted: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def before(server, restart_server) -> Before:
    out = Before()
    out.tokens = random_tokens(8100, 12 * BLOCK + 7)
    complete(server, out.tokens, max_tokens=8, logprobs=5)  # cold: computes and caches
    out.warm = complete(server, out.tokens, max_tokens=8, logprobs=5)  # the warm hit
    assert cached_tokens(out.warm) == split_point(len(out.tokens))
    pf(server, "snapshot", {"name": "auto/plain", "token_ids": out.tokens})
    out.salted = random_tokens(8101, 6 * BLOCK + 3)
    pf(server, "snapshot", {"name": "auto/salted", "token_ids": out.salted})
    restart_server()
    return out


def test_a_plain_completion_loads_its_stored_prefix_and_continues_exactly(server, before):
    split = split_point(len(before.tokens))
    external = metric(server, "vllm:external_prefix_cache_hits_total")
    restored = complete(server, before.tokens, max_tokens=8, logprobs=5)
    assert cached_tokens(restored) == split
    assert metric(server, "vllm:external_prefix_cache_hits_total") - external == split
    assert restored["kv_transfer_params"] == {
        "processfork": {"loaded_tokens": split, "local_tokens": 0}
    }
    got, want = restored["choices"][0]["logprobs"], before.warm["choices"][0]["logprobs"]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert got[key] == want[key], key


def test_a_request_under_another_cache_salt_loads_nothing(server, before):
    external = metric(server, "vllm:external_prefix_cache_hits_total")
    salted = complete(server, before.salted, max_tokens=2, cache_salt="tenant-b")
    assert cached_tokens(salted) == 0
    assert metric(server, "vllm:external_prefix_cache_hits_total") == external
    assert salted.get("kv_transfer_params") is None
    # The same tokens without a salt are the snapshot's partition: they load.
    plain = complete(server, before.salted, max_tokens=2)
    assert cached_tokens(plain) == split_point(len(before.salted))
