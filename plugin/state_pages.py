"""Which bytes of a page belong to a per-sequence state (a Mamba group's block).

vLLM's hybrid KV cache manager lets a Mamba layer and an attention layer share one KV tensor:
block ``b`` of the tensor holds either an attention block or one Mamba state (its convolution
window and SSM state, then padding up to the page size). A snapshot stores a state block as
the page pair of that block, like any block, but the padding is no part of the state: it holds
whatever the block's previous owner left there (another sequence's KV, possibly another
client's). This module finds the padding's positions in the pages, once per engine, so saves
zero them: the stored state is exactly what the engine keeps, and equal states give equal
pages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["StateMask", "state_mask"]


class StateMask:
    """Boolean masks over a K page and a V page: True where the byte is padding."""

    def __init__(self, k_pad: np.ndarray, v_pad: np.ndarray):
        self.k_pad = k_pad
        self.v_pad = v_pad

    def apply(self, k_page: np.ndarray, v_page: np.ndarray) -> None:
        """Zero the padding of one block's two pages (flat byte arrays), in place."""
        k_page[self.k_pad] = 0
        v_page[self.v_pad] = 0


def _byte_offsets(block: np.ndarray, base: int) -> np.ndarray:
    """The address of every byte of a (strided) view, relative to ``base``, in the view's
    C order: the order in which the view's bytes land in a page."""
    start = block.__array_interface__["data"][0] - base
    offsets = np.full(block.shape, start, dtype=np.int64)
    for axis, (n, stride) in enumerate(zip(block.shape, block.strides)):
        shape = [1] * block.ndim
        shape[axis] = n
        offsets = offsets + (np.arange(n, dtype=np.int64) * stride).reshape(shape)
    return offsets.reshape(-1)


def state_mask(
    layers: Sequence[torch.Tensor],
    k_views: Sequence[np.ndarray],
    v_views: Sequence[np.ndarray],
    states: Sequence[torch.Tensor],
) -> StateMask:
    """The padding of a state block in the pages of ``layers`` (the codec's tensors, in page
    order, with their per-layer byte views ``k_views`` / ``v_views`` indexed by block id).

    ``states`` are the group's per-layer state tensors as vLLM registers them: byte views
    ``[num_blocks, ...]`` that share memory with one of ``layers`` each. A tensor that holds
    no state of the group is all padding in a state block.
    """
    by_ptr: dict[int, torch.Tensor] = {}
    for state in states:
        if state.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"a Mamba state view of dtype {state.dtype} (expected int8 bytes)")
        by_ptr[state.data_ptr()] = state
    k_pad: list[np.ndarray] = []
    v_pad: list[np.ndarray] = []
    for layer, k, v in zip(layers, k_views, v_views, strict=True):
        base = layer.data_ptr()
        block_stride = layer.stride(0) * layer.element_size()
        state = by_ptr.pop(base, None)
        if state is None:
            kept = np.empty(0, dtype=np.int64)
        else:
            if state.stride(0) != block_stride:
                raise ValueError(
                    f"a Mamba state's blocks are {state.stride(0)} bytes apart, its tensor's "
                    f"{block_stride}: the state does not sit in the tensor's blocks"
                )
            kept = _byte_offsets(state[0].numpy(), base)
        k_pad.append(~np.isin(_byte_offsets(k[0], base), kept))
        v_pad.append(~np.isin(_byte_offsets(v[0], base), kept))
    if by_ptr:
        raise ValueError("a Mamba state shares no KV tensor the pages hold")
    return StateMask(np.concatenate(k_pad), np.concatenate(v_pad))
