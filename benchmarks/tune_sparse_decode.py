"""`sparse_decode`'s launch plans (tile, warps, stages, splits) against the default plan, side by
side on the same indices: TidalDecode's sparse layers at a decode step.

    python benchmarks/tune_sparse_decode.py            # every shape of SHAPES, the whole sweep
    python benchmarks/tune_sparse_decode.py --quick    # the Llama-3-8B batch 1 128K shape only

Per shape: the default plan's time (`kernels.plan_sparse_decode`) and each swept plan's, us per
layer, from CUDA-graph replays of LAYERS launches in a row, each layer over a cache of its own
(as a decode step runs them: the K/V rows a layer gathers are not in L2 from the previous
launch; a split plan's combine launch included). "!" marks a plan whose output differs from the
default's by more than bf16 rounding (it never should). The results feed `kernels.SPARSE_BLOCKS`,
`SPARSE_ONE_TILE_MAX` and `MIN_SPLIT` (`kernels.sparse_blocks`, `plan_sparse_decode`).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench_cudagraph
from tqdm import tqdm

from tidal_compile.ops import kernels

# (batch, heads, kv heads, length, budget, index sets per sequence: the heads (query_head) or the KV heads)
SHAPES = [(1, 32, 8, 131072, 256, 32), (1, 32, 8, 131072, 2048, 32), (8, 32, 8, 32768, 256, 32),
          (8, 32, 8, 32768, 2048, 32), (1, 32, 32, 102400, 256, 32), (1, 32, 8, 131072, 256, 8)]
QUICK_SHAPES = SHAPES[:1]
BLOCK_N = (32, 64, 128, 256)
WARPS = (4, 8)
STAGES = (1, 2, 3)
SPLITS = (1, 2, 4, 8)
LAYERS = 8
SCALE = 128 ** -0.5


def layer_inputs(batch: int, heads: int, kv_heads: int, length: int, budget: int, sets: int):
    """(query, key, value, indices) of one layer: random bf16 cache, each set's `budget` positions
    drawn without repeats, ascending."""
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx = torch.rand(batch, sets, length, device="cuda").topk(budget, dim=-1).indices.sort(dim=-1).values
    return q, k, v, idx.to(torch.int32)


def plan_of(default: kernels.SparseDecodePlan, slots: int, block_n: int, warps: int, stages: int, splits: int
            ) -> kernels.SparseDecodePlan | None:
    """`default` with these tiles and splits (None where the splits do not divide the slots into
    whole tiles of that many)."""
    split_len = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    if triton.cdiv(slots, split_len) != splits:
        return None
    return kernels.SparseDecodePlan(programs=default.programs, splits=splits, split_len=split_len,
                                    blocks=kernels.DecodeBlocks(block_n, warps, stages), shared=default.shared,
                                    paged=default.paged, mask_kind=default.mask_kind)


def run_layers(layers, plan: kernels.SparseDecodePlan | None):
    """Every layer's sparse_decode, by `plan` (None: the default)."""
    return [kernels.sparse_decode(q, k, v, idx, SCALE, plan=plan) for q, k, v, idx in layers]


def us_per_layer(layers, plan) -> float:
    run_layers(layers, plan)  # compiles outside the timed graph
    return do_bench_cudagraph(lambda: run_layers(layers, plan), rep=30) * 1000 / len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the Llama-3-8B batch 1 128K shape only")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for batch, heads, kv_heads, length, budget, sets in QUICK_SHAPES if args.quick else SHAPES:
        layers = [layer_inputs(batch, heads, kv_heads, length, budget, sets) for _ in range(LAYERS)]
        default = kernels.plan_sparse_decode(batch, heads, kv_heads, sets, budget, 128, torch.device("cuda"),
                                             False, "none")
        expected = run_layers(layers, None)
        base = us_per_layer(layers, None)
        blocks = default.blocks
        print(f"B={batch} H={heads} Hkv={kv_heads} L={length} k={budget} sets={sets}: default "
              f"(block {blocks.block_n}, {blocks.num_warps} warps, {blocks.num_stages} stages, {default.splits} "
              f"splits, {default.programs} programs) {base:.2f} us a layer", flush=True)
        results = []
        sweep = list(itertools.product(BLOCK_N, WARPS, STAGES, SPLITS))
        for block_n, warps, stages, splits in tqdm(sweep, desc="plans", leave=False):
            plan = plan_of(default, budget, block_n, warps, stages, splits)
            if plan is None:
                continue
            try:
                outputs = run_layers(layers, plan)
            except triton.runtime.errors.OutOfResources:  # a tile too large for shared memory
                continue
            same = all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(outputs, expected))
            results.append((us_per_layer(layers, plan), block_n, warps, stages, splits, same))
        results.sort()
        print("  " + " ".join(f"{n}/{w}w/{st}s/{sp}x:{t:.2f}{'' if same else '!'}"
                              for t, n, w, st, sp, same in results[:12]), f"(best x{base / results[0][0]:.2f})",
              flush=True)
        del layers
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
