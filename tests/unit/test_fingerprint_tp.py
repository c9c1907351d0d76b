"""What the fingerprint says about tensor parallelism: the model's KV heads at every TP size, and
which fields a snapshot of pages of one KV head must share with the engine that loads it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

from processfork.plugin.engine_info import model_kv_heads
from processfork.plugin.fingerprint import (
    FINGERPRINT_FIELDS,
    HEAD_PAGE_FIELDS,
    Fingerprint,
    Mismatch,
    loads_at_any_tp,
)
from processfork.store import Manifest, SnapshotSequence, Store
from processfork.store.manifest import FORMAT, FORMAT_GROUPED, FORMAT_HEADS
from test_cli_support import pf

TP1 = Fingerprint(
    backend="CPU_ATTN", batch_invariant=False, block_size=16, device="cpu", head_dim=64,
    isa="vec", kv_dtype="float32", layout="cpu_attn/BHN2D", model="tiny", model_config_hash="ab" * 8,
    num_kv_heads=4, num_layers=2, threads=2, tp_size=1, vllm_version="0.32.0",
)
TP2 = dataclasses.replace(TP1, tp_size=2, threads=1)


def test_which_snapshots_load_at_another_tp_size():
    """Pages of one head at any TP size; whole-block pages only when a TP-1 engine wrote them
    (each rank takes its heads' rows); whole-block pages of one rank's share never."""
    assert loads_at_any_tp(FORMAT_HEADS, TP2.to_json())
    assert loads_at_any_tp(FORMAT, TP1.to_json()) and loads_at_any_tp(FORMAT_GROUPED, TP1.to_json())
    assert not loads_at_any_tp(FORMAT, TP2.to_json())
    assert not loads_at_any_tp(FORMAT, {})  # no TP size recorded: only an equal one loads
    assert TP2.first_mismatch(TP1.to_json(), any_tp=loads_at_any_tp(FORMAT, TP1.to_json())) \
        is None


def test_pages_of_one_head_load_across_tp_sizes_when_the_bytes_per_head_match():
    assert set(FINGERPRINT_FIELDS) - set(HEAD_PAGE_FIELDS) == {"tp_size", "threads"}
    stored = TP2.to_json()
    # Whole-block pages hold every head: only the TP size that wrote them can read them.
    assert TP1.first_mismatch(stored) == Mismatch("tp_size", 2, 1)
    assert TP1.first_mismatch(stored, any_tp=True) is None
    assert TP2.first_mismatch(TP1.to_json(), any_tp=True) is None
    # The bytes of one head still decide: a layout, a head count or a dtype is compared.
    for name, value in (("num_kv_heads", 8), ("head_dim", 128), ("kv_dtype", "bfloat16"),
                        ("layout", "split_last/BHN2D"), ("vllm_version", "0.31.0")):
        other = {**stored, name: value}
        assert TP1.first_mismatch(other, any_tp=True) == Mismatch(name, value,
                                                                  getattr(TP1, name))


def test_at_the_same_tp_size_the_thread_count_still_decides():
    # Same TP size: the restore is promised bit-identical, so the reduction must be the same.
    stored = {**TP2.to_json(), "threads": 4}
    assert TP2.first_mismatch(stored, any_tp=True) == Mismatch("threads", 4, 1)


def test_the_fingerprint_records_the_models_kv_heads_not_a_ranks_share():
    def config(tp: int, total: int) -> SimpleNamespace:
        return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp),
                               model_config=SimpleNamespace(get_total_num_kv_heads=lambda: total))

    assert model_kv_heads(config(1, 4), 4) == 4
    assert model_kv_heads(config(2, 4), 2) == 4
    assert model_kv_heads(config(8, 4), 1) == 4  # heads replicated over ranks


def test_pf_show_reports_the_tp_size_and_the_page_granularity(tmp_path: Path):
    path = tmp_path / "store"
    with Store(path) as store:
        pages = store.put_pages([bytes([i]) * 64 for i in range(16)]).digests
        pairs = [(pages[i].hex(), pages[i + 1].hex()) for i in range(0, 16, 2)]
        seq = SnapshotSequence(store.put_tokens(list(range(20))), pairs, heads=4)
        store.write_snapshot(Manifest(format=FORMAT_HEADS, name="tp", fingerprint=TP2.to_json(),
                                      sequences=[seq]), ref="tp")
    doc = pf(path, "show", "tp", "--json").json()
    assert doc["fingerprint"]["tp_size"] == 2 and doc["num_blocks"] == 2
    human = pf(path, "show", "tp")
    assert human.exit_code == 0, human.stderr
    assert "one KV head per page, for any TP size" in human.stdout
    assert "2 (tensor-parallel ranks of the engine that computed the pages)" in human.stdout
