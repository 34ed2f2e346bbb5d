"""The decoder's weight matrix products alone, as the model runs them (seven a layer: q, k, v, o,
gate, up, down) and with the projections that share an input merged (q|k|v and gate|up: four a
layer), every layer of a model shape in one CUDA graph, under each cuBLAS front end, side by side
in one process: ms per step, kernel time and launches per step. At batch 1 cuBLAS runs most of
them as split-K matrix-vector products, each with a reduction launch of its own, and the narrow
k and v projections read their weights well below the copy bandwidth; this measures what a pass
that merges the projections would save before one is written.

    python benchmarks/projections.py --shapes llama3-8b --batches 1 8
    python benchmarks/projections.py --shapes llama3-8b --batches 1 --blas cublas cublaslt --out proj.json

Both forms read the same weights (the separate projections are row blocks of the merged
matrices) and compute the same products (`tests/test_benchmark_accounting.py`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from attention import copy_bandwidth  # benchmarks/, beside this script
from decode import HEAD_DIM, SHAPES, Shape, captured, profile_kernels, synced_step_times


def projections(shape: Shape, merged: bool) -> list[tuple[str, str, list[int]]]:
    """One layer's matrix products in the model's order: (name, input, the output widths of the
    projections it holds), `input` being the activation it reads ("hidden", "attention" or
    "intermediate")."""
    q, kv = shape.heads * HEAD_DIM, shape.kv_heads * HEAD_DIM
    qkv = [("qkv", "hidden", [q, kv, kv])] if merged else [(name, "hidden", [width]) for name, width in
                                                            (("q", q), ("k", kv), ("v", kv))]
    gate_up = ([("gate_up", "hidden", [shape.intermediate] * 2)] if merged else
               [(name, "hidden", [shape.intermediate]) for name in ("gate", "up")])
    return qkv + [("o", "attention", [shape.hidden])] + gate_up + [("down", "intermediate", [shape.hidden])]


def layer_weights(shape: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's weights, [out, in] as nn.Linear holds them, in the merged form's matrices."""
    widths = {"hidden": shape.hidden, "attention": shape.heads * HEAD_DIM, "intermediate": shape.intermediate}
    return {name: torch.randn(sum(outs), widths[source], device=device, dtype=dtype) * 0.02
            for name, source, outs in projections(shape, merged=True)}


def layer_products(weights: dict[str, torch.Tensor], activations: dict[str, torch.Tensor], shape: Shape,
                   merged: bool) -> list[torch.Tensor]:
    """The layer's products, one output per projection (a merged product split into its
    projections' views): the separate form multiplies row blocks of the merged weights."""
    outputs = []
    for name, source, outs in projections(shape, merged):
        if merged:
            outputs += F.linear(activations[source], weights[name]).split(outs, dim=-1)
        else:
            matrix, first = _block_of(name, shape)
            outputs.append(F.linear(activations[source], weights[matrix][first:first + outs[0]]))
    return outputs


def _block_of(name: str, shape: Shape) -> tuple[str, int]:
    """(merged matrix, first row) of a separate projection's weights."""
    q, kv = shape.heads * HEAD_DIM, shape.kv_heads * HEAD_DIM
    return {"q": ("qkv", 0), "k": ("qkv", q), "v": ("qkv", q + kv), "o": ("o", 0), "gate": ("gate_up", 0),
            "up": ("gate_up", shape.intermediate), "down": ("down", 0)}[name]


@dataclass
class Row:
    shape: str
    batch: int
    blas: str
    form: str  # "separate" or "merged"
    ms: float  # median of synced replays of every layer's products
    kernel_ms: float
    launches: float
    weight_tbps: float  # the weights' bytes over the step time


def measure(shape_name: str, shape: Shape, batch: int, blas: str, merged: bool, layers: list[dict[str, torch.Tensor]],
            steps: int) -> Row:
    """Every layer's products for `batch` tokens, captured in one CUDA graph, replayed `steps` times."""
    torch.backends.cuda.preferred_blas_library(blas)
    device = layers[0]["qkv"].device
    activations = {name: torch.randn(batch, weight.shape[1], device=device, dtype=weight.dtype)
                   for name, weight in (("hidden", layers[0]["qkv"]), ("attention", layers[0]["o"]),
                                        ("intermediate", layers[0]["down"]))}

    def step() -> None:
        for weights in layers:
            layer_products(weights, activations, shape, merged)

    replay = captured(step, warmup=1)  # a run before the capture: cuBLAS's workspace and heuristics
    kernels = profile_kernels(replay, 2)
    ms = statistics.median(synced_step_times(replay, steps))
    weight_bytes = sum(weight.numel() * weight.element_size() for weights in layers for weight in weights.values())
    return Row(shape_name, batch, blas, "merged" if merged else "separate", ms, kernels["kernel_ms"],
               kernels["launches"], weight_bytes / ms / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"], choices=["cublas", "cublaslt"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("projections.py times cuBLAS under CUDA graphs: it needs a CUDA GPU")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth "
          f"{copy_bandwidth() / 1e12:.2f} TB/s; bf16, every layer, one CUDA graph", flush=True)
    rows = []
    todo = [(name, batch, blas) for name in args.shapes for batch in args.batches for blas in args.blas]
    for name, batch, blas in tqdm(todo, desc="projection rows", unit="row"):
        shape = SHAPES[name]
        layers = [layer_weights(shape, device, torch.bfloat16) for _ in range(shape.layers)]
        separate, merged = (measure(name, shape, batch, blas, form, layers, args.steps) for form in (False, True))
        rows += [separate, merged]
        tqdm.write(f"{name:10s} B={batch:<2d} {blas:8s} " + "  ".join(
            f"{row.form} {row.ms:6.3f} ms (kernels {row.kernel_ms:.3f}, {row.launches:.0f} launches, "
            f"{row.weight_tbps:.2f} TB/s)" for row in (separate, merged))
            + f"  merged faster by x{separate.ms / merged.ms:.3f} ({separate.ms - merged.ms:+.3f} ms a step)")
        del layers
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command=" ".join(sys.argv),
                           rows=[asdict(row) for row in rows]), f, indent=1)


if __name__ == "__main__":
    main()
