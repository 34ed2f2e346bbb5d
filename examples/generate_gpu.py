"""Long-context generation on a GPU with a real-shape, random-initialised Llama-3-8B model.

    python examples/generate_gpu.py --context 32768 --new-tokens 64 [--config examples/tidal.yaml]
        [--cudagraphs | --step-graphs]

Builds the model from its config (no download; random weights, so the text is noise), fills
a static cache with a random prompt of `--context` tokens, and generates greedily twice from
the same prompt: dense attention (plain Inductor) and tidal (compile_for_generation). Prints
the explain report and the decode time per token of each. `--layers` / `--hidden` shrink the
model (e.g. to try it on the CPU: `--device cpu --layers 4 --hidden 256 --context 512`).
`--cudagraphs` replays both decodes from CUDA graphs: dense through transformers' own
generate-time compile (`mode="reduce-overhead"`), tidal with `compile_for_generation(...,
cudagraphs=True)`; both prefill uncompiled. `--step-graphs` is the same for dense, and replays
each tidal decode step whole from one CUDA graph (`compile_for_generation(..., step_graphs=True)`).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tidal_compile
from tidal_compile.hf import compile_for_generation


def build(args) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128256, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=max(1, args.hidden // 512), head_dim=128,
                         max_position_embeddings=args.context + args.new_tokens + 16, rope_theta=500000.0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def timed_generate(model, prompt, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Generate twice (the first call compiles); time the second, per decoded token."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    model.generate(prompt, **kwargs)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/tidal.yaml")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    graphs = parser.add_mutually_exclusive_group()
    graphs.add_argument("--cudagraphs", action="store_true", help="decode steps replayed from CUDA graphs")
    graphs.add_argument("--step-graphs", action="store_true", help="tidal's decode steps replayed whole from one "
                        "CUDA graph each (dense as with --cudagraphs)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: pass --device cpu with a small --layers / --hidden / --context")
    graphed = args.cudagraphs or args.step_graphs
    if graphed and args.device != "cuda":
        raise SystemExit("--cudagraphs and --step-graphs need --device cuda")

    prompt = torch.randint(0, 128256, (1, args.context), device=args.device)
    model = build(args)
    print(f"model: {args.layers} layers, hidden {args.hidden}; prompt {args.context} tokens", flush=True)

    # Dense baseline: transformers' own static-cache generate, its forward compiled by Inductor
    # (with --cudagraphs, transformers compiles the decode steps itself, in CUDA graphs).
    model.generation_config.disable_compile = not graphed
    dense_forward = model.forward
    if not graphed:
        model.forward = torch.compile(dense_forward)
    dense, dense_s = timed_generate(model, prompt, args.new_tokens)
    print(f"dense (inductor): {dense_s * 1e3:.1f} ms/token", flush=True)

    torch._dynamo.reset()
    model.forward = dense_forward
    compile_for_generation(model, args.config, cudagraphs=args.cudagraphs, step_graphs=args.step_graphs)
    tidal, tidal_s = timed_generate(model, prompt, args.new_tokens)
    print(f"tidal           : {tidal_s * 1e3:.1f} ms/token  ({dense_s / tidal_s:.2f}x)")
    same = int((dense[0, args.context:] == tidal[0, args.context:]).sum())
    print(f"{same}/{args.new_tokens} generated tokens equal to dense\n")
    print(tidal_compile.explain(model))


if __name__ == "__main__":
    main()
