"""Sweep the split-K flash-decoding kernel's split count (and, with --tiles, its tile sizes) against SDPA.

    python benchmarks/tune_decode.py [--tiles]

Prints, per shape, each configuration's time and its ratio to SDPA (flash backend) on the
same inputs, and how many programs the launch ran (B x Hkv x splits) in waves of one program
per SM. Without --tiles the tiles are autotuned (as the ops run them) and only the split count
varies; the best rows feed the defaults in tidal_compile/ops/kernels.py.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from tidal_compile.ops import kernels
from tidal_compile.ops.kernels import DecodeBlocks, flash_decode

SHAPES = [(1, 32, 8, 32768), (1, 32, 8, 131072), (8, 32, 8, 32768), (1, 32, 32, 32768), (1, 32, 32, 131072),
          (8, 32, 32, 8192)]
TILES = [DecodeBlocks(n, w, s) for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]
WAVES = (1, 2, 3, 4, 6, 8)


def waves_run(batch: int, kv_heads: int, length: int, blocks, waves: int) -> float:
    """Programs of the launch over the SM count (one program per SM)."""
    align = blocks.block_n if blocks else kernels.SPLIT_ALIGN
    splits, _ = kernels.split_work(batch * kv_heads, length, align, torch.device("cuda"), waves)
    return batch * kv_heads * splits / kernels._sm_count(torch.device("cuda"))


def sweep_shape(batch: int, heads: int, kv_heads: int, length: int, tiles: list) -> None:
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sdpa = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), rep=30)
    results = []
    for blocks, waves in itertools.product([None] + tiles, WAVES):
        try:
            ms = do_bench_cudagraph(lambda: flash_decode(q, k, v, None, 0.088, blocks=blocks, waves=waves), rep=30)
        except Exception as e:  # e.g. out of shared memory
            print(f"  {blocks} waves={waves}: {type(e).__name__}")
            continue
        results.append((ms, blocks or "autotuned", waves, waves_run(batch, kv_heads, length, blocks, waves)))
    results.sort(key=lambda r: r[0])
    default = 4 if heads == kv_heads else 2
    print(f"B={batch} H={heads} Hkv={kv_heads} L={length}: sdpa {sdpa:.4f} ms (default waves={default})")
    for ms, blocks, waves, run in results[:8]:
        print(f"   {ms:.4f} ms  x{ms / sdpa:.2f}  {blocks} waves={waves} ({run:.2f} waves run)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", action="store_true", help="also sweep fixed tiles (slow)")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    for shape in SHAPES:
        sweep_shape(*shape, TILES if args.tiles else [])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
