"""Quest's page scores as a decode step meets them: per shape and launch plan (pages per
`quest_scores` program, warps), each kernel of a Quest layer, alone and after an L2 flush, against
reading the page metadata at the copy bandwidth.

    python benchmarks/tune_quest.py                                # every shape of SHAPES
    python benchmarks/tune_quest.py --shapes llama2-7b-b1-100k      # one (each takes about two minutes)

In a decode step each layer's page metadata comes from HBM (the layers before it pushed it out of
L2); CUDA-graph replays of the kernel alone find it in L2 when it fits there (33.5 MB at Llama-3-8B
batch 1 128K), so the flushed column is the one a step pays (decode.py's profile: 19.8 us a launch
there, against 12.3 us alone). The chosen positions are checked to be the same under every plan
("!" marks a plan that changed them: it never should). The pick feeds `kernels.QUEST_BLOCK_P` and
`kernels.QUEST_WARPS`.
"""

from __future__ import annotations

import argparse
import itertools
from unittest import mock

import torch

from attention import copy_bandwidth  # benchmarks/, beside this script
from tidal_compile.ops import kernels, reference
from tune_topk import L2_FLUSH_BYTES, SCALE, decode_inputs, kernel_us

# (batch, heads, kv heads, length) of decode.py's rows
SHAPES = {"llama3-8b-b1-128k": (1, 32, 8, 131072), "llama3-8b-b8-32k": (8, 32, 8, 32768),
          "llama2-7b-b1-100k": (1, 32, 32, 102400)}
BLOCKS = (32, 64, 128, 256)
WARPS = (2, 4, 8)
PAGE = 16
BUDGET = 256
QUEST_KERNELS = ("quest_scores", "radix_", "sparse_decode")  # a Quest layer's kernels (names start so)


def metadata_bytes(batch: int, kv_heads: int, length: int, head_dim: int = 128) -> int:
    """Bytes of page metadata (min and max, bf16) quest_scores reads for one layer."""
    return 2 * batch * kv_heads * -(-length // PAGE) * head_dim * 2


def sweep(batch: int, heads: int, kv_heads: int, length: int, bandwidth: float, flush: torch.Tensor) -> None:
    """Print each plan's kernel times for one shape (its cache freed on return)."""
    q, k, mask, summary = decode_inputs(batch, heads, kv_heads, length)
    page_min, page_max = reference.quest_page_metadata(k, None, PAGE)
    filled = summary.kv_len.to(torch.int32)  # up to date: no page re-summarised

    def layer():
        return kernels.quest_attention(q, k, k, mask, page_min, page_max, filled, SCALE, BUDGET, PAGE, summary)

    def flushed_layer():
        flush.zero_()
        return layer()

    default = layer()
    metadata = metadata_bytes(batch, kv_heads, length)
    read_us = metadata / bandwidth * 1e6
    print(f"B={batch} H={heads} Hkv={kv_heads} L={length}: page metadata {metadata / 1e6:.1f} MB, {read_us:.1f} us "
          "at the copy bandwidth; us per kernel alone / after an L2 flush:", flush=True)
    for block, warps in itertools.product(BLOCKS, WARPS):
        with mock.patch.multiple(kernels, QUEST_BLOCK_P=block, QUEST_WARPS=warps):
            same = torch.equal(layer(), default)
            alone, flushed = kernel_us(layer), kernel_us(flushed_layer)
        cells = "  ".join(f"{name} {alone[name]:.1f} / {flushed[name]:.1f}" for name in alone
                          if name.startswith(QUEST_KERNELS))
        scores = flushed.get("quest_scores", float("nan"))
        print(f"  {block:3d} pages, {warps} warps{'' if same else ' !'}: {cells}  (quest_scores flushed "
              f"{read_us / scores:.0%} of the copy bandwidth)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(torch.cuda.get_device_name(), torch.__version__, f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for name in args.shapes:
        sweep(*SHAPES[name], bandwidth, flush)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
