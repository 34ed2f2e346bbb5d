"""The dense flash-decoding kernel with a decode mask: the loop over the whole cache (K/V loads
predicated on the mask) against the loop bounded by each sequence's valid length
(`flash_decode(..., bound_loop=True)`), beside the same kernel without a mask and PyTorch SDPA.

    python benchmarks/dense_mask.py

Per shape (head dim 128, bf16) and fill (the share of the cache holding valid positions, a
static cache's valid prefix): SDPA on exactly the valid prefix (no mask: the ideal reads),
tidal with no mask on the valid prefix, tidal as the ops run it (the default rule), the loop
unbounded, the loop bounded with the mask summary given (the valid prefix, one run, then read
without the mask), and bounded including the summary. CUDA-graph replays, median; ratios to SDPA.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from tidal_compile.ops import kernels

SHAPES = [(1, 32, 8, 32768), (8, 32, 8, 32768), (1, 32, 32, 32768), (8, 32, 32, 32768), (1, 32, 32, 131072),
          (8, 32, 8, 131072)]


def bench(fn) -> float:
    return do_bench_cudagraph(fn, rep=50)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dense_mask.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    scale = 128 ** -0.5
    for batch, heads, kv_heads, length in SHAPES:
        q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, length, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for fill in (1.0, 0.5):
            valid = int(length * fill)
            mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device="cuda")
            mask[..., :valid] = True
            kv, vv = k[:, :, :valid], v[:, :, :valid]
            summary = kernels.summarize_mask(mask, batch, length, q.device)
            sdpa = bench(lambda: F.scaled_dot_product_attention(q, kv, vv, scale=scale, enable_gqa=True))
            rows = {
                "tidal, no mask": bench(lambda: kernels.flash_decode(q, kv, vv, None, scale)),
                "tidal as the ops run it": bench(lambda: kernels.flash_decode(q, k, v, mask, scale)),
                "tidal unbounded": bench(lambda: kernels.flash_decode(q, k, v, mask, scale, bound_loop=False)),
                "tidal bounded": bench(lambda: kernels.flash_decode(q, k, v, mask, scale, bound_loop=True,
                                                                    summary=summary)),
                "tidal bounded + summary": bench(lambda: kernels.flash_decode(q, k, v, mask, scale, bound_loop=True)),
            }
            print(f"B={batch} H={heads} Hkv={kv_heads} L={length} fill={fill}: sdpa {sdpa:.4f} ms", flush=True)
            for name, ms in rows.items():
                print(f"   {name:24s} {ms:.4f} ms  x{ms / sdpa:.2f}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
