"""The top-k's two plans (grouped, chunked) against torch.topk, and a sweep of the grouped
plan (group length, select and gather blocks, warps), side by side on flash_decode's logits.

    python benchmarks/tune_topk.py                 # every shape and budget of SHAPES
    python benchmarks/tune_topk.py --no-sweep      # the two plans and torch.topk only
    python benchmarks/tune_topk.py --quick         # --no-sweep at the issue's target shapes only
    python benchmarks/tune_topk.py --quick --gather-programs 1 2 4 8   # and the gather split over programs
    python benchmarks/tune_topk.py --quick --split-sweep   # the split plans' steps and warps
    python benchmarks/tune_topk.py --quick --split-sweep --budgets 2048   # those of one budget
    python benchmarks/tune_topk.py --quick --digit-bits 4 8   # radix digits of 4 bits against 8
    python benchmarks/tune_topk.py --quick --group-tail 256 2048   # group keys held past the first step
    python benchmarks/tune_topk.py --quick --hold-tail   # longer rows hold a step and a tail, or stream
    python benchmarks/tune_topk.py --quick --early-exit 0 128   # selections stopping early, top groups' slacks
    python benchmarks/tune_topk.py --quick --select-block 1024 4096   # candidates in steps of each
    python benchmarks/tune_topk.py --quick --group-block 2048 4096   # group keys in steps of each

Per shape, budget and granularity: the grouped and the chunked plan's time (the one
`kernels.plan_topk` picks marked *) and `torch.topk`'s on the same ranks (the logits for
query_head, the summed probabilities for kv_head, computed outside its time), CUDA-graph replays
(median), then each swept grouped plan's time; "!" marks a plan whose indices differ from the
default's (it never should). Where the picked plan ranks by logit, a second line times a whole
selection layer (flash_decode with its logits, then the top-k) against flash_decode alone: the
difference is the top-k's cost after the attention launch (higher than alone), then the top-k's
kernels in the layer, alone, alone after an L2 flush, and after a flush and a read of the logits
(CUDA-graph replays under the profiler; alone, each replay finds the lines its predecessor gathered
still in L2, so the figure in the layer is the one a decode step pays). `--gather-programs`
times the picked grouped plan with its candidate gather on each of those numbers of programs per
row (1: inside radix_select), with 8 and 16 warps, and the selection layer with each.
`--split-sweep` sweeps, where the picked plan splits its gather, the group length, the steps of
`radix_select_groups` and `radix_select_candidates` and the warps (one kernel no longer holds the
gather's registers beside them). `--digit-bits` times the picked plan with radix digits of each
width (4 bits: eight histograms of 16 bins a selection; 8: four of 256), and the selection layer
with each. `--group-tail` does the same with each least tail of group keys held past a
selection's first step (`TopkPlan.group_tail_min`), `--hold-tail` with longer rows streamed and
held (`TopkPlan.hold_tail`), `--early-exit` with every digit read and with the selections
stopping at the first bin that leaves nothing over (each slack: the top groups'
`TopkPlan.group_slack`), `--select-block` with each step of candidates (`TopkPlan.select_block`),
`--group-block` with each step of group keys (`TopkPlan.group_block`; a row past it holds a tail).
The results feed `kernels.topk_grouped_is_faster`, `topk_group` and `topk_select_steps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from typing import Optional

import torch
from triton.testing import do_bench_cudagraph

from decode import profile_kernels  # benchmarks/, beside this script
from tidal_compile.ops import kernels

# (batch, heads, kv heads, length, budgets); the last three: a cache a few tokens past 128K (decode.py's
# at 128K), one whose rows are not a multiple of 16 positions, and Quest's page rows at 128K (8K
# pages of 16, 16 pages)
SHAPES = [(1, 32, 8, 131072, (256, 2048)), (1, 32, 8, 32768, (256, 2048)), (8, 32, 8, 32768, (256, 2048)),
          (1, 32, 32, 102400, (256, 2048)), (1, 32, 8, 131072 + 16, (256,)), (1, 32, 8, 131072 + 17, (256,)),
          (1, 32, 8, 8192, (16,))]
# issue 17's top-k targets, and decode.py's 128K cache (a few positions past 128K)
QUICK_SHAPES = [(1, 32, 8, 131072, (256, 2048)), (8, 32, 8, 32768, (256, 2048)), (1, 32, 8, 131072 + 16, (256, 2048)),
                (8, 32, 8, 32768 + 16, (256, 2048))]
GROUPS = (8, 16, 32, 64, 128)
# (select_block, gather_block, select_warps)
SELECT = ((1024, 1024, 8), (2048, 2048, 8), (1024, 1024, 4), (1024, 4096, 8), (2048, 8192, 8), (1024, 4096, 16),
          (2048, 4096, 16))
# --split-sweep: (group_block, select_block, select_warps) of the split plans
SPLIT_STEPS = tuple(itertools.product((2048, 4096, 8192), (1024, 2048, 4096), (8, 16)))


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=30) * 1000


SCALE = 128 ** -0.5
L2_FLUSH_BYTES = 256 << 20  # more than an H100's or H200's L2 (50 / 60 MB)


def decode_inputs(batch: int, heads: int, kv_heads: int, length: int):
    """(query, cache (keys and values alike), mask, mask summary): random bf16, filled to `length`."""
    q = torch.randn(batch, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, 1, 1, length, device="cuda", dtype=torch.bool)
    return q, k, mask, kernels.summarize_mask(mask, batch, length, q.device)


def decode_logits(batch: int, heads: int, kv_heads: int,
                  length: int) -> tuple[torch.Tensor, torch.Tensor, kernels.MaskSummary]:
    """(lse, logits, mask summary) of flash_decode over a random bf16 cache filled to `length`."""
    q, k, mask, summary = decode_inputs(batch, heads, kv_heads, length)
    _, lse, logits = kernels.flash_decode(q, k, k, mask, SCALE, emit_logits=True)
    return lse, logits, summary


def selection_line(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, summary: kernels.MaskSummary,
                   budget: int, plan: Optional[kernels.TopkPlan] = None) -> str:
    """A query_head selection layer's time (as `tidal::selection_attention` runs it, the top-k
    by `plan`: the default one if None) against its flash_decode alone."""
    def attention():
        return kernels.flash_decode(q, k, k, mask, SCALE, emit_logits=True, summary=summary)

    def topk_of(lse, logits):
        return kernels.select_topk(logits, lse, summary, budget, q.shape[1], False, plan)

    def selection():
        return topk_of(*attention()[1:])

    def topk():
        return topk_of(lse, logits)

    _, lse, logits = attention()  # also compiles and tunes outside the timed graphs
    selection()
    alone, whole = us(attention), us(selection)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=q.device)

    def flushed_topk():  # the L2 emptied (a write of more than it holds) before the top-k ...
        flush.zero_()
        return topk()

    def refetched_topk():  # ... and then the logits read back into it
        flush.zero_()
        logits.sum()
        return topk()

    in_layer, by_itself = kernel_us(selection), kernel_us(topk)
    flushed, refetched = kernel_us(flushed_topk), kernel_us(refetched_topk)
    split = ", ".join(f"{name} {in_layer[name]:.1f} ({by_itself[name]:.1f}; {flushed[name]:.1f}; {refetched[name]:.1f})"
                      for name in by_itself)
    return (f"  selection layer: flash_decode alone {alone:.1f} us, with the top-k {whole:.1f} (top-k "
            f"{whole - alone:.1f}); its top-k kernels in the layer (alone; alone after an L2 flush; after a "
            f"flush and a read of the logits): {split}")


def kernel_us(fn, replays: int = 20) -> dict[str, float]:
    """us per run of each kernel of `fn`, from `replays` replays of a CUDA graph of it under the profiler."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return {k["name"]: k["ms"] * 1e3 for k in profile_kernels(graph.replay, replays)["kernels"]}


