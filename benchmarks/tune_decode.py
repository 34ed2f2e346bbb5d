"""Sweep the split-K flash-decoding kernel's tile sizes and split count against SDPA.

    python benchmarks/tune_decode.py

Prints, per shape, each configuration's time and its ratio to SDPA (flash backend) on the
same inputs; the best rows feed the defaults table in tidal_compile/ops/kernels.py.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from tidal_compile.ops.kernels import DecodeBlocks, flash_decode

SHAPES = [(1, 32, 8, 32768), (1, 32, 8, 131072), (8, 32, 8, 32768), (1, 32, 32, 32768), (8, 32, 32, 8192)]
CONFIGS = [DecodeBlocks(n, w, s) for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]


def main() -> None:
    for batch, heads, kv_heads, length in SHAPES:
        q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, length, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sdpa = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), rep=30)
        results = []
        for blocks, waves in itertools.product(CONFIGS, (1, 2, 4)):
            try:
                ms = do_bench_cudagraph(lambda: flash_decode(q, k, v, None, 0.088, blocks=blocks, waves=waves), rep=30)
            except Exception as e:  # e.g. out of shared memory
                print(f"  {blocks} waves={waves}: {type(e).__name__}")
                continue
            results.append((ms, blocks, waves))
        results.sort(key=lambda r: r[0])
        print(f"B={batch} H={heads} Hkv={kv_heads} L={length}: sdpa {sdpa:.4f} ms")
        for ms, blocks, waves in results[:5]:
            print(f"   {ms:.4f} ms  x{ms / sdpa:.2f}  {blocks} waves={waves}")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
