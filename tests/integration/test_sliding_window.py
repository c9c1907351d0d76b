"""A model with sliding-window layers interleaved with full-attention layers, on a real server.

vLLM's hybrid KV cache manager stays on with the connector (it declares ``SupportsHMA``), so the
engine has one KV-cache group per kind of layer. A snapshot stores each group's blocks (the
sliding-window group only those inside its window), and after a restart a checkout followed by
the same completion is bit-identical to the first engine's warm prefix hit, for a prompt longer
than the window and one shorter; so is a client request that extends a snapshot and loads it
from the store by itself (transparent restore). One server for the module, one restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import MODELS_DIR, SESSION_SERVER_ARGS
from pf_http import PF, cached_tokens, complete, get, pf, post, random_tokens
from processfork.plugin.kv_groups import GroupLayout
from processfork.store import Manifest, Store

from processfork_dev.model_builder import SLIDING, build_model

pytestmark = pytest.mark.integration

BLOCK = 32
WINDOW = SLIDING.sliding_window
# Longer than the window, in several prefill chunks; and shorter than the window.
LENGTHS = (9 * BLOCK + 12, 40)
RESTORED = 10 * BLOCK + 5  # a snapshot a client request extends by EXTRA tokens after the restart
EXTRA = 20


@dataclass
class Before:
    prompts: dict[int, list[int]] = field(default_factory=dict)
    warm: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    log: str = ""
    extended: list[int] = field(default_factory=list)
    extended_warm: dict[str, Any] = field(default_factory=dict)
    diverging: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def sw_server(start_server, tmp_path_factory):
    live = start_server(build_model(MODELS_DIR / "tiny-sliding", SLIDING),
                        store=tmp_path_factory.mktemp("pf-store-sw"),
                        extra_args=SESSION_SERVER_ARGS)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def before(sw_server) -> Before:
    out = Before()
    for i, length in enumerate(LENGTHS):
        prompt = random_tokens(7000 + i, length)
        out.prompts[length] = prompt
        complete(sw_server, prompt, max_tokens=12, logprobs=5)
        out.warm[length] = complete(sw_server, prompt, max_tokens=12, logprobs=5)
        assert cached_tokens(out.warm[length]) == (length - 1) // BLOCK * BLOCK
        out.snapshots[length] = pf(sw_server, "snapshot",
                                   {"name": f"sw/{length}", "token_ids": prompt})
    base = random_tokens(7100, RESTORED)
    out.snapshots[RESTORED] = pf(sw_server, "snapshot", {"name": "sw/extended", "token_ids": base})
    out.extended = base + random_tokens(7101, EXTRA)
    out.extended_warm = complete(sw_server, out.extended, max_tokens=12, logprobs=5)
    assert cached_tokens(out.extended_warm) == RESTORED // BLOCK * BLOCK
    # Shares 4 blocks with the snapshot, then differs: the window group stored none of them.
    out.diverging = base[: 4 * BLOCK + 3] + random_tokens(7102, 60)
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
