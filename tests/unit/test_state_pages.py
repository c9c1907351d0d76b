"""The padding of a Mamba state block in a page pair: what a save zeroes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from processfork.plugin.block_views import BlockViews
from processfork.plugin.state_pages import state_mask

BLOCKS, HEADS, BLOCK, HEAD_DIM = 4, 2, 16, 32


def _layers() -> list[torch.Tensor]:
    """Two CPU-attention-shaped layers, [blocks, heads, block, 2 * head_dim]: K then V per row."""
    return [torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM) for _ in range(2)]


def _views(layers: list[torch.Tensor]) -> BlockViews:
    return BlockViews([t[..., :HEAD_DIM] for t in layers], [t[..., HEAD_DIM:] for t in layers])


def _state_view(layer: torch.Tensor, size: int) -> torch.Tensor:
    """vLLM's byte view of a Mamba layer's state in the blocks of an attention tensor."""
    raw = layer.view(torch.int8).view(BLOCKS, -1)
    return raw[:, :size].view(BLOCKS, 1, 1, size)


def test_the_state_bytes_are_kept_and_the_padding_is_zeroed():
    layers = _layers()
    views = _views(layers)
    page = layers[0][0].numel() * 4  # bytes of one block of one layer
    size = page // 2 + 100  # the state spans K and the start of V of each row
    mask = state_mask(layers, views.k, views.v, [_state_view(t, size) for t in layers])
    for t in layers:
        t.view(torch.int8).view(BLOCKS, -1)[2].copy_(
            torch.randint(-128, 127, (page,), dtype=torch.int8))
    before = [t.view(torch.int8).view(BLOCKS, -1)[2].clone() for t in layers]
    k = np.empty(2 * page // 2, dtype=np.uint8)
    v = np.empty_like(k)
    views.gather(2, k, v)
    mask.apply(k, v)
    for t in layers:  # scatter the masked pages back: the state bytes are what they were
        t.zero_()
    for layer, (kv, vv) in enumerate(zip(views.k, views.v)):
        np.copyto(kv[2], k.reshape(2, *kv.shape[1:])[layer])
        np.copyto(vv[2], v.reshape(2, *vv.shape[1:])[layer])
    for t, old in zip(layers, before):
        now = t.view(torch.int8).view(BLOCKS, -1)[2]
        assert torch.equal(now[:size], old[:size])
        assert not now[size:].any()
    assert int(mask.k_pad.sum() + mask.v_pad.sum()) == 2 * (page - size)


def test_a_tensor_without_a_state_is_all_padding():
    layers = _layers()
    views = _views(layers)
    mask = state_mask(layers, views.k, views.v, [_state_view(layers[0], 64)])
    half = mask.k_pad.size // 2
    assert mask.k_pad[half:].all() and mask.v_pad[half:].all()


def test_a_state_that_does_not_sit_in_the_blocks_is_refused():
    layers = _layers()
    views = _views(layers)
    strided = layers[0].view(torch.int8).view(BLOCKS // 2, -1)[:, :64]
    with pytest.raises(ValueError, match="bytes apart"):
        state_mask(layers, views.k, views.v, [strided])


def test_the_mask_reads_tensors_as_well_as_byte_views():
    """The staged path (and a GPU) hands the codec's tensors, in their own dtype, and some vLLM
    versions register a layer's state as one tensor per state, each in its own dtype: the
    padding found is the same."""
    layers = _layers()
    views = _views(layers)
    size = layers[0][0].numel() * 4 // 2 + 100
    from_bytes = state_mask(layers, views.k, views.v, [_state_view(t, size) for t in layers])
    per_state = [[t.view(BLOCKS, -1)[:, :40], t.view(BLOCKS, -1)[:, 40 : size // 4]]
                 for t in layers]
    from_tensors = state_mask(layers, [t[..., :HEAD_DIM] for t in layers],
                              [t[..., HEAD_DIM:] for t in layers], per_state)
    assert np.array_equal(from_tensors.k_pad, from_bytes.k_pad)
    assert np.array_equal(from_tensors.v_pad, from_bytes.v_pad)


def test_a_state_the_pages_do_not_hold_whole_is_refused():
    """K and V views that leave out part of each block (here the last head's V): a state
    reaching there would be saved in part."""
    layers = _layers()
    k = [t[:, :, :, :HEAD_DIM] for t in layers]
    v = [t[:, : HEADS - 1, :, HEAD_DIM:] for t in layers]
    whole = layers[0][0].numel() * 4
    with pytest.raises(ValueError, match="outside the K and V"):
        state_mask(layers, k, v, [_state_view(layers[0], whole)])
