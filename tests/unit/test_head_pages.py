"""Pages of one KV head: which heads each tensor-parallel rank holds, and that the per-head pages
of a rank's share of the heads are byte for byte those of the same heads of a TP-1 engine."""

from __future__ import annotations

import pytest
import torch
from processfork.plugin.codec import CpuAttnCodec, PageGeometry, StackedKVCodec
from processfork.plugin.head_pages import join_heads, rank_share, split_heads
from processfork.plugin.tp_ranks import RankHeads

L, B, H, N, D = 3, 10, 4, 16, 8
BLOCKS = [7, 2, 5]


def _cpu_codec(layers: list[torch.Tensor]) -> CpuAttnCodec:
    b, h, n, c = layers[0].shape
    return CpuAttnCodec(layers, PageGeometry(b, len(layers), h, n, c // 2, layers[0].dtype), "vec")


def _stacked_codec(layers: list[torch.Tensor]) -> StackedKVCodec:
    _, b, n, h, d = layers[0].shape
    return StackedKVCodec(layers, PageGeometry(b, len(layers), h, n, d, layers[0].dtype))


# Per layout: the whole model's layer tensors, a rank's share of heads ``lo:hi`` of them (as
# the rank's own contiguous tensors), and the codec over such tensors.
LAYOUTS = {
    "cpu_attn": (lambda: [torch.randn(B, H, N, 2 * D) for _ in range(L)],
                 lambda t, lo, hi: t[:, lo:hi].contiguous(), _cpu_codec),
    "stacked_kv": (lambda: [torch.randn(2, B, N, H, D, dtype=torch.float16) for _ in range(L)],
                   lambda t, lo, hi: t[:, :, :, lo:hi].contiguous(), _stacked_codec),
}


def test_ranks_hold_vllms_shares_of_the_heads():
    assert [(RankHeads(4, 1, 0).first, RankHeads(4, 1, 0).count)] == [(0, 4)]
    assert [(RankHeads(4, 2, r).first, RankHeads(4, 2, r).count) for r in range(2)] == [(0, 2),
                                                                                      (2, 2)]
    assert list(RankHeads(4, 2, 1).entries(3)) == [14, 15]  # block 3: entries 12..15
    # Eight ranks over four heads: two replicas of each head, the first of which saves it.
    replicated = [RankHeads(4, 8, r) for r in range(8)]
    assert [r.first for r in replicated] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {r.count for r in replicated} == {1}
    assert [r.writes for r in replicated] == [True, False] * 4
    assert list(replicated[5].entries(1)) == [6]
    with pytest.raises(ValueError, match="do not split evenly"):
        RankHeads(6, 4, 0)
    with pytest.raises(ValueError, match="not one of 2 ranks"):
        RankHeads(4, 2, 2)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_per_head_pages_join_back_into_the_whole_block_pages(layout):
    make, _, codec_of = LAYOUTS[layout]
    codec = codec_of(make())
    staged = codec.gather(BLOCKS, codec.new_staging(len(BLOCKS)))
    heads = split_heads(codec, staged)
    assert heads.shape == (len(BLOCKS), H, 2, L, N * D)
    assert torch.equal(join_heads(codec, heads), staged)
    # A head's K page is that head's part of every layer's K view of the block, layer by layer.
    k = codec.k_views[1][BLOCKS[2]]
    one = k[3] if codec.head_axis == 0 else k[:, 3]
    assert torch.equal(heads[2, 3, 0, 1].reshape(one.shape), one)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tp", [2, 4])
def test_a_ranks_head_pages_are_the_tp1_engines_pages_of_the_same_heads(layout, tp):
    make, share, codec_of = LAYOUTS[layout]
    model = make()
    tp1 = codec_of(model)
    whole = split_heads(tp1, tp1.gather(BLOCKS, tp1.new_staging(len(BLOCKS))))
    for rank in range(tp):
        heads = RankHeads(H, tp, rank)
        lo, hi = heads.first, heads.first + heads.count
        codec = codec_of([share(t, lo, hi) for t in model])
        pages = split_heads(codec, codec.gather(BLOCKS, codec.new_staging(len(BLOCKS))))
        assert torch.equal(pages, whole[:, lo:hi])
        # And the TP-1 engine's pages of those heads load into the rank's blocks unchanged.
        target = codec_of([torch.zeros_like(share(t, lo, hi)) for t in model])
        target.scatter([0, 1, 2], join_heads(target, whole[:, lo:hi].contiguous()))
        for got, want in zip(target.layers, codec.layers):
            assert torch.equal(got[[0, 1, 2]] if layout == "cpu_attn" else got[:, [0, 1, 2]],
                               want[BLOCKS] if layout == "cpu_attn" else want[:, BLOCKS])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_a_rank_loads_its_heads_from_the_tp1_engines_whole_block_pages(layout, tp):
    """Whole-block pages of a TP-1 engine (format v3), read whole by every rank: each rank's
    blocks end up holding the TP-1 engine's rows of its own heads (replicas at TP 8)."""
    make, share, codec_of = LAYOUTS[layout]
    model = make()
    tp1 = codec_of(model)
    whole = tp1.gather(BLOCKS, tp1.new_staging(len(BLOCKS)))
    for rank in range(tp):
        heads = RankHeads(H, tp, rank)
        lo, hi = heads.first, heads.first + heads.count
        target = codec_of([torch.zeros_like(share(t, lo, hi)) for t in model])
        target.scatter([0, 1, 2], rank_share(target, whole, H, heads.first))
        for got, want in zip(target.layers, model):
            if layout == "cpu_attn":
                assert torch.equal(got[[0, 1, 2]], want[BLOCKS][:, lo:hi])
            else:
                assert torch.equal(got[:, [0, 1, 2]], want[:, BLOCKS][:, :, :, lo:hi])
    with pytest.raises(ValueError, match="not among"):
        rank_share(codec_of([share(t, 0, 2) for t in model]), whole, H, 3)
