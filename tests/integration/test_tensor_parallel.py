"""A real CPU engine at tensor-parallel size 2: its snapshot is one manifest of pages of one KV
head (format v4) that both ranks saved, and a checkout after a restart continues exactly as the
engine did from its prefix cache before. Two ranks on two cores start slowly: `make test-tp`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEFAULT_ARGS, EAGER
from pf_http import cached_tokens, complete, pf, random_tokens
from processfork.plugin.launch_plan import DEFAULT_CONNECTOR_MODULE, kv_transfer_config
from processfork.store import Store
from processfork.store.manifest import FORMAT_HEADS

from processfork_dev.live_server import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.tp]

BLOCK = 32
LENGTH = 10 * BLOCK + 7


@pytest.fixture
def tp2_server(tiny_model: Path, tmp_path: Path):
    store = tmp_path / "store"
    config = kv_transfer_config(store, DEFAULT_CONNECTOR_MODULE)  # sessions off by default
    live = LiveServer(
        model=tiny_model, store=store, log_dir=tmp_path,
        extra_args=(*DEFAULT_ARGS, *EAGER, "--tensor-parallel-size", "2",
                    "--distributed-executor-backend", "mp",
                    "--kv-transfer-config", json.dumps(config)),
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    live.start()
    yield live
    live.stop()


def test_a_tp2_snapshot_holds_every_head_and_checks_out_after_a_restart(tp2_server, tiny_model):
    server = tp2_server
    tokens = random_tokens(8200, LENGTH)
    complete(server, tokens, max_tokens=8, logprobs=1)  # computes, caches
    # A warm prefix hit computes the last block from the cached pages, as a restore does.
    reference = complete(server, tokens, max_tokens=8, logprobs=1)
    assert cached_tokens(reference) == LENGTH // BLOCK * BLOCK
    snap = pf(server, "snapshot", {"name": "tp2", "token_ids": tokens})
    heads = json.loads((tiny_model / "config.json").read_text())["num_key_value_heads"]
    with Store(server.store) as store:
        manifest = store.get_snapshot(snap["cid"])
        assert manifest.format == FORMAT_HEADS and manifest.fingerprint["tp_size"] == 2
        seq = manifest.sequences[0]
        assert seq.heads == heads and seq.num_blocks == -(-LENGTH // BLOCK)
        assert len({d for pair in seq.pages for d in pair}) > seq.num_blocks  # heads differ
        assert store.meta_items("job:") == {}
    server.restart()
    out = pf(server, "checkout", {"cid": snap["cid"]})
    assert out["tokens_loaded"] == LENGTH // BLOCK * BLOCK
    restored = complete(server, tokens, max_tokens=8, logprobs=1)
    assert restored["choices"][0]["text"] == reference["choices"][0]["text"]
    assert (restored["choices"][0]["logprobs"]["token_logprobs"]
            == reference["choices"][0]["logprobs"]["token_logprobs"])
