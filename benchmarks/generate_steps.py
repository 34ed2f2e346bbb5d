"""`model.generate` after `compile_for_generation`: decode steps replayed from Inductor's CUDA graphs
(`cudagraphs=True`, the host's path through guards and the graph tree every step) against whole
steps captured in one CUDA graph (`step_graphs=True`), side by side in one process.

    python benchmarks/generate_steps.py --shape llama3-8b --batch 1 --context 32768 --methods full tidal:256

A random-initialised model of real shape at full depth (decode.py's shapes, bf16) generates from a
random prompt of `--context` tokens. ms per token = (time of a generate call of `--tokens` new
tokens - time of one of `--short`) / the difference, so the prefill and each call's first decode
step (compiles, the capture) cancel; median of `--repeats` pairs. Prints each row and the ratio
of step_graphs over cudagraphs; `--out` writes the rows as JSON (docs/benchmarks.md).
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


def generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, cache_len: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         max_cache_len=cache_len)
    torch.cuda.synchronize()
    assert out.shape[1] == prompt.shape[1] + tokens
    return time.perf_counter() - start


def ms_per_token(model: torch.nn.Module, method: Method, way: str, prompt: torch.Tensor, args: argparse.Namespace
                 ) -> float:
    """Set `model` up for `method` and `way`, time its generate calls, and undo the set-up."""
    torch._dynamo.reset()
    compile_for_generation(model, method.config(), guard_filter_fn=GUARD_FILTERS["nn-modules"], **{way: True})
    cache_len = prompt.shape[1] + args.tokens + 8  # one cache shape for every call: no recompiles
    try:
        generate_seconds(model, prompt, args.short, cache_len)  # compiles
        pairs = [(generate_seconds(model, prompt, args.tokens, cache_len)
                  - generate_seconds(model, prompt, args.short, cache_len)) for _ in range(args.repeats)]
    finally:
        del model.forward, model.generate  # the class's own again
    return statistics.median(pairs) / (args.tokens - args.short) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--methods", nargs="+", default=["full", "tidal:256"], help="full, tidal:K, quest:K")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/generate_steps.py needs a CUDA GPU")
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
        times = {way: ms_per_token(model, method, way, prompt, args) for way in WAYS}
        rows.append(dict(method=method.name, **times, speedup=times["cudagraphs"] / times["step_graphs"]))
        print(f"{method.name:12s} cudagraphs {times['cudagraphs']:7.3f}  step_graphs {times['step_graphs']:7.3f}  "
              f"x{rows[-1]['speedup']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           transformers=transformers.__version__, command=" ".join(sys.argv), shape=args.shape,
                           batch=args.batch, context=args.context, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
