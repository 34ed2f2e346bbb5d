"""Per-layer decode attention: PyTorch SDPA, FlexAttention, and the tidal kernels, side by side.

    python benchmarks/attention.py [--quick] [--contexts 32768 131072] [--no-flex] [--out results.json]

For each shape (Llama-3-8B: 32 query / 8 KV heads; Llama-2-7B: 32 / 32; head dim 128, bf16)
and context, every method (SDPA as PyTorch dispatches it and with the memory-efficient backend
forced, FlexAttention, tidal dense / selection / sparse) runs on the same inputs in this process, timed with CUDA-graph
replays (triton.testing.do_bench_cudagraph, median). Printed per row: time, achieved GB/s
counting the bytes the method must read (K and V of the valid positions; for sparse, of the
selected rows), that as a percentage of the measured copy bandwidth, and the ratio to SDPA.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

import tidal_compile  # noqa: F401  (registers torch.ops.tidal)
from tidal_compile.ops import kernels

tidal = torch.ops.tidal
MODELS = {"llama3-8b": (32, 8), "llama2-7b": (32, 32)}
HEAD_DIM = 128
LONG_CONTEXT = 262144  # run at batch 1 only


@dataclass
class Row:
    model: str
    batch: int
    context: int
    method: str
    budget: int
    ms: float
    gbps: float
    pct_peak: float
    vs_sdpa: float


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the practical HBM peak."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def flex_decode():
    """FlexAttention compiled for one shape (a fresh compile per shape: no recompile limit)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False)


def sdpa_efficient(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


def run_shape(model: str, batch: int, context: int, budgets: list[int], peak: float, use_flex: bool,
              rows: list[Row]):
    heads, kv_heads = MODELS[model]
    scale = HEAD_DIM ** -0.5
    q = torch.randn(batch, heads, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.ones(batch, 1, 1, context, device="cuda", dtype=torch.bool)
    kv_bytes = 2 * k.numel() * k.element_size()

    def record(method, ms, nbytes, budget=0):
        gbps = nbytes / (ms * 1e-3) / 1e9
        sdpa_ms = next((r.ms for r in rows if (r.model, r.batch, r.context, r.method) ==
                        (model, batch, context, "sdpa")), ms)
        row = Row(model, batch, context, method, budget, ms, gbps, 100 * gbps * 1e9 / peak, ms / sdpa_ms)
        rows.append(row)
        print(f"{model:10s} B={batch:<2d} L={context:<7d} {method:24s} k={budget:<5d} {ms:8.3f} ms "
              f"{gbps:7.0f} GB/s {row.pct_peak:5.1f}% peak  x{row.vs_sdpa:5.2f} vs sdpa", flush=True)

    record("sdpa", bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)), kv_bytes)
    try:  # the memory-efficient backend, forced (PyTorch picks flash by default)
        record("sdpa efficient", bench(lambda: sdpa_efficient(q, k, v, scale)), kv_bytes)
    except RuntimeError as e:
        print(f"  sdpa efficient failed: {str(e)[:120]}")
    if use_flex:
        flex = flex_decode()
        try:
            record("flex_attention", bench(lambda: flex(q, k, v, scale=scale, enable_gqa=True)), kv_bytes)
        except Exception as e:  # report, keep benchmarking the rest
            print(f"  flex_attention failed: {type(e).__name__}: {str(e)[:120]}")
    record("tidal dense", bench(lambda: tidal.dense_attention(q, k, v, mask, scale, [])), kv_bytes)
    record("  dense, no mask", bench(lambda: tidal.dense_attention(q, k, v, None, scale, [])), kv_bytes)
    fixed = kernels.decode_blocks(HEAD_DIM, batch * kv_heads)  # the untuned defaults, for comparison
    record("  dense, default tiles", bench(lambda: kernels.flash_decode(q, k, v, mask, scale, blocks=fixed)), kv_bytes)
    # Where selection's time goes: the attention pass that also writes logits, then the top-k.
    record("  part: dense+logits", bench(lambda: kernels.flash_decode(q, k, v, mask, scale, emit_logits=True)),
           kv_bytes)
    _, lse, logits = kernels.flash_decode(q, k, v, mask, scale, emit_logits=True)
    summary = kernels.summarize_mask(mask, batch, context, q.device)
    record("  part: mask summary", bench(lambda: kernels.summarize_mask(mask, batch, context, q.device)), 0)
    for budget in budgets:
        for granularity, sets in (("query_head", heads), ("kv_head", kv_heads)):
            record(f"  part: top-k {granularity}",
                   bench(lambda: kernels.select_topk(logits, lse, summary, budget, sets, granularity != "query_head")),
                   logits.numel() * 4, budget)
    del logits
    for budget in budgets:
        for granularity in ("query_head", "kv_head"):
            record(f"tidal selection {granularity}",
                   bench(lambda: tidal.selection_attention(q, k, v, mask, scale, budget, granularity, 0, 0, [])),
                   kv_bytes, budget)
            _, idx = tidal.selection_attention(q, k, v, mask, scale, budget, granularity, 0, 0, [])
            rows_read = heads if granularity == "query_head" else kv_heads
            sparse_bytes = 2 * batch * rows_read * min(budget, context) * HEAD_DIM * 2
            record(f"tidal sparse {granularity}", bench(lambda: tidal.sparse_attention(q, k, v, idx, scale)),
                   sparse_bytes, budget)
    for budget in budgets:
        record("topk_oracle layer", bench(lambda: tidal.sparse_attention(
            q, k, v, tidal.selection_attention(q, k, v, mask, scale, budget, "query_head", 0, 0, [])[1], scale)),
            kv_bytes, budget)
    run_quest(q, k, v, mask, scale, budgets, record)
    del q, k, v, mask
    torch.cuda.empty_cache()


