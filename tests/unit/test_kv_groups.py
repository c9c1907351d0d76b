"""Reading vLLM's KV-cache groups: which kinds the connector handles, which it refuses, and what
the fingerprint records for each."""

from __future__ import annotations

import pytest
import torch
from processfork.plugin.kv_groups import (
    FULL_ATTENTION,
    MAMBA,
    SLIDING_WINDOW,
    GroupLayout,
    UnsupportedGroups,
    group_job,
)
from processfork.store.manifest import PageGroup
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

ATTN = {"block_size": 32, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32}


def _config(*groups: tuple[list[int], object]) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in layers], spec)
        for layers, spec in groups
    ])


def test_one_full_attention_group_is_the_plain_layout():
    layout = GroupLayout.from_kv_cache_config(_config(([0, 1], FullAttentionSpec(**ATTN))))
    assert layout.plain and layout.to_fingerprint() is None
    assert GroupLayout.from_kv_cache_config(None).plain


def test_sliding_window_and_full_attention_groups_in_vllms_order():
    layout = GroupLayout.from_kv_cache_config(_config(
        ([0, 2], SlidingWindowSpec(**ATTN, sliding_window=64)),
        ([1, 3], FullAttentionSpec(**ATTN)),
    ))
    assert not layout.plain
    assert [(g.kind, g.layers, g.window) for g in layout.groups] == [
        (SLIDING_WINDOW, (0, 2), 64), (FULL_ATTENTION, (1, 3), None)]
    assert GroupLayout.from_fingerprint(layout.to_fingerprint()) == layout
    # A model whose every layer slides (Mistral-style) is one group, but not the plain layout.
    only = GroupLayout.from_kv_cache_config(
        _config(([0, 1], SlidingWindowSpec(**ATTN, sliding_window=64))))
    assert not only.plain and only.to_fingerprint() == [
        {"kind": SLIDING_WINDOW, "layers": [0, 1], "window": 64}]


def _mamba(**kwargs: object) -> MambaSpec:
    return MambaSpec(block_size=32, shapes=((3, 576), (8, 64, 32)),
                     dtypes=(torch.bfloat16, torch.float32), **kwargs)


def test_a_mamba_group_records_its_state_layout():
    layout = GroupLayout.from_kv_cache_config(_config(
        ([0, 2], _mamba(mamba_cache_mode="align")), ([1, 3], FullAttentionSpec(**ATTN))))
    assert layout.has_state and not layout.plain
    state = layout.groups[0]
    assert (state.kind, state.layers, state.is_state) == (MAMBA, (0, 2), True)
    assert state.state_bytes() == 3 * 576 * 2 + 8 * 64 * 32 * 4
    assert layout.to_fingerprint()[0] == {"kind": "mamba", "layers": [0, 2], "state": [
        {"dtype": "bfloat16", "shape": [3, 576]}, {"dtype": "float32", "shape": [8, 64, 32]}]}
    assert GroupLayout.from_fingerprint(layout.to_fingerprint()) == layout


def test_a_mamba_group_without_prefix_caching_is_refused_naming_it():
    # Without prefix caching vLLM keeps one running state per request: no state at a block
    # boundary to snapshot or to load.
    with pytest.raises(UnsupportedGroups, match=r"Mamba KV-cache group 0 \(layers \[0, 2\]\).*'align'"):
        GroupLayout.from_kv_cache_config(_config(([0, 2], _mamba()), ([1, 3], FullAttentionSpec(**ATTN))))


def test_a_state_group_stores_the_state_at_the_split_point():
    layout = GroupLayout.from_fingerprint([
        {"kind": "mamba", "layers": [0], "state": [{"dtype": "float32", "shape": [4]}]},
        {"kind": "full_attention", "layers": [1]},
    ])
    # 300 tokens, blocks of 32: a checkout resumes at 288 tokens, the state in block 8.
    assert layout.stored_ranges(300, 32) == [(8, 9), (0, 10)]
    # Block-aligned: the split is one block earlier.
    assert layout.stored_ranges(320, 32) == [(8, 9), (0, 10)]
    # Within the first block: nothing to resume from, no state.
    assert layout.stored_ranges(20, 32) == [(0, 0), (0, 1)]
    state = layout.groups[0]
    assert state.stores_split(8, 1, 288, 32)
    assert not state.stores_split(8, 1, 256, 32)  # only the state at 288 is stored
    assert not state.stores_split(0, 0, 0, 32)


def test_a_stored_prefix_resumes_where_its_state_is():
    layout = GroupLayout.from_fingerprint([
        {"kind": "mamba", "layers": [0], "state": [{"dtype": "float32", "shape": [4]}]},
        {"kind": "full_attention", "layers": [1]},
    ])
    stored = [PageGroup(8, 1, True), PageGroup(0, 10)]
    assert layout.resume_blocks(stored, 9, 32) == 9  # the state at 288: where it resumes
    # A request that shares all 10 blocks (a session turn ending on a block boundary stores
    # the state a block before its end) resumes at the state's split point.
    assert layout.resume_blocks(stored, 10, 32) == 9
    # One that shares fewer blocks than the state's split finds no state there.
    assert layout.resume_blocks(stored, 5, 32) == 0
    # A turn whose state was never held stores none: nothing to resume from.
    assert layout.resume_blocks([PageGroup(9, 0, True), PageGroup(0, 10)], 10, 32) == 0


def test_group_jobs_keep_the_snapshot_job_for_group_zero():
    assert group_job("ab" * 16, 0) == "ab" * 16
    assert group_job("ab" * 16, 1) == "ab" * 16 + ".g1"
