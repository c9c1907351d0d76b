"""Pages of one KV head (format v4): which heads a tensor-parallel rank holds, and the
rearrangement between a codec's staged whole-block pages and per-head pages.

A rank of an engine at TP size M holds only some KV heads of every block, so no rank can write
or read a whole-block page; pages of one head each are what every TP size shares
(docs/format.md#pages-of-one-kv-head). The rearrangement is a pure permutation of staged bytes:
joining the pages of every head gives back, byte for byte, the whole-block pages of the same
tensors, so the codecs and their staging stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import PageCodec

__all__ = ["RankHeads", "join_heads", "split_heads"]


@dataclass(frozen=True)
class RankHeads:
    """The model's KV heads that rank ``rank`` of ``tp_size`` holds, as vLLM shards them: a
    contiguous share of ``total // tp_size`` heads, or, past one rank per head, a replica of
    head ``rank // (tp_size // total)``."""

    total: int
    tp_size: int
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank {self.rank} is not one of {self.tp_size} ranks")
        if self.total % self.tp_size and self.tp_size % self.total:
            raise ValueError(f"{self.total} KV heads do not split evenly over "
                             f"{self.tp_size} ranks")

    @property
    def replicas(self) -> int:
        """Ranks that hold each head: 1 unless heads are replicated."""
        return max(1, self.tp_size // self.total)

    @property
    def first(self) -> int:
        if self.replicas > 1:
            return self.rank // self.replicas
        return self.rank * (self.total // self.tp_size)

    @property
    def count(self) -> int:
        return 1 if self.replicas > 1 else self.total // self.tp_size

    @property
    def writes(self) -> bool:
        """Whether this rank saves its heads: replicas compute the same bytes, so the first
        replica of each head saves it and the others only load."""
        return self.rank % self.replicas == 0

    def entries(self, block: int) -> range:
        """This rank's entries of a v4 page table among the ``block``-th stored block's."""
        start = block * self.total + self.first
        return range(start, start + self.count)


def _per_head(codec: PageCodec, staged: torch.Tensor) -> torch.Tensor:
    """``[..., layers, elems]`` as ``[..., layers, heads, elems of one head]`` (a copy when the
    layout's head axis is not the outer one)."""
    g = codec.geometry
    lead = staged.shape[:-1]
    if codec.head_axis == 0:
        return staged.reshape(*lead, g.num_kv_heads, -1)
    if codec.head_axis == 1:  # one block is [tokens, heads, head_dim]
        x = staged.reshape(*lead, g.block_size, g.num_kv_heads, g.head_dim)
        return x.transpose(-3, -2).reshape(*lead, g.num_kv_heads, -1)
    raise ValueError(f"no per-head pages for head axis {codec.head_axis} ({codec.layout})")


def split_heads(codec: PageCodec, staged: torch.Tensor) -> torch.Tensor:
    """Staged whole-block pages ``[n, 2, layers, elems]`` as per-head pages ``[n, heads, 2,
    layers, elems of one head]``, contiguous: row ``[i, h, 0]`` is the K page of this rank's
    ``h``-th head of block ``i``, ``[i, h, 1]`` its V page, in the order a v4 page table
    lists them."""
    return _per_head(codec, staged).permute(0, 3, 1, 2, 4).contiguous()


def join_heads(codec: PageCodec, heads: torch.Tensor) -> torch.Tensor:
    """The inverse of ``split_heads``: per-head pages back into staged whole-block pages
    ``[n, 2, layers, elems]``, ready for the codec's scatter."""
    g = codec.geometry
    n = heads.shape[0]
    x = heads.permute(0, 2, 3, 1, 4)  # [n, 2, layers, heads, elems of one head]
    if codec.head_axis == 1:
        x = x.reshape(n, 2, g.num_layers, g.num_kv_heads, g.block_size, g.head_dim)
        x = x.transpose(-3, -2)
    elif codec.head_axis != 0:
        raise ValueError(f"no per-head pages for head axis {codec.head_axis} ({codec.layout})")
    return x.reshape(n, 2, g.num_layers, g.elems_per_layer).contiguous()
