"""The staged page path, the one a GPU uses, end to end through vLLM's CPU backend.

A server started with ``"page_path": "staged"`` moves every page through the fixed pool of
staging slots (here 1 MiB: four blocks of the tiny model per chunk, so every transfer spans
several chunks), with several copy threads, and keeps pages in a host tier (a file in a temporary
directory here, ``/dev/shm`` by default) that outlives the engine. Its snapshots must hold the
very pages the direct CPU path of the session server stores for the same tokens, and a checkout
after a restart (served from the tier the previous engine filled) must continue bit for bit like
the same engine's warm prefix-cache hit.
"""

from __future__ import annotations

import json
import re

import pytest
from pf_http import cached_tokens, complete, pf, random_tokens
from processfork.plugin.launch_plan import kv_transfer_config
from processfork.plugin.staged_pages import default_page_reader
from processfork.store import Store

pytestmark = pytest.mark.integration

BLOCK = 32
COMPUTED = 19 * BLOCK + 7  # ragged: the last block is partial
RESIDENT = 12 * BLOCK  # block-aligned and cached: saved without a forward pass


def launch_ahead(servers):
    store = servers.new_store("staged")
    config = kv_transfer_config(store)
    config["kv_connector_extra_config"].update({
        "page_path": "staged", "staging_mib": 1, "copy_threads": 3, "host_tier_mib": 64,
        "host_tier_dir": str(servers.tmp_path_factory.mktemp("pf-tier")),
    })
    return servers.launch(store=store, extra_args=(
        "--max-model-len", "4096", "--max-num-batched-tokens", "256",
        "--kv-transfer-config", json.dumps(config),
    ))


@pytest.fixture(scope="module")
def staged(servers):
    return servers.module_server(__name__, launch_ahead)


def _pages(store_path, cid):
    with Store(store_path, readonly=True) as store:
        return store.get_snapshot(cid).sequences[0].pages


def test_staged_server_reports_its_page_path(staged):
    log = staged.process.log_path.read_text(errors="replace")
    assert "staged page path" in log and "chunks of 4 blocks" in log
    # Built in the worker on first use (native_pages.py); on x86-64 it copies out of the map.
    reader = "copies from the store's map" if default_page_reader() == "map" else "pread"
    assert f"(compiled page reader, {reader})" in log
    assert "host tier" in log and "0 pages kept from before" in log


def test_staged_pages_equal_the_direct_paths_pages(server, pf_store, staged):
    """Computed in chunks of 256 tokens by both engines, saved by two different page paths."""
    tokens = random_tokens(8100, COMPUTED)
    direct = pf(server, "snapshot", {"name": "paths/direct", "token_ids": tokens})
    via_slots = pf(staged, "snapshot", {"name": "paths/staged", "token_ids": tokens})
    assert via_slots["num_pages"] == direct["num_pages"] == -(-COMPUTED // BLOCK)
    assert _pages(staged.store, via_slots["cid"]) == _pages(pf_store, direct["cid"])


def test_a_second_snapshot_of_resident_blocks_copies_nothing(staged):
    """The engine remembers the pages it saved; nothing has written those blocks since, so the
    second snapshot names them without copying (only the partial last block is copied again).

    The engine computes that partial block again for the second request, from the cached full
    blocks, where the first computed it in its last prefill chunk: on some CPUs those two
    computations differ in the last bits, so its two pages may be new; the full blocks' may not.
    """
    tokens = random_tokens(8400, COMPUTED)
    first = pf(staged, "snapshot", {"name": "again/1", "token_ids": tokens})
    again = pf(staged, "snapshot", {"name": "again/2", "token_ids": tokens})
    full = COMPUTED // BLOCK
    assert COMPUTED % BLOCK and first["reused_pages"] == 0
    assert again["reused_pages"] == full and again["new_pages"] <= 2
    assert _pages(staged.store, again["cid"])[:full] == _pages(staged.store, first["cid"])[:full]


def test_staged_checkout_after_restart_matches_a_warm_hit(staged):
    computed = random_tokens(8200, COMPUTED)
    resident = random_tokens(8300, RESIDENT)
    references = {}
    for name, tokens in (("computed", computed), ("resident", resident)):
        if name == "resident":
            complete(staged, tokens, max_tokens=1)  # make every block resident first
        snap = pf(staged, "snapshot", {"name": f"staged/{name}", "token_ids": tokens})
        warm = complete(staged, tokens, max_tokens=20, logprobs=5)
        assert cached_tokens(warm) == (len(tokens) - 1) // BLOCK * BLOCK
        references[name] = (tokens, snap, warm)
    staged.restart()
    log = staged.process.log_path.read_text(errors="replace")
    kept = re.search(r"host tier .* (\d+) pages kept from before", log)
    assert kept and int(kept.group(1)) > 0, "the saved pages outlive the engine in the tier"
    for name, (tokens, snap, warm) in references.items():
        out = pf(staged, "checkout", {"cid": snap["cid"]})
        assert out["tokens_loaded"] == (len(tokens) - 1) // BLOCK * BLOCK, name
        again = complete(staged, tokens, max_tokens=20, logprobs=5)
        assert cached_tokens(again) == out["tokens_loaded"], name
        got, ref = again["choices"][0]["logprobs"], warm["choices"][0]["logprobs"]
        assert got["tokens"] == ref["tokens"], name
        assert got["token_logprobs"] == ref["token_logprobs"], name
        assert got["top_logprobs"] == ref["top_logprobs"], name