def timed_plans(plans: dict[str, kernels.TopkPlan], logits: torch.Tensor, lse: torch.Tensor,
                summary: kernels.MaskSummary, budget: int, sets: int, by_prob: bool,
                default: torch.Tensor) -> list[tuple[float, str]]:
    """(us, "label:us") of the top-k by each labelled plan; "!" marks indices that differ from
    the default plan's (they never should)."""
    cells = []
    for label, plan in plans.items():
        def topk():
            return kernels.select_topk(logits, lse, summary, budget, sets, by_prob, plan)

        same = torch.equal(topk(), default)
        time = us(topk)
        cells.append((time, f"{label}:{time:.1f}{'' if same else '!'}"))
    return cells


def gather_programs_line(picked: kernels.TopkPlan, logits: torch.Tensor, lse: torch.Tensor,
                         summary: kernels.MaskSummary, budget: int, sets: int, by_prob: bool, default: torch.Tensor,
                         programs: list[int]) -> str:
    """us of the top-k by the picked grouped plan with its gather on each number of `programs` per
    row (the steps `plan_topk` derives for it), with 8 and 16 warps."""
    rows, length = logits.shape[0] * sets, logits.shape[2]
    plans = {f"{parts}/{warps}w": kernels.plan_topk(rows, length, budget, logits.device, grouped=True,
                                                    gather_programs=parts, select_warps=warps)
             for parts, warps in itertools.product(programs, (8, 16))}
    cells = timed_plans(plans, logits, lse, summary, budget, sets, by_prob, default)
    return (f"  gather programs/warps (picked {picked.gather_programs}/{picked.select_warps}w): "
            + " ".join(cell for _, cell in cells))


