"""Greedy generation of a small Llama under each tidal setting, as one rank of a tensor-parallel
run (under torchrun: transformers shards it with `tp_plan="auto"`) or alone;
tests/test_tensor_parallel.py compares the two.

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py MODEL_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import tidal_compile
from tidal_compile.config import ConfigError
from tidal_compile.hf import compile_for_generation

SETTINGS: dict[str, Any] = {
    "dense": None,
    "tidal:64": dict(budget=64),  # >= every length: equal to dense attention
    "tidal:8": dict(budget=8),
    "tidal:8:kv_head": dict(budget=8, granularity="kv_head"),
    "tidal:8:correction": dict(budget=8, correction={"interval": 2}),  # each rank recomputes its heads' K/V
    "quest:16": dict(mode="quest", budget=16, page_size=4),
}
NEW_TOKENS = 6


def prompt() -> torch.Tensor:
    return torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(0))


def load(model_dir: str) -> torch.nn.Module:
    sharded = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    extra = {"tp_plan": "auto"} if sharded else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                **extra).eval()


def generate_all(model_dir: str) -> dict[str, Any]:
    """Tokens and KV-cache corrections run per setting, the report of one sparse setting, and the
    error of granularity `layer`."""
    tokens, corrections, report = {}, {}, None
    for name, options in SETTINGS.items():
        torch._dynamo.reset()
        tidal_compile.report.clear_reports()
        model = load(model_dir)
        if options is not None:
            compile_for_generation(model, inner_backend="eager", **options)
        out = model.generate(prompt(), max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        tokens[name] = out.sequences[:, -NEW_TOKENS:].tolist()
        sequence = getattr(out.past_key_values, "sequence", None)  # a TidalCache's bookkeeping
        corrections[name] = sequence.corrections if sequence is not None else None
        if name == "tidal:8":
            report = str(tidal_compile.explain(model))
    try:
        compile_for_generation(load(model_dir), inner_backend="eager", budget=8, granularity="layer")
        layer_error = None
    except ConfigError as e:
        layer_error = str(e)
    return dict(tokens=tokens, corrections=corrections, report=report, layer_error=layer_error)


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")  # torchrun's environment: rank, world size, address
    results = generate_all(sys.argv[1])
    if torch.distributed.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)
