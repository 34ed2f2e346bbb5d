"""End-to-end decode latency of a real-shape, random-initialised Llama: plain Inductor against
the tidal backend's modes, side by side in one process.

    python benchmarks/decode.py --context 32768 --layers 4 [--cudagraphs] --out decode.json

Llama-3-8B shapes (hidden 4096, 32 query / 8 KV heads, head dim 128, bf16), `--layers` deep
(the time per layer is what scales). Each method compiles `model.forward` (Inductor alone, or
backend="tidal" with a mode), prefills `--context` random tokens into a TidalCache (a StaticCache, with Quest pages for quest), then
times `--steps` greedy decode steps with CUDA events after `--warmup` untimed ones. Printed:
ms per token and the speed-up over Inductor; the bandwidth bound (weights + KV cache read once
per token at the measured copy bandwidth) is printed beside it. With `--cudagraphs` every method
captures its decode step in CUDA graphs (Inductor `mode="reduce-overhead"`, tidal
`cudagraphs=True`) and the prompt is prefilled uncompiled, as transformers' generate does.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tidal_compile import TidalCache, hf_compat  # also registers backend="tidal" and the ops
from attention import copy_bandwidth  # benchmarks/attention.py, beside this script

METHODS = {
    "inductor": None,
    "full": {"mode": "full"},
    "tidal": {"mode": "tidal", "budget": 256},
    "quest": {"mode": "quest", "budget": 256, "page_size": 16},
    "topk_oracle": {"mode": "topk_oracle", "budget": 256},
}


def build(layers: int, context: int, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=context + 1024, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()


@torch.no_grad()
def decode_ms(model, forward, prompt: torch.Tensor, steps: int, warmup: int, prefill=None,
              page_size: int | None = None) -> float:
    """Prefill `prompt` (through `prefill`, default `forward`), then the mean time of `steps`
    decode steps (after `warmup`). A TidalCache (with Quest pages of `page_size` for mode quest)."""
    batch, context = prompt.shape
    cache = TidalCache(model.config, max_cache_len=context + warmup + steps + 1, page_size=page_size)
    cache_arg = {hf_compat.forward_cache_name(model.forward): cache}
    out = (prefill or forward)(input_ids=prompt, use_cache=True, **cache_arg,
                               cache_position=torch.arange(context, device=prompt.device))
    token = out.logits[:, -1:].argmax(-1)
    timings = []
    for i in range(warmup + steps):
        position = torch.full((1,), context + i, device=prompt.device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if prompt.is_cuda else (None, None)
        if start is not None:
            start.record()
        out = forward(input_ids=token, use_cache=True, cache_position=position, **cache_arg)
        token = out.logits[:, -1:].argmax(-1)
        if end is not None:
            end.record()
            end.synchronize()
            timings.append(start.elapsed_time(end))
    return sum(timings[warmup:]) / steps if timings else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--cudagraphs", action="store_true", help="decode steps replayed from CUDA graphs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py needs a CUDA GPU")

    model = build(args.layers, args.context, "cuda")
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * args.layers * args.batch * 8 * args.context * 128 * 2
    bandwidth = copy_bandwidth()
    bound = (weights + kv) / bandwidth * 1e3
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: Llama-3-8B shapes, {args.layers} layers, "
          f"batch {args.batch}, context {args.context}; bandwidth bound {bound:.3f} ms/token "
          f"(weights {weights / 1e9:.2f} GB + KV {kv / 1e9:.2f} GB at {bandwidth / 1e12:.2f} TB/s)"
          f"{'; CUDA graphs' if args.cudagraphs else ''}", flush=True)
    rows = []
    for name in args.methods:
        torch._dynamo.reset()
        options = METHODS[name]
        if options is None:
            forward = torch.compile(model.forward, mode="reduce-overhead" if args.cudagraphs else None)
        else:
            forward = torch.compile(model.forward, backend="tidal",
                                    options=dict(options, cudagraphs=args.cudagraphs))
        ms = decode_ms(model, forward, prompt, args.steps, args.warmup,
                       prefill=model.forward if args.cudagraphs else None,
                       page_size=(options or {}).get("page_size"))
        base = rows[0]["ms"] if rows else ms
        rows.append(dict(method=name, ms=ms, speedup_vs_inductor=base / ms, bound_ms=bound))
        print(f"  {name:12s} {ms:8.3f} ms/token  x{base / ms:5.2f} vs inductor  ({bound / ms:5.1%} of bound)",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, layers=args.layers,
                           batch=args.batch, context=args.context, cudagraphs=args.cudagraphs, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