def plans_line(title: str, plans: dict[str, kernels.TopkPlan], logits: torch.Tensor, lse: torch.Tensor,
               summary: kernels.MaskSummary, budget: int, sets: int, by_prob: bool, default: torch.Tensor) -> str:
    """us of the top-k by each labelled variant of the picked plan, after `title`."""
    cells = timed_plans(plans, logits, lse, summary, budget, sets, by_prob, default)
    return f"  {title}: " + " ".join(cell for _, cell in cells)


# The TopkPlan fields whose flags time the picked plan at each given value: (field, title, label).
FIELD_VARIANTS = (("digit_bits", "digit widths", "{}-bit"), ("group_tail_min", "group tails", "tail {}"),
                  ("group_block", "group-key steps", "step {}"), ("select_block", "candidate steps", "step {}"))


def plan_variants(picked: kernels.TopkPlan, values: dict[str, list[int]],
                  hold_tail: bool) -> list[tuple[str, dict[str, kernels.TopkPlan]]]:
    """(title, labelled plans): the picked grouped plan with each value of `values` of a field of
    FIELD_VARIANTS (--digit-bits, --group-tail, --group-block, --select-block) and, with
    `hold_tail`, with longer rows streamed and held (--hold-tail); with values["early_exit"] (--early-exit),
    with every digit read and with early exits of each top-group slack."""
    variants = []
    for field, title, label in FIELD_VARIANTS:
        if values.get(field):
            variants.append((f"{title} (picked {label.format(getattr(picked, field))})",
                             {label.format(value): dataclasses.replace(picked, **{field: value})
                              for value in values[field]}))
    if hold_tail:
        variants.append((f"longer rows (picked {'held' if picked.hold_tail else 'streamed'})",
                         {how: dataclasses.replace(picked, hold_tail=how == "held") for how in ("streamed", "held")}))
    if values.get("early_exit"):
        exits = {f"exit slack {slack}": dataclasses.replace(picked, early_exit=True, group_slack=slack)
                 for slack in values["early_exit"]}
        picked_label = f"exit slack {picked.group_slack}" if picked.early_exit else "every digit"
        variants.append((f"selections (picked {picked_label})",
                         {"every digit": dataclasses.replace(picked, early_exit=False, group_slack=0), **exits}))
    return variants


