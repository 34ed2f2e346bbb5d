"""`model.generate` after `compile_for_generation`: decode steps replayed from Inductor's CUDA graphs
(`cudagraphs=True`, the host's path through guards and the graph tree every step) against whole
steps captured in one CUDA graph (`step_graphs=True`), side by side in one process.

    python benchmarks/generate_steps.py --shape llama3-8b --batch 1 --context 131072 --methods full tidal:256

A random-initialised model of real shape at full depth (decode.py's shapes, bf16) generates
`--tokens` new tokens from a random prompt of `--context` tokens, `--repeats` times per method and
way, after one short call that compiles (a 16-token prompt and the same cache length: the same
decode graphs). A stopping criterion clocks every token (the GPU synchronised first, as generate's
own stop check does); ms per token = the median decode step from each call's second on (the first
runs the warm-up and the capture), so one prefill of the long prompt per call is all the context
costs. Prints each row and the ratio of step_graphs over cudagraphs; `--out` writes the rows
(with every step's time) as JSON (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers

from decode import GUARD_FILTERS, SHAPES, Method, build_model  # benchmarks/, beside this script
from tidal_compile.hf import compile_for_generation

WAYS = ("cudagraphs", "step_graphs")
WARM_UP_PROMPT = 16


class TokenClock(transformers.StoppingCriteria):
    """Records when each generated token is ready; never stops generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_ms(times: list[float]) -> list[float]:
    """ms of each decode step a clock saw from the second on: times[0] follows the prefill and
    times[1] the first decode step (compiles, warm-up, capture)."""
    return [(after - before) * 1e3 for before, after in zip(times[1:], times[2:])]


def generate_steps(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, cache_len: int) -> list[float]:
    """ms of each decode step of one greedy generate call of `tokens` new tokens (from the second)."""
    clock = TokenClock()
    out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         max_cache_len=cache_len, stopping_criteria=transformers.StoppingCriteriaList([clock]))
    assert out.shape[1] == prompt.shape[1] + tokens and len(clock.times) == tokens
    return decode_step_ms(clock.times)


def time_way(model: torch.nn.Module, method: Method, way: str, prompt: torch.Tensor, args: argparse.Namespace
             ) -> list[float]:
    """Set `model` up for `method` and `way`, time its decode steps, and undo the set-up."""
    torch._dynamo.reset()
    compile_for_generation(model, method.config(), guard_filter_fn=GUARD_FILTERS["nn-modules"], **{way: True})
    cache_len = prompt.shape[1] + args.tokens + 8  # one cache shape for every call: no recompiles
    try:
        generate_steps(model, prompt[:, :WARM_UP_PROMPT], 8, cache_len)  # compiles
        steps = []
        for repeat in range(args.repeats):
            steps += generate_steps(model, prompt, args.tokens, cache_len)
            print(f"  {method.name} {way}: call {repeat + 1}/{args.repeats}, median so far "
                  f"{statistics.median(steps):.3f} ms", flush=True)
    finally:
        del model.forward, model.generate  # the class's own again
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--methods", nargs="+", default=["full", "tidal:256"], help="full, tidal:K, quest:K")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/generate_steps.py needs a CUDA GPU")
    if args.tokens < 3 or args.repeats < 1:
        parser.error("--tokens must be at least 3 (the first two steps are not timed) and --repeats at least 1")
    methods = [Method(name) for name in args.methods]
    if any(m.is_baseline for m in methods):
        parser.error("methods are tidal modes (full, tidal:K, quest:K): both ways are compile_for_generation's")
    shape = SHAPES[args.shape]
    model = build_model(shape, args.context + args.tokens + 4096)
    prompt = torch.randint(0, shape.vocab, (args.batch, args.context), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.shape} B={args.batch} L={args.context}, ms per generated token", flush=True)
    rows = []
    for method in methods:
        steps = {way: time_way(model, method, way, prompt, args) for way in WAYS}
        times = {way: statistics.median(steps[way]) for way in WAYS}
        rows.append(dict(method=method.name, **times, speedup=times["cudagraphs"] / times["step_graphs"],
                         steps_ms=steps))
        print(f"{method.name:12s} cudagraphs {times['cudagraphs']:7.3f}  step_graphs {times['step_graphs']:7.3f}  "
              f"x{rows[-1]['speedup']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           transformers=transformers.__version__, command=" ".join(sys.argv), shape=args.shape,
                           batch=args.batch, context=args.context, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
