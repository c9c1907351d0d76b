"""Which bytes of a page belong to a per-sequence state (a Mamba group's block).

vLLM's hybrid KV cache manager lets a Mamba layer and an attention layer share one KV tensor:
block ``b`` of the tensor holds either an attention block or one Mamba state (its convolution
window and SSM state, then padding up to the page size). A snapshot stores a state block as
the page pair of that block, like any block, but the padding is no part of the state: it holds
whatever the block's previous owner left there (another sequence's KV, possibly another
client's). This module finds the padding's positions in the pages, once per engine, so saves
zero them: the stored state is exactly what the engine keeps, and equal states give equal
pages, whichever page path (direct or staged) copied them out of the blocks.

The positions are worked out from the tensors' addresses, shapes and strides alone, never from
their contents, so the same code serves CPU tensors and tensors on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["StateMask", "state_layer_tensors", "state_mask"]

#: What vLLM registers for one Mamba layer: one byte view of its blocks (vLLM 0.27 and later), or
#: one view per state tensor (convolution window, SSM state) in their own dtypes (vLLM 0.26).
StateViews = torch.Tensor | Sequence[torch.Tensor]


class StateMask:
    """Boolean masks over a K page and a V page: True where the byte is padding."""

    def __init__(self, k_pad: np.ndarray, v_pad: np.ndarray):
        self.k_pad = k_pad
        self.v_pad = v_pad

    def apply(self, k_page: np.ndarray, v_page: np.ndarray) -> None:
        """Zero the padding of one block's two pages (flat byte arrays), in place."""
        k_page[self.k_pad] = 0
        v_page[self.v_pad] = 0


def state_layer_tensors(views: StateViews) -> list[torch.Tensor]:
    """The tensors vLLM registered for one Mamba layer, as a list."""
    return [views] if isinstance(views, torch.Tensor) else list(views)


def _byte_offsets(view: np.ndarray | torch.Tensor, base: int) -> np.ndarray:
    """The address of every byte of a (strided) view, relative to ``base``, in the view's
    C order, the bytes of each element in a row: the order in which its bytes land in a page
    (a gather copies the view's elements in C order, each element's bytes as they are)."""
    if isinstance(view, torch.Tensor):
        start, itemsize = view.data_ptr(), view.element_size()
        shape, strides = tuple(view.shape), tuple(s * itemsize for s in view.stride())
    else:
        start, itemsize = view.__array_interface__["data"][0], view.itemsize
        shape, strides = view.shape, view.strides
    offsets = np.full(shape, start - base, dtype=np.int64)
    for axis, (n, stride) in enumerate(zip(shape, strides)):
        axes = [1] * len(shape)
        axes[axis] = n
        offsets = offsets + (np.arange(n, dtype=np.int64) * stride).reshape(axes)
    offsets = offsets.reshape(-1, 1) + np.arange(itemsize, dtype=np.int64)
    return offsets.reshape(-1)


def state_mask(
    layers: Sequence[torch.Tensor],
    k_views: Sequence[np.ndarray | torch.Tensor],
    v_views: Sequence[np.ndarray | torch.Tensor],
    states: Sequence[StateViews],
) -> StateMask:
    """The padding of a state block in the pages of ``layers`` (the codec's tensors, in page
    order, with their per-layer K and V views ``k_views`` / ``v_views`` indexed by block id:
    the codec's tensors or byte views of them).

    ``states`` holds, per Mamba layer of the group, the views vLLM registers for it (see
    ``StateViews``), indexed by block id first; they share memory with one of ``layers`` each,
    and start where its blocks do. A tensor that holds no state of the group is all padding in
    a state block. A state byte that neither page holds is refused: the pages would not hold
    the whole state.
    """
    by_ptr: dict[int, list[torch.Tensor]] = {}
    for views in states:
        tensors = state_layer_tensors(views)
        if not tensors:
            raise ValueError("a Mamba layer registers no state tensor")
        by_ptr[min(t.data_ptr() for t in tensors)] = tensors
    k_pad: list[np.ndarray] = []
    v_pad: list[np.ndarray] = []
    for layer, k, v in zip(layers, k_views, v_views, strict=True):
        base = layer.data_ptr()
        block_stride = layer.stride(0) * layer.element_size()
        tensors = by_ptr.pop(base, None)
        kept = np.empty(0, dtype=np.int64)
        if tensors is not None:
            for state in tensors:
                if state.stride(0) * state.element_size() != block_stride:
                    raise ValueError(
                        f"a Mamba state's blocks are {state.stride(0) * state.element_size()} "
                        f"bytes apart, its tensor's {block_stride}: the state does not sit in "
                        "the tensor's blocks"
                    )
            kept = np.concatenate([_byte_offsets(state[0], base) for state in tensors])
        k_bytes, v_bytes = _byte_offsets(k[0], base), _byte_offsets(v[0], base)
        if not np.isin(kept, np.concatenate([k_bytes, v_bytes])).all():
            raise ValueError(
                "a Mamba state has bytes outside the K and V of its tensor's block: a page "
                "would not hold the whole state"
            )
        k_pad.append(~np.isin(k_bytes, kept))
        v_pad.append(~np.isin(v_bytes, kept))
    if by_ptr:
        raise ValueError("a Mamba state shares no KV tensor the pages hold")
    return StateMask(np.concatenate(k_pad), np.concatenate(v_pad))
