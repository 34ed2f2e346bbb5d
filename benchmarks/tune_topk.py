"""Sweep the radix top-k's chunk and block lengths (positions per program / per step).

    python benchmarks/tune_topk.py

Per shape and granularity (k = 2048, logits of one flash-decoding pass over random K), prints
each (chunk, block)'s time, CUDA-graph replays (median); "!" marks a result that differs from
the default's (it never should). The best rows feed `kernels.topk_chunk`.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench_cudagraph

from tidal_compile.ops import kernels

SHAPES = [(1, 32, 8, 32768), (1, 32, 8, 131072), (8, 32, 8, 32768), (1, 32, 32, 32768), (8, 32, 32, 131072)]
CHUNK_BLOCK = [(4096, 1024), (2048, 1024), (1024, 1024), (1024, 512), (2048, 512), (512, 512), (8192, 1024)]
BUDGET = 2048


def main() -> None:
    for batch, heads, kv_heads, length in SHAPES:
        q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, length, 128, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(batch, 1, 1, length, device="cuda", dtype=torch.bool)
        _, lse, logits = kernels.flash_decode(q, k, k, mask, 128 ** -0.5, emit_logits=True)
        summary = kernels.summarize_mask(mask, batch, length, q.device)
        for granularity, sets in (("query_head", heads), ("kv_head", kv_heads)):
            by_prob = granularity != "query_head"
            default = kernels.select_topk(logits, lse, summary, BUDGET, sets, by_prob)
            cells = []
            for chunk, block in CHUNK_BLOCK:
                def topk():
                    return kernels.select_topk(logits, lse, summary, BUDGET, sets, by_prob, chunk=chunk, block=block)

                same = torch.equal(topk(), default)
                cells.append(f"{chunk}/{block}:{do_bench_cudagraph(topk, rep=30) * 1000:.0f}us{'' if same else '!'}")
            print(f"B={batch} H={heads} Hkv={kv_heads} L={length} {granularity}: " + "  ".join(cells), flush=True)
        del q, k, logits
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
