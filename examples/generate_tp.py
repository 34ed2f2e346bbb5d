"""Generate with TidalDecode on a tensor-parallel model: every rank holds a slice of each
layer's heads (transformers' `tp_plan="auto"`) and decodes its heads with tidal's ops.

    torchrun --nproc-per-node 2 examples/generate_tp.py [--length 1024] [--budget 64] [--device cpu|cuda]

`models/retrieval-llama` (10 query / 2 KV heads: 5 / 1 per rank on two ranks) answers the needle
question of examples/generate_cpu.py. Each rank loads its shard, runs dense attention and tidal
with this model's calibrated layers (examples/retrieval_llama_calibrated_128.yaml, at `--budget`,
granularity kv_head: its `layer` granularity needs every head's scores, which no rank holds);
rank 0 prints the explain report (its rank and heads), the answers and the time per token. On
the CPU the ranks talk over gloo, on GPUs over NCCL (one GPU per rank). Needs `accelerate`
(`pip install tidal-compile[tp]`): transformers' tensor parallelism does.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import tidal_compile
from tidal_compile.eval import retrieval_data as data
from tidal_compile.hf import compile_for_generation

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "retrieval-llama"))
    parser.add_argument("--config", default=str(ROOT / "examples" / "retrieval_llama_calibrated_128.yaml"))
    parser.add_argument("--length", type=int, default=1024, help="prompt length (tokens)")
    parser.add_argument("--depth", type=float, default=0.3, help="where the fact sits (0 = start, 1 = end)")
    parser.add_argument("--budget", type=int, default=64, help="positions each sparse layer attends to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run it under torchrun, e.g. torchrun --nproc-per-node 2 examples/generate_tp.py")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    gen = torch.Generator().manual_seed(0)
    prompt, answer = data.needle_batch(data.FillerLanguage(), 1, args.length, args.depth, gen, device)
    say(f"{world} ranks on {device.type}; prompt {prompt.shape[1]} tokens, budget {args.budget}", flush=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = {"dense attention": None, "tidal (calibrated layers)": dict(config=args.config, budget=args.budget,
                                                                           granularity="kv_head")}
    for name, options in settings.items():
        torch._dynamo.reset()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, tp_plan="auto").eval()
        if options is not None:
            compile_for_generation(model, **options)
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=data.VALUE_TOKENS,
                      min_new_tokens=data.VALUE_TOKENS, do_sample=False, pad_token_id=data.PAD)
        model.generate(prompt, **kwargs)  # compiles
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        per_token = (time.perf_counter() - start) / data.VALUE_TOKENS
        tokens = out[0, prompt.shape[1]:]
        if options is not None:
            say("\n" + str(tidal_compile.explain(model)) + "\n")
        verdict = "correct" if torch.equal(tokens.cpu(), answer[0].cpu()) else "wrong"
        say(f"{name:28s}: {' '.join(data.token_name(t) for t in tokens.tolist()):20s} {verdict}  "
            f"({per_token * 1e3:.1f} ms/token, prefill included)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
