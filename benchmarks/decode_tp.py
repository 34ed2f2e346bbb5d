"""Decode latency with tensor parallelism on several GPUs: inductor, full and tidal side by side,
as benchmarks/decode.py measures them on one.

    torchrun --nproc-per-node 2 benchmarks/decode_tp.py --shape llama3-8b --context 131072 --out tp.json
    torchrun --nproc-per-node 2 benchmarks/decode_tp.py --shape llama3-70b --layers 40 --context 131072

Each rank holds 1/N of every layer's heads (transformers' `tp_plan="auto"`, NCCL, one GPU per
rank): rank 0 writes the random-initialised model once into `--scratch` (safetensors; transformers
shards only what `from_pretrained` loads), then every rank loads its shard. Per method: compile
with CUDA graphs, a cache of the rank's KV heads filled by hand, median ms per decode step on rank 0
(the ranks step in lockstep, joined by the all-reduces), kernel time by category on rank 0, NCCL
kernels as "communication". `llama3-70b` is Llama-3-70B's shape (hidden 8192, 64 / 8 heads);
`--layers` shortens any shape (80 layers of it are 141 GB of bf16 weights: more than one H200).

`inductor` is the model as users compile it: transformers' vocabulary-sharded embedding writes
through a boolean mask, so Inductor captures no CUDA graph (the row says so) and every step pays
the launches; `inductor+where` is Inductor with tidal's pass that writes those masks as `where`
(what the tidal backend does), the fair exact baseline next to `full`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from attention import copy_bandwidth  # benchmarks/, beside this script
from decode import SHAPES, Method, Shape, add_measure_arguments, derive, measure, print_row, save, trace_file

TP_SHAPES = {**SHAPES, "llama3-70b": Shape("llama", 80, 8192, 28672, 64, 8, 128256, 500000.0, 131072)}


def sharded_model(shape: Shape, max_positions: int, scratch: Path) -> torch.nn.Module:
    """The random-initialised model of `shape`, written by rank 0 into `scratch` and loaded as this
    rank's shard."""
    folder = scratch / f"{shape.family}-{shape.layers}l-{shape.hidden}h-{max_positions}p"
    if dist.get_rank() == 0 and not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(shape.config(max_positions), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    dist.barrier()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, tp_plan="auto",
                                                             attn_implementation="sdpa").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=list(TP_SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's own depth")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--methods", nargs="+", default=["inductor", "inductor+where", "full", "tidal:256"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--scratch", default="/tmp/tidal-decode-tp", help="where rank 0 writes the model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-guard-eval", action="store_true",
                        help="time with Dynamo's guards off (unsafe; measures what guard evaluation costs a step)")
    add_measure_arguments(parser)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        sys.exit("benchmarks/decode_tp.py runs under torchrun with one CUDA GPU per rank")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    shape = TP_SHAPES[args.shape]
    shape = dataclasses.replace(shape, layers=args.layers or shape.layers)
    if shape.heads % world or shape.kv_heads % world:
        sys.exit(f"{args.shape}: {shape.heads} / {shape.kv_heads} heads do not split over {world} ranks")
    rank0 = dist.get_rank() == 0
    bandwidth = copy_bandwidth()
    header = (f"{world} x {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}; {args.shape} with {shape.layers} layers, tensor parallel over {world} "
              f"ranks; copy bandwidth per GPU {bandwidth / 1e12:.2f} TB/s; CUDA graphs, bf16")
    if rank0:
        print(header, flush=True)
    model = sharded_model(shape, args.context + 4096, Path(args.scratch))
    name = f"{args.shape}-tp{world}"
    rows = []
    for method in map(Method, args.methods):
        trace = trace_file(args.trace, f"{method.file_name}-rank{dist.get_rank()}")
        row = measure(model, method, name, shape, args.batch, args.context, args.steps, args.warmup,
                      args.profile_steps, kv_heads=shape.kv_heads // world, trace=trace,
                      skip_guard_eval=args.skip_guard_eval, guard_filter=args.guard_filter,
                      inductor_config=dict(args.inductor_config))
        row.attention_bytes //= world  # a rank reads its heads' share
        rows.append(row)
        derive(rows, bandwidth)
        if rank0:
            print_row(row, print)
            if args.out:
                save(args.out, header, bandwidth, rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
