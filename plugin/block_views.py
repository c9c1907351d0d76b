"""Numpy views of the paged KV cache by block id, for copying whole pages on the CPU.

The CPU backend's KV tensors can be read and written in place: a save gathers a block's K and
V pages straight out of them (``worker_side``), and a checkout copies pages from the store's
memory map straight into them (``loader``), with no staging tensor in between. Both go through
these views.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BlockViews"]


class BlockViews:
    """Numpy views of every layer's K and V, indexed by block id, for direct page copies.

    A page holds one block's K (or V) of every layer, layer after layer, each in the order of
    the codec's per-block view. When all layers are views into one buffer at a constant
    distance (vLLM's CPU backend allocates them so), one strided view spans every layer and a
    whole page moves in one copy.
    """

    def __init__(self, k_views: Sequence[torch.Tensor], v_views: Sequence[torch.Tensor]):
        # Byte views: dtype-agnostic (numpy has no bfloat16); the innermost axis is contiguous.
        self.k = [t.view(torch.uint8).numpy() for t in k_views]
        self.v = [t.view(torch.uint8).numpy() for t in v_views]
        self.num_layers = len(self.k)
        self.k_shape = (self.num_layers, *self.k[0].shape[1:])
        self.v_shape = (self.num_layers, *self.v[0].shape[1:])
        self.k_all = _all_layers(self.k)
        self.v_all = _all_layers(self.v)

    def gather(self, block_id: int, k_out: np.ndarray, v_out: np.ndarray) -> None:
        """Copy one block's K and V pages into two flat byte buffers."""
        k_page, v_page = k_out.reshape(self.k_shape), v_out.reshape(self.v_shape)
        if self.k_all is not None and self.v_all is not None:
            np.copyto(k_page, self.k_all[:, block_id])
            np.copyto(v_page, self.v_all[:, block_id])
            return
        for layer in range(self.num_layers):
            np.copyto(k_page[layer], self.k[layer][block_id])
            np.copyto(v_page[layer], self.v[layer][block_id])

    def k_page(self, buf: memoryview) -> np.ndarray:
        return np.frombuffer(buf, dtype=np.uint8).reshape(self.k_shape)

    def v_page(self, buf: memoryview) -> np.ndarray:
        return np.frombuffer(buf, dtype=np.uint8).reshape(self.v_shape)


def _all_layers(layers: list[np.ndarray]) -> np.ndarray | None:
    """One view ``[layer, block, ...]`` over per-layer views spaced evenly in one buffer."""
    if len(layers) < 2:
        return layers[0][None] if layers else None
    first = layers[0]
    addr = [a.__array_interface__["data"][0] for a in layers]
    step = addr[1] - addr[0]
    if step <= 0 or any(b - a != step for a, b in itertools.pairwise(addr)):
        return None
    if any(a.shape != first.shape or a.strides != first.strides for a in layers):
        return None
    return np.lib.stride_tricks.as_strided(
        first, shape=(len(layers), *first.shape), strides=(step, *first.strides), writeable=True
    )
