"""Reading vLLM's KV-cache groups: which kinds the connector handles, which it refuses, and what
the fingerprint records for each."""

from __future__ import annotations

import pytest
import torch
from processfork.plugin.kv_groups import (
    FULL_ATTENTION,
    SLIDING_WINDOW,
    GroupLayout,
    UnsupportedGroups,
    group_job,
)
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


def test_a_state_group_is_refused_naming_it():
    mamba = MambaSpec(block_size=32, shapes=((4, 16),), dtypes=(torch.float32,))
    with pytest.raises(UnsupportedGroups, match=r"group 0 \(MambaSpec; layers \[0, 2\]\)"):
        GroupLayout.from_kv_cache_config(_config(([0, 2], mamba), ([1, 3], FullAttentionSpec(**ATTN))))


def test_group_jobs_keep_the_snapshot_job_for_group_zero():
    assert group_job("ab" * 16, 0) == "ab" * 16
    assert group_job("ab" * 16, 1) == "ab" * 16 + ".g1"
