"""Dynamo's guard time per decode step, with and without a guard filter, side by side.

    torchrun --nproc-per-node 2 benchmarks/guard_time.py     # tensor parallel (gloo on the CPU)
    python benchmarks/guard_time.py                           # one process, unsharded

Loads `models/retrieval-llama` (sharded with `tp_plan="auto"` under torchrun), runs the prefill,
compiles `model.forward` with the tidal backend (mode full, inner backend eager: the guards are
Dynamo's, whatever compiles the graph) once per guard filter, and times the profiler's
"TorchDynamo Cache Lookup" (guard evaluation before each call of the compiled forward) over
`--steps` decode calls. Rank 0 prints ms per call for each filter and the ratio to no filter.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, StaticCache

from decode import GUARD_FILTERS  # benchmarks/, beside this script

MODEL = Path(__file__).resolve().parent.parent / "models" / "retrieval-llama"
GUARD_EVENT = "TorchDynamo Cache Lookup"


@torch.no_grad()
def guard_ms(model: torch.nn.Module, guard_filter: str, steps: int) -> float:
    """Mean ms of guard evaluation per decode call of `model.forward` compiled with `guard_filter`."""
    torch._dynamo.reset()
    options = {"mode": "full", "inner_backend": "eager"}
    if guard_filter != "none":
        options["guard_filter_fn"] = GUARD_FILTERS[guard_filter]
    forward = torch.compile(model.forward, backend="tidal", options=options)
    prompt = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 8)
    token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def step(position: int) -> None:
        nonlocal token
        out = forward(input_ids=token, position_ids=torch.tensor([[position]]), past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)

    for position in range(prompt.shape[1], prompt.shape[1] + 3):  # compiles, then warms up
        step(position)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for position in range(prompt.shape[1] + 3, prompt.shape[1] + 3 + steps):
            step(position)
    lookups = [e.cpu_time_total for e in prof.events() if e.name == GUARD_EVENT]
    return sum(lookups) / len(lookups) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa",
                                                 **({"tp_plan": "auto"} if sharded else {})).eval()
    times = {name: guard_ms(model, name, args.steps) for name in ("none", *GUARD_FILTERS)}
    if not sharded or dist.get_rank() == 0:
        setting = f"{dist.get_world_size()} ranks (tensor parallel)" if sharded else "one process"
        print(f"retrieval-llama, {setting}, torch {torch.__version__}: guard evaluation per decode call")
        for name, ms in times.items():
            print(f"  guard filter {name:12s} {ms:7.3f} ms  x{times['none'] / ms:5.2f} vs none")
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
