"""The host time `compile_for_generation` adds to each decode step: a forward that returns at
once, called directly, through `tidal_compile.hf.TidalForward` (the bookkeeping of the sequence
in its `TidalCache`, KV-cache correction off), and through its `StepGraph` (`step_graphs=True`:
the step's signature, its arguments copied into the graph's buffers, a replay that returns at
once), side by side.

    python benchmarks/forward_overhead.py [--layers 32] [--calls 20000]

Runs on the CPU (no model weights: a Llama config of `--layers` layers sizes the cache and
gives the real forward's signature). Prints us per call for both and the difference, which is
what tidal's own Python costs a step (docs/benchmarks.md compares it with the step's time
outside kernels).
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tidal_compile.cache import TidalCache
from tidal_compile.hf import TidalForward
from tidal_compile.step_graph import StepGraph


def us_per_call(call: Callable[[], Any], calls: int) -> float:
    for _ in range(calls // 10):  # warm up
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    cache = TidalCache(config, max_cache_len=64)
    kv = torch.zeros(1, config.num_key_value_heads, 32, config.head_dim)
    for layer in range(args.layers):  # allocated, as after a prefill: a step graph checks its tensors' addresses
        cache.update(kv, kv, layer)

    def forward(**kwargs: Any) -> None:
        return None

    signature = inspect.signature(LlamaForCausalLM.forward)
    tidal = TidalForward(forward, interval=0, signature=signature)
    graphed = TidalForward(forward, interval=0, signature=signature,
                           step_graph=StepGraph(forward, capture=lambda step: step))
    step = dict(input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=torch.zeros(1, 1, dtype=torch.long),
                attention_mask=torch.ones(1, 33, dtype=torch.long), past_key_values=cache, use_cache=True)

    def at_32(call: Callable[..., Any]) -> Callable[[], Any]:  # every call at position 32 (the cache is short)
        def reset_then_call() -> Any:
            cache.sequence.length = 32
            return call(**step)
        return reset_then_call

    direct, wrapped, replayed = (us_per_call(at_32(call), args.calls) for call in (forward, tidal, graphed))
    print(f"torch {torch.__version__}, {args.layers} layers: forward {direct:.2f} us per call, through TidalForward "
          f"{wrapped:.2f} us (tidal adds {wrapped - direct:.2f} us a step), through its StepGraph {replayed:.2f} us "
          f"(adds {replayed - direct:.2f} us a step)")


if __name__ == "__main__":
    main()
