"""Page codecs on synthetic KV tensors of every supported layout (CPU always, CUDA when present).

The CPU layout is also exercised live by the integration tests; the GPU layouts are checked here
with tensors shaped and strided exactly as vLLM allocates them.
"""

from __future__ import annotations

import pytest
import torch
from processfork.plugin.codec import (
    CpuAttnCodec,
    SplitLastDimCodec,
    StackedKVCodec,
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
@pytest.mark.parametrize("make", ["cpu", "split", "stacked"])
def test_gather_then_scatter_restores_exactly_those_blocks(device, make):
    if make == "cpu":
        _, src = _cpu_layers(device)
        backend, dst = "CPU_ATTN", [torch.zeros_like(t) for t in src]
    elif make == "split":
        phys, src = _split_layers(device)
        dst_phys = torch.zeros_like(phys)
        backend, dst = "FLASH_ATTN", [dst_phys[i].transpose(1, 2) for i in range(L)]
    else:
        src = _stacked_layers(device)
        backend, dst = "FLASH_ATTN", [torch.zeros_like(t) for t in src]
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