def run_quest(q, k, v, mask, scale, budgets, record, page_size: int = 16):
    """Quest at the same budgets, a decode step after its cache write: the page being written
    summarised again, page scores (one launch), top pages, paged attention. Bytes: the chosen
    pages' K/V per query head, the page metadata read by the scores and the page re-summarised."""
    batch, heads = q.shape[:2]
    kv_heads, context = k.shape[1], k.shape[2]
    pages = -(-context // page_size)
    page_min = torch.zeros(batch, kv_heads, pages, HEAD_DIM, dtype=k.dtype, device=k.device)
    page_max, filled = torch.zeros_like(page_min), torch.zeros(batch, dtype=torch.int32, device=k.device)
    tidal.quest_attention(q, k, v, mask, page_min, page_max, filled, scale, page_size, page_size, [])  # "prefill"

    def step(budget: int) -> None:
        filled.fill_(context - 1)  # as the decode step's cache write leaves it: one position to add
        tidal.quest_attention(q, k, v, mask, page_min, page_max, filled, scale, budget, page_size, [])

    meta_bytes = 2 * page_min.numel() * page_min.element_size() + batch * kv_heads * page_size * HEAD_DIM * 2
    for budget in budgets:
        quest_bytes = 2 * batch * heads * min(budget, context) * HEAD_DIM * 2 + meta_bytes
        record("quest", bench(lambda: step(budget)), quest_bytes, budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles per shape)")
    parser.add_argument("--contexts", nargs="+", type=int, default=None,
                        help="context lengths to run (default: 8K, 32K, 128K, 256K; --quick: 32K); 256K and "
                             "longer at batch 1 only")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--out", default=None, help="write rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")

    peak = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; copy bandwidth {peak / 1e12:.2f} TB/s (read + write)")
    contexts = args.contexts or ([32768] if args.quick else [8192, 32768, 131072, LONG_CONTEXT])
    rows: list[Row] = []
    for model in args.models:
        for batch in args.batches:
            for context in contexts:
                if context < LONG_CONTEXT or batch == 1:
                    run_shape(model, batch, context, [256, 2048], peak, not args.no_flex, rows)
                    if args.out:  # after every shape, so a cut-off run keeps what it measured
                        save(args.out, props.name, peak, rows)


def save(path: str, device: str, peak: float, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "copy_bandwidth": peak,
                   "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
