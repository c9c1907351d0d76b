"""Pages of one KV head (format v4): the rearrangement between a codec's staged whole-block
pages and per-head pages (which heads a rank holds: ``tp_ranks``).

A rank of an engine at TP size M holds only some KV heads of every block, so no rank can write
or read a whole-block page; pages of one head each are what every TP size shares
(docs/format.md#pages-of-one-kv-head). The rearrangement is a pure permutation of staged bytes:
joining the pages of every head gives back, byte for byte, the whole-block pages of the same
tensors, so the codecs and their staging stay as they are.
"""

from __future__ import annotations

import torch

from .codec import PageCodec

__all__ = ["join_heads", "rank_share", "split_heads"]


def _per_head(codec: PageCodec, staged: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """``[..., layers, elems]`` as ``[..., layers, heads, elems of one head]`` (a copy when the
    layout's head axis is not the outer one). ``heads``: the pages hold that many heads, not the
    codec's own (whole-block pages of every head of the model)."""
    g = codec.geometry
    heads = g.num_kv_heads if heads is None else heads
    lead = staged.shape[:-1]
    if codec.head_axis == 0:
        return staged.reshape(*lead, heads, -1)
    if codec.head_axis == 1:  # one block is [tokens, heads, head_dim]
        x = staged.reshape(*lead, g.block_size, heads, g.head_dim)
        return x.transpose(-3, -2).reshape(*lead, heads, -1)
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


def rank_share(codec: PageCodec, whole: torch.Tensor, total: int, first: int) -> torch.Tensor:
    """Whole-block pages of all ``total`` KV heads of the model ``[n, 2, layers, elems of every
    head]`` (a TP-1 engine's, format v3) as the staged pages of this rank's heads ``first ..
    first + count - 1``, ready for the codec's scatter: the same permutation as a v4 load, after
    taking the rank's rows of each page."""
    count = codec.geometry.num_kv_heads
    if not 0 <= first <= total - count:
        raise ValueError(f"heads {first}..{first + count - 1} are not among {total}")
    rows = _per_head(codec, whole, total)[..., first : first + count, :]
    return join_heads(codec, rows.permute(0, 3, 1, 2, 4))
