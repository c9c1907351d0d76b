"""Page-copy path on a GPU: our codec's gather (device -> pinned host pages) and scatter (back),
against one plain device<->host copy of the same bytes, measured side by side in one run.

Needs only torch and a CUDA device (vLLM is not required): the KV tensors are allocated in the
exact layouts vLLM 0.32 uses on CUDA, with the bench model's shape (12 layers, 4 KV heads of 64).

    python bench/gpu_page_copy.py [--tokens 1024 4096 16384] [--block-size 16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from processfork.plugin.codec import codec_for  # imports torch only

LAYERS, KV_HEADS, HEAD_DIM = 12, 4, 64


def _time(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run(tokens: int, block_size: int, dtype: torch.dtype, layout: str, repeat: int) -> dict:
    n = -(-tokens // block_size)
    num_blocks = n * 3  # the sequence's blocks are scattered over a larger pool, as in vLLM
    if layout == "split_last":  # logical [B, H, N, 2D], physical [B, N, H, 2D]
        phys = torch.randn(LAYERS, num_blocks, block_size, KV_HEADS, 2 * HEAD_DIM,
                           device="cuda", dtype=dtype)
        layers = [phys[i].transpose(1, 2) for i in range(LAYERS)]
    else:  # stacked [2, B, N, H, D]
        layers = [torch.randn(2, num_blocks, block_size, KV_HEADS, HEAD_DIM, device="cuda",
                              dtype=dtype) for _ in range(LAYERS)]
    codec = codec_for("FLASH_ATTN", layers, head_dim=HEAD_DIM)
    blocks = torch.randperm(num_blocks)[:n].tolist()
    staging = codec.new_staging(n)
    nbytes = staging.numel() * staging.element_size()

    gather = _time(lambda: codec.gather(blocks, staging), repeat)
    scatter = _time(lambda: codec.scatter(blocks, staging), repeat)
    # Round trip check: scatter what we gathered into other blocks and compare.
    other = [(b + 1) % num_blocks for b in blocks]
    codec.scatter(other, staging)
    check = codec.new_staging(n)
    codec.gather(other, check)
    assert torch.equal(check, staging), "gather/scatter round trip differs"

    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h = _time(lambda: host.copy_(dev, non_blocking=True), repeat)
    h2d = _time(lambda: dev.copy_(host, non_blocking=True), repeat)
    return {
        "layout": layout, "tokens": tokens, "blocks": n, "bytes": nbytes,
        "gather_s": gather, "scatter_s": scatter, "d2h_s": d2h, "h2d_s": h2d,
        "gather_vs_memcpy": d2h / gather, "scatter_vs_memcpy": h2d / scatter,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"block {args.block_size}  {args.dtype}")
    print(f"{'layout':<11}{'tokens':>7}{'MiB':>8}{'gather ms':>11}{'D2H ms':>9}{'ratio':>7}"
          f"{'scatter ms':>12}{'H2D ms':>9}{'ratio':>7}{'GB/s gather':>13}{'GB/s scatter':>14}")
    rows = []
    for layout in ("split_last", "stacked"):
        for tokens in args.tokens:
            r = run(tokens, args.block_size, dtype, layout, args.repeat)
            rows.append(r)
            print(f"{layout:<11}{tokens:>7}{r['bytes'] / 2**20:>8.1f}{r['gather_s'] * 1e3:>11.3f}"
                  f"{r['d2h_s'] * 1e3:>9.3f}{r['gather_vs_memcpy']:>7.2f}"
                  f"{r['scatter_s'] * 1e3:>12.3f}{r['h2d_s'] * 1e3:>9.3f}"
                  f"{r['scatter_vs_memcpy']:>7.2f}{r['bytes'] / r['gather_s'] / 1e9:>13.1f}"
                  f"{r['bytes'] / r['scatter_s'] / 1e9:>14.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