def split_sweep_line(picked: kernels.TopkPlan, logits: torch.Tensor, lse: torch.Tensor,
                     summary: kernels.MaskSummary, budget: int, sets: int, by_prob: bool,
                     default: torch.Tensor) -> str:
    """us of the top-k with the picked plan's gather programs, by group length and SPLIT_STEPS."""
    rows, length = logits.shape[0] * sets, logits.shape[2]
    plans = {f"{group}/{group_block}/{select_block}/{warps}w": kernels.plan_topk(
                 rows, length, budget, logits.device, grouped=True, group=group,
                 gather_programs=picked.gather_programs, group_block=group_block, select_block=select_block,
                 select_warps=warps)
             for group, (group_block, select_block, warps) in itertools.product(GROUPS, SPLIT_STEPS)}
    cells = timed_plans(plans, logits, lse, summary, budget, sets, by_prob, default)
    return (f"  split plans ({picked.gather_programs} gather programs), group/group block/candidate block/warps "
            f"(picked {picked.group}/{picked.group_block}/{picked.select_block}/{picked.select_warps}w): "
            + " ".join(cell for _, cell in cells) + f"; best {min(cells)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the target shapes only, no sweep")
    parser.add_argument("--gather-programs", nargs="*", type=int, default=[],
                        help="time the picked grouped plan with its gather on each of these programs per row")
    parser.add_argument("--split-sweep", action="store_true",
                        help="where the picked plan splits its gather: sweep its group length, steps and warps")
    parser.add_argument("--digit-bits", nargs="*", type=int, default=[], choices=[4, 8],
                        help="time the picked grouped plan with radix digits of each of these widths")
    parser.add_argument("--group-tail", nargs="*", type=int, default=[],
                        help="time the picked grouped plan with each least tail of group keys held past its first step")
    parser.add_argument("--hold-tail", action="store_true",
                        help="time the picked grouped plan with longer rows streamed and with them held")
    parser.add_argument("--early-exit", nargs="*", type=int, default=[],
                        help="time the picked grouped plan with every digit read and with early exits of these slacks")
    parser.add_argument("--select-block", nargs="*", type=int, default=[],
                        help="time the picked grouped plan with its candidates in steps of each of these")
    parser.add_argument("--group-block", nargs="*", type=int, default=[],
                        help="time the picked grouped plan with its group keys in steps of each of these")
    parser.add_argument("--budgets", nargs="*", type=int, default=None,
                        help="only these budgets of the shapes (default: every budget)")
    args = parser.parse_args()
    args.no_sweep |= args.quick
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for batch, heads, kv_heads, length, budgets in QUICK_SHAPES if args.quick else SHAPES:
        budgets = [budget for budget in budgets if args.budgets is None or budget in args.budgets]
        if not budgets:
            continue
        q, k, mask, summary = decode_inputs(batch, heads, kv_heads, length)
        _, lse, logits = kernels.flash_decode(q, k, k, mask, SCALE, emit_logits=True)
        for budget, (granularity, sets) in itertools.product(budgets, (("query_head", heads), ("kv_head", kv_heads))):
            by_prob = granularity != "query_head"
            rank = (torch.exp(logits - lse[..., None]).view(batch, sets, -1, length).sum(2) if by_prob else logits)
            default = kernels.select_topk(logits, lse, summary, budget, sets, by_prob)
            times = {}
            for grouped in (True, False):
                plan = kernels.plan_topk(batch * sets, length, budget, logits.device, grouped=grouped)
                assert torch.equal(kernels.select_topk(logits, lse, summary, budget, sets, by_prob, plan), default)
                times[grouped] = us(lambda: kernels.select_topk(logits, lse, summary, budget, sets, by_prob, plan))
            picked = kernels.plan_topk(batch * sets, length, budget, logits.device)
            torch_topk = us(lambda: torch.topk(rank, budget, dim=-1))
            ours = times[picked.grouped]
            line = (f"B={batch} H={heads} Hkv={kv_heads} L={length} k={budget} {granularity}: grouped (group "
                    f"{picked.group}) {times[True]:.1f}{'*' if picked.grouped else ''} us, chunked "
                    f"{times[False]:.1f}{'' if picked.grouped else '*'} us, torch.topk {torch_topk:.1f} us, "
                    f"torch.topk / ours x{torch_topk / ours:.2f}")
            if not args.no_sweep:
                plans = {f"{group}/{select_block}/{gather_block}/{warps}": kernels.plan_topk(
                             batch * sets, length, budget, logits.device, grouped=True, group=group,
                             select_block=select_block, gather_block=gather_block, select_warps=warps)
                         for group, (select_block, gather_block, warps) in itertools.product(GROUPS, SELECT)}
                cells = timed_plans(plans, logits, lse, summary, budget, sets, by_prob, default)
                line += "; group/block/gather/warps: " + " ".join(c for _, c in cells) + f"; best {min(cells)[1]}"
            print(line, flush=True)
            selection = (logits, lse, summary, budget, sets, by_prob, default)
            if picked.grouped and args.gather_programs:
                print(gather_programs_line(picked, *selection, args.gather_programs), flush=True)
            values = {"digit_bits": args.digit_bits, "group_tail_min": args.group_tail,
                      "group_block": args.group_block, "select_block": args.select_block,
                      "early_exit": args.early_exit}
            variants = plan_variants(picked, values, args.hold_tail) if picked.grouped else []
            for title, plans in variants:
                print(plans_line(title, plans, *selection), flush=True)
            if picked.grouped and picked.gather_programs > 1 and args.split_sweep:
                print(split_sweep_line(picked, *selection), flush=True)
            if not by_prob:
                print(selection_line(q, k, mask, summary, budget), flush=True)
                for parts in args.gather_programs if picked.grouped else ():
                    plan = kernels.plan_topk(batch * sets, length, budget, logits.device, gather_programs=parts)
                    print(f"  gather programs {parts}:" + selection_line(q, k, mask, summary, budget, plan)[1:],
                          flush=True)
                for _, plans in variants:
                    for label, plan in plans.items():
                        print(f"  {label}:" + selection_line(q, k, mask, summary, budget, plan)[1:], flush=True)
        del q, k, lse, logits
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
