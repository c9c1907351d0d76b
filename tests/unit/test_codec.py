"""Page codecs on synthetic KV tensors of every supported layout (CPU always, CUDA when present).

The CPU layout is also exercised live by the integration tests; the GPU layouts are checked here
with tensors shaped and strided exactly as vLLM allocates them.
"""

from __future__ import annotations

import pytest
import torch
from processfork.plugin.codec import (
    BlockMajorKVCodec,
    CpuAttnCodec,
    SplitLastDimCodec,
    StackedKVCodec,
    blocks_axis_of,
    codec_for,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
L, B, H, N, D = 3, 12, 2, 32, 64


def _cpu_layers(device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list]:
    buf = torch.randn(L, B, H, N, 2 * D, device=device).to(dtype)
    return buf, [buf[i] for i in range(L)]


def _split_layers(device: str) -> tuple[torch.Tensor, list]:
    """vLLM 0.32 FlashAttention: logical [B, H, N, 2D], physically [B, N, H, 2D] (LBNHC)."""
    phys = torch.randn(L, B, N, H, 2 * D, device=device, dtype=torch.bfloat16)
    return phys, [phys[i].transpose(1, 2) for i in range(L)]


def _stacked_layers(device: str) -> list[torch.Tensor]:
    return [torch.randn(2, B, N, H, D, device=device, dtype=torch.float16) for _ in range(L)]


def _block_major_layers(device: str) -> list[torch.Tensor]:
    """Triton / FlashInfer: logical [B, 2, N, H, D]; FlashInfer's HND order is [B, 2, H, N, D]."""
    phys = torch.randn(L, B, 2, H, N, D, device=device, dtype=torch.bfloat16)
    return [phys[i].transpose(2, 3) for i in range(L)]


class _Backend:
    """Stands for a vLLM attention backend class: only its declared KV-cache shape matters."""

    def __init__(self, order: str):
        self.order = order

    def get_kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_size, *_):
        if self.order == "B2NHD":
            return (num_blocks, 2, block_size, num_kv_heads, head_size)
        if self.order == "2BNHD":
            return (2, num_blocks, block_size, num_kv_heads, head_size)
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_attn_pages_are_the_k_and_v_halves(device):
    buf, layers = _cpu_layers(device)
    codec = codec_for("CPU_ATTN", layers, head_dim=D, isa="vec")
    assert isinstance(codec, CpuAttnCodec)
    assert codec.page_bytes == L * H * N * D * 4
    staging = codec.gather([5, 2], codec.new_staging(2))
    row = buf[1, 2].reshape(H, 2 * N * D).cpu()  # layer 1, block 2: per head K then V
    assert torch.equal(staging[1, 0, 1].view(H, N * D), row[:, : N * D])
    assert torch.equal(staging[1, 1, 1].view(H, N * D), row[:, N * D :])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", ["cpu", "split", "stacked", "block_major"])
def test_gather_then_scatter_restores_exactly_those_blocks(device, make):
    if make == "cpu":
        _, src = _cpu_layers(device)
        backend, dst = "CPU_ATTN", [torch.zeros_like(t) for t in src]
    elif make == "split":
        phys, src = _split_layers(device)
        dst_phys = torch.zeros_like(phys)
        backend, dst = "FLASH_ATTN", [dst_phys[i].transpose(1, 2) for i in range(L)]
    elif make == "stacked":
        src = _stacked_layers(device)
        backend, dst = "FLASH_ATTN", [torch.zeros_like(t) for t in src]
    else:
        src = _block_major_layers(device)
        backend, dst = "TRITON_ATTN", [torch.zeros_like(t) for t in src]
    blocks = [7, 1, 10]
    codec = codec_for(backend, src, head_dim=D, isa="vec")
    staging = codec.gather(blocks, codec.new_staging(len(blocks)))
    target = [3, 4, 11]  # restore into other block ids, as a checkout does
    codec_for(backend, dst, head_dim=D, isa="vec").scatter(target, staging)
    block_dim = 1 if make == "stacked" else 0
    for layer_src, layer_dst in zip(src, dst):
        for b_src, b_dst in zip(blocks, target):
            assert torch.equal(layer_src.select(block_dim, b_src), layer_dst.select(block_dim, b_dst))
        untouched = [b for b in range(B) if b not in target]
        assert layer_dst.index_select(block_dim, torch.tensor(untouched, device=device)).abs().sum() == 0


