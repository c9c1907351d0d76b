"""A snapshot of a sequence whose blocks are all in the prefix cache runs no forward pass, and
its pages are the same bytes a computed snapshot stores: a checkout after a restart continues
exactly as the engine did before."""

from __future__ import annotations

import pytest
from pf_http import cached_tokens, complete, metric, pf, random_tokens
from processfork.store import Store

pytestmark = pytest.mark.integration

BLOCK = 32
LENGTH = 20 * BLOCK  # ends on a block boundary: every block can come from the prefix cache


@pytest.fixture(scope="module")
def resident(server):
    tokens = random_tokens(7100, LENGTH)
    cold = complete(server, tokens, max_tokens=8, logprobs=1)  # computes, caches
    assert cached_tokens(cold) == 0
    # The reference is a warm prefix hit: it computes the same last block from the same cached
    # pages as a restore does. The cold prefill split the prompt into other chunks, whose last
    # bits may differ (docs/architecture.md, "The fidelity promise").
    reference = complete(server, tokens, max_tokens=8, logprobs=1)
    assert cached_tokens(reference) == LENGTH - BLOCK
    before = metric(server, "vllm:request_prefill_kv_computed_tokens_sum")
    assert before >= LENGTH  # the metric exists and counted the cold prefill
    snap = pf(server, "snapshot", {"name": "resident", "token_ids": tokens})
    after = metric(server, "vllm:request_prefill_kv_computed_tokens_sum")
    return {"tokens": tokens, "reference": reference, "snapshot": snap,
            "computed_during_snapshot": after - before}


def test_resident_snapshot_computes_nothing(resident):
    snap = resident["snapshot"]
    assert snap["num_tokens"] == LENGTH
    assert snap["num_pages"] == LENGTH // BLOCK
    assert resident["computed_during_snapshot"] == 0


def test_extension_by_one_block_writes_one_block(server, resident):
    grown = resident["tokens"] + random_tokens(7101, BLOCK)
    complete(server, grown, max_tokens=1)  # the new block becomes resident
    snap = pf(server, "snapshot", {"name": "resident", "token_ids": grown})
    assert snap["parents"] == [resident["snapshot"]["cid"]]
    assert snap["new_pages"] == 1
    assert snap["num_pages"] == LENGTH // BLOCK + 1


def test_same_pages_as_a_computed_snapshot(server, resident, pf_store):
    """The unaligned sequence (one more token) must be computed; its whole blocks come from the
    same cache, so the stored pages must be identical."""
    longer = resident["tokens"] + [resident["tokens"][0]]
    computed = pf(server, "snapshot", {"name": "resident-computed", "token_ids": longer})
    with Store(pf_store, readonly=True) as store:
        a = store.get_snapshot(resident["snapshot"]["cid"]).sequences[0].pages
        b = store.get_snapshot(computed["cid"]).sequences[0].pages
    assert a == b[: len(a)]


def test_checkout_after_restart_continues_exactly(server, restart_server, resident):
    restart_server()
    out = pf(server, "checkout", {"cid": resident["snapshot"]["cid"]})
    assert out["tokens_loaded"] == LENGTH - BLOCK  # one token is always left to compute
    again = complete(server, resident["tokens"], max_tokens=8, logprobs=1)
    assert cached_tokens(again) == LENGTH - BLOCK
    ref, got = resident["reference"]["choices"][0], again["choices"][0]
    assert got["text"] == ref["text"]
    assert got["logprobs"]["token_logprobs"] == ref["logprobs"]["token_logprobs"]
