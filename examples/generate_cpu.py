"""Generate with TidalDecode on the CPU: a tiny Llama under torch.compile(backend="tidal").

    python examples/generate_cpu.py [--config examples/tiny_tidal.yaml] [--new-tokens 32]

The model is random-initialised (no weights can be downloaded here) over a character
vocabulary, so its text is noise; what the example shows is the mechanics: the explain report
(which layers became dense / selection / sparse, and why) and how the sparse output compares
with dense attention on the same prompt.
"""

from __future__ import annotations

import argparse
import string
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tidal_compile

ALPHABET = string.ascii_lowercase + " .,"


def encode(text: str) -> torch.Tensor:
    return torch.tensor([[ALPHABET.index(c) for c in text if c in ALPHABET]])


def decode(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[i] for i in ids.tolist())


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(ALPHABET), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).with_name("tiny_tidal.yaml")))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = tiny_llama(args.seed)
    prompt = encode("the tide comes in and the tide goes out, " * 6)
    generate = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
    print(f"prompt: {prompt.shape[1]} tokens; config: {args.config}")

    dense = model.generate(prompt, **generate)

    model.forward = tidal_compile.compile(model.forward, config=args.config)
    start = time.perf_counter()
    print("compiling prefill and decode graphs with backend='tidal' (Inductor on CPU takes ~30 s) ...", flush=True)
    sparse = model.generate(prompt, **generate)
    print(f"generated {args.new_tokens} tokens in {time.perf_counter() - start:.1f} s (compile included)\n")

    print(tidal_compile.explain(model))
    new = slice(prompt.shape[1], None)
    same = int((dense[0, new] == sparse[0, new]).sum())
    print(f"\ndense attention : {decode(dense[0, new])!r}")
    print(f"tidal (sparse)  : {decode(sparse[0, new])!r}")
    print(f"{same}/{args.new_tokens} generated tokens equal to dense attention")


if __name__ == "__main__":
    main()