def test_codec_for_picks_the_layout_from_backend_and_shape():
    _, cpu = _cpu_layers("cpu")
    _, split = _split_layers("cpu")
    assert isinstance(codec_for("CPU_ATTN", cpu, head_dim=D, isa="vec"), CpuAttnCodec)
    assert isinstance(codec_for("FLASH_ATTN", split, head_dim=D), SplitLastDimCodec)
    assert isinstance(codec_for("FLASH_ATTN", _stacked_layers("cpu"), head_dim=D), StackedKVCodec)
    assert isinstance(codec_for("FLASHINFER", _block_major_layers("cpu"), head_dim=D),
                      BlockMajorKVCodec)
    with pytest.raises(ValueError, match="head_dim"):
        codec_for("FLASH_ATTN", split, head_dim=32)


@pytest.mark.parametrize("valid", [1, 13, 31])
def test_mask_tail_zeroes_only_slots_past_the_sequence(valid):
    buf, layers = _cpu_layers("cpu")
    codec = codec_for("CPU_ATTN", layers, head_dim=D, isa="vec")
    staging = codec.gather([4], codec.new_staging(1))
    codec.mask_tail(staging[0], valid)
    k = staging[0, 0].view(L, H, D, N)  # vec ISA: K transposed, token axis last
    v = staging[0, 1].view(L, H, N, D)
    assert k[..., valid:].abs().sum() == 0 and v[:, :, valid:].abs().sum() == 0
    src = buf[:, 4].reshape(L, H, 2, N * D)
    assert torch.equal(k[..., :valid], src[:, :, 0].reshape(L, H, D, N)[..., :valid])
    assert torch.equal(v[:, :, :valid], src[:, :, 1].reshape(L, H, N, D)[:, :, :valid])


def test_mask_tail_leaves_unknown_isa_pages_alone():
    _, layers = _cpu_layers("cpu")
    codec = codec_for("CPU_ATTN", layers, head_dim=D, isa="amx")
    staging = codec.gather([4], codec.new_staging(1))
    before = staging.clone()
    codec.mask_tail(staging[0], 5)
    assert torch.equal(staging, before)


def test_block_major_pages_hold_tokens_heads_dims_of_one_block():
    layers = _block_major_layers("cpu")
    codec = codec_for("TRITON_ATTN", layers, head_dim=D)
    staging = codec.gather([9], codec.new_staging(1))
    assert torch.equal(staging[0, 0, 2].view(N, H, D), layers[2][9, 0])
    assert torch.equal(staging[0, 1, 2].view(N, H, D), layers[2][9, 1])
    # the same page bytes as the stacked layout, so the two read each other's snapshots' pages
    stacked = [t.transpose(0, 1) for t in layers]  # [2, B, N, H, D] views of the same data
    other = codec_for("FLASH_ATTN", stacked, head_dim=D, blocks_axis=1)
    assert isinstance(other, StackedKVCodec)
    assert torch.equal(other.gather([9], other.new_staging(1)), staging)


@pytest.mark.parametrize("order,axis", [("B2NHD", 0), ("2BNHD", 1), ("BHN2D", 0)])
def test_the_block_axis_comes_from_the_backends_declared_shape(order, axis):
    assert blocks_axis_of(_Backend(order), N, H, D) == axis
    assert blocks_axis_of(object(), N, H, D) is None


def test_a_cache_of_two_blocks_is_read_by_the_declared_axis_not_guessed():
    # [2, 2, N, H, D]: the shape alone cannot say which axis holds the blocks
    layers = [torch.randn(2, 2, N, H, D) for _ in range(L)]
    assert isinstance(codec_for("TRITON_ATTN", layers, head_dim=D, blocks_axis=0),
                      BlockMajorKVCodec)
    assert isinstance(codec_for("FLASH_ATTN", layers, head_dim=D, blocks_axis=1), StackedKVCodec)
    with pytest.raises(ValueError, match="unsupported"):
        codec_for("X", [torch.randn(3, 3, N, H, D)], head_dim=D)
