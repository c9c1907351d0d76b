"""A snapshot of a sequence whose blocks are all in the prefix cache runs no forward pass, and
its pages are the same bytes a computed snapshot stores: a checkout after a restart continues
exactly as the engine did before. The work before the restart runs in
``prepare_before_restart``, ahead of the restart the session server's modules share."""

from __future__ import annotations

import pytest
from pf_http import cached_tokens, complete, metric, pf, random_tokens
from processfork.store import Store

pytestmark = pytest.mark.integration

BLOCK = 32
LENGTH = 20 * BLOCK  # ends on a block boundary: every block can come from the prefix cache


def prepare_before_restart(server, pf_store, openai_client):
    """Everything that needs the first engine; the session server's shared restart (conftest's
    ``restarted``) comes after it."""
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
    # One more block, made resident by a completion, then snapshotted onto the same ref.
    grown = tokens + random_tokens(7101, BLOCK)
    complete(server, grown, max_tokens=1)
    extended = pf(server, "snapshot", {"name": "resident", "token_ids": grown})
    # The unaligned sequence (one more token) must be computed; its whole blocks come from the
    # same cache.
    longer = tokens + [tokens[0]]
    computed = pf(server, "snapshot", {"name": "resident-computed", "token_ids": longer})
    return {"tokens": tokens, "reference": reference, "snapshot": snap,
            "computed_during_snapshot": after - before, "extended": extended,
            "computed": computed}


@pytest.fixture(scope="module")
def resident(restarted):
    return restarted.prepared[__name__]


def test_resident_snapshot_computes_nothing(resident):
    snap = resident["snapshot"]
    assert snap["num_tokens"] == LENGTH
    assert snap["num_pages"] == LENGTH // BLOCK
    assert resident["computed_during_snapshot"] == 0


def test_extension_by_one_block_writes_one_block(resident):
    snap = resident["extended"]
    assert snap["parents"] == [resident["snapshot"]["cid"]]
    assert snap["new_pages"] == 1
    assert snap["num_pages"] == LENGTH // BLOCK + 1


def test_same_pages_as_a_computed_snapshot(resident, pf_store):
    """The computed snapshot's whole blocks came from the same cache as the resident one's, so
    the stored pages must be identical."""
    with Store(pf_store, readonly=True) as store:
        a = store.get_snapshot(resident["snapshot"]["cid"]).sequences[0].pages
        b = store.get_snapshot(resident["computed"]["cid"]).sequences[0].pages
    assert a == b[: len(a)]


def test_checkout_after_restart_continues_exactly(server, resident):
    out = pf(server, "checkout", {"cid": resident["snapshot"]["cid"]})
    assert out["tokens_loaded"] == LENGTH - BLOCK  # one token is always left to compute
    again = complete(server, resident["tokens"], max_tokens=8, logprobs=1)
    assert cached_tokens(again) == LENGTH - BLOCK
    ref, got = resident["reference"]["choices"][0], again["choices"][0]
    assert got["text"] == ref["text"]
    assert got["logprobs"]["token_logprobs"] == ref["logprobs"]["token_logprobs"]
