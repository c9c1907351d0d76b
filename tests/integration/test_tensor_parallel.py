"""A real CPU engine at tensor-parallel size 2, as `pf serve MODEL --tensor-parallel-size 2` starts
it (sessions off by default, one core per rank): its snapshot is one manifest of pages of one KV
head (format v4) that both ranks saved, and a checkout after a restart continues exactly as the
engine did from its prefix cache before. Between TP sizes: the TP-2 snapshot checks out into a
TP-1 engine and a TP-1 snapshot (whole-block pages) into the TP-2 engine, each continuing with
the tokens of that engine's cold prefill and logprobs within 1e-4 of it (fp32; the reduction
order differs between TP sizes, so not bit-equal), while transparent restores never cross TP
sizes: a prompt extending the other size's snapshot is computed. The staged page path (every GPU
engine's) at TP 2, on the CPU backend: it checks out the direct path's snapshot bit-equal to the
warm hit, and its own snapshot checks out after a restart (on the direct path) bit-equal to its
warm hit. Two ranks on two cores start slowly: `make test-tp` (four engine starts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import DEFAULT_ARGS, EAGER
from pf_http import cached_tokens, complete, pf, random_tokens
from processfork.plugin.launch_plan import kv_transfer_config
from processfork.store import Store
from processfork.store.manifest import FORMAT_HEADS

from processfork_dev.live_server import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.tp]

BLOCK = 32
LENGTH = 10 * BLOCK + 7
STORED = LENGTH // BLOCK * BLOCK  # the whole blocks before the last token: what a load fills
OUT = 16
# The documented bound between a checkout at another TP size and a cold prefill (fp32).
TOLERANCE = 1e-4


def _server(tiny_model: Path, store: Path, log_dir: Path, tp: int, *,
            staged: bool = False) -> LiveServer:
    parallel = ("--tensor-parallel-size", str(tp), "--distributed-executor-backend", "mp")
    connector: tuple[str, ...] = ()
    if staged:
        # 1 MiB of staging: a few blocks of the tiny model per chunk, so a save spans chunks.
        config = kv_transfer_config(store)
        config["kv_connector_extra_config"].update({"page_path": "staged", "staging_mib": 1})
        connector = ("--kv-transfer-config", json.dumps(config))
    return LiveServer(model=tiny_model, store=store, log_dir=log_dir,
                      extra_args=(*DEFAULT_ARGS, *EAGER, *(parallel if tp > 1 else ()),
                                  *connector),
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"})


@pytest.fixture
def tp_servers(tiny_model: Path, tmp_path: Path):
    """A TP-2 server (started), a TP-1 one and a TP-2 one on the staged page path (not
    started), on one store."""
    store = tmp_path / "store"
    tp2 = _server(tiny_model, store, tmp_path, 2)
    tp1 = _server(tiny_model, store, tmp_path, 1)
    staged = _server(tiny_model, store, tmp_path, 2, staged=True)
    tp2.start()
    yield tp2, tp1, staged
    tp2.stop()
    tp1.stop()
    staged.stop()


def _logprobs(completion: dict[str, Any]) -> list[float]:
    return completion["choices"][0]["logprobs"]["token_logprobs"][-OUT:]


def _cold(server: LiveServer, tokens: list[int]) -> dict[str, Any]:
    """A cold prefill of ``tokens`` in a warm engine: vLLM reads neither its prefix cache nor
    the connector for a request that asks for prompt logprobs."""
    out = complete(server, tokens, max_tokens=OUT, logprobs=1, prompt_logprobs=1)
    assert cached_tokens(out) == 0
    return out


def _checked_out_matches_cold(server: LiveServer, cid: str, tokens: list[int]) -> float:
    """Check ``cid`` out, continue its tokens, and compare with a cold prefill on the same
    engine: the same tokens, and the largest logprob difference, returned."""
    assert pf(server, "checkout", {"cid": cid})["tokens_loaded"] == STORED
    restored = complete(server, tokens, max_tokens=OUT, logprobs=1)
    assert cached_tokens(restored) == STORED
    cold = _cold(server, tokens)
    assert restored["choices"][0]["text"] == cold["choices"][0]["text"]
    return max(abs(a - b) for a, b in zip(_logprobs(restored), _logprobs(cold), strict=True))


def _computed(server: LiveServer, tokens: list[int]) -> None:
    """A prompt extending a snapshot of the other TP size: nothing restored, nothing failed."""
    longer = [*tokens, *random_tokens(9000 + len(tokens), 2 * BLOCK)]
    assert cached_tokens(complete(server, longer, max_tokens=2)) == 0


def test_tp2_snapshots_check_out_after_a_restart_and_across_tp_sizes(tp_servers, tiny_model):
    tp2, tp1, staged = tp_servers
    x, y, z, w, v = (random_tokens(8200 + i, LENGTH) for i in range(5))

    # TP 2: a snapshot of every head, and the warm hit a checkout at TP 2 must equal bit for bit.
    complete(tp2, x, max_tokens=OUT, logprobs=1)  # computes, caches
    # A warm prefix hit computes the last block from the cached pages, as a restore does.
    reference = complete(tp2, x, max_tokens=OUT, logprobs=1)
    assert cached_tokens(reference) == STORED
    snap = pf(tp2, "snapshot", {"name": "tp2", "token_ids": x})
    pf(tp2, "snapshot", {"name": "tp2-other", "token_ids": y})
    heads = json.loads((tiny_model / "config.json").read_text())["num_key_value_heads"]
    with Store(tp2.store) as store:
        manifest = store.get_snapshot(snap["cid"])
        assert manifest.format == FORMAT_HEADS and manifest.fingerprint["tp_size"] == 2
        seq = manifest.sequences[0]
        assert seq.heads == heads and seq.num_blocks == -(-LENGTH // BLOCK)
        assert len({d for pair in seq.pages for d in pair}) > seq.num_blocks  # heads differ
        assert store.meta_items("job:") == {}
    tp2.stop()

    # TP 1: the TP-2 snapshot checks out; a prompt extending the other one is computed.
    tp1.start()
    down = _checked_out_matches_cold(tp1, snap["cid"], x)
    _computed(tp1, y)
    whole = pf(tp1, "snapshot", {"name": "tp1", "token_ids": z})
    pf(tp1, "snapshot", {"name": "tp1-other", "token_ids": w})
    with Store(tp1.store) as store:
        manifest = store.get_snapshot(whole["cid"])
        assert manifest.format != FORMAT_HEADS and manifest.fingerprint["tp_size"] == 1
    tp1.stop()

    # TP 2 on the staged page path, cold: the direct path's snapshot continues bit-equal to the
    # warm hit; a snapshot of its own (pages of one KV head cut from the staging slots) of a
    # prompt it computed, and that prompt's warm hit, for the restart below.
    staged.start()
    log = staged.process.log_path.read_text(errors="replace")
    assert "staged page path" in log
    assert pf(staged, "checkout", {"cid": snap["cid"]})["tokens_loaded"] == STORED
    via_slots = complete(staged, x, max_tokens=OUT, logprobs=1)
    assert cached_tokens(via_slots) == STORED
    assert via_slots["choices"][0]["text"] == reference["choices"][0]["text"]
    assert _logprobs(via_slots) == _logprobs(reference)
    complete(staged, v, max_tokens=OUT, logprobs=1)
    staged_reference = complete(staged, v, max_tokens=OUT, logprobs=1)
    assert cached_tokens(staged_reference) == STORED
    staged_snap = pf(staged, "snapshot", {"name": "tp2-staged", "token_ids": v})
    with Store(staged.store) as store:
        manifest = store.get_snapshot(staged_snap["cid"])
        assert manifest.format == FORMAT_HEADS and manifest.sequences[0].heads == heads
        assert store.meta_items("job:") == {}
    staged.stop()

    # TP 2 again, cold: its own snapshot continues bit-equal to its warm hit before; the TP-1
    # snapshot checks out too; a prompt extending the other TP-1 snapshot is computed.
    tp2.start()
    out = pf(tp2, "checkout", {"cid": snap["cid"]})
    assert out["tokens_loaded"] == STORED
    restored = complete(tp2, x, max_tokens=OUT, logprobs=1)
    assert restored["choices"][0]["text"] == reference["choices"][0]["text"]
    assert _logprobs(restored) == _logprobs(reference)
    assert pf(tp2, "checkout", {"cid": staged_snap["cid"]})["tokens_loaded"] == STORED
    restored = complete(tp2, v, max_tokens=OUT, logprobs=1)
    assert restored["choices"][0]["text"] == staged_reference["choices"][0]["text"]
    assert _logprobs(restored) == _logprobs(staged_reference)
    up = _checked_out_matches_cold(tp2, whole["cid"], z)
    _computed(tp2, w)
    print(f"\nmax |dlogprob| vs a cold prefill over {OUT} greedy tokens: TP-2 snapshot at TP 1 "
          f"{down:.3g}, TP-1 snapshot at TP 2 {up:.3g}")
    assert down <= TOLERANCE and up <= TOLERANCE
