"""Generate with TidalDecode on the CPU: a tiny Llama, `model.generate`, backend="tidal".

    python examples/generate_cpu.py [--config examples/tiny_tidal.yaml] [--new-tokens 32]

The model is random-initialised (no weights can be downloaded here) over a character
vocabulary, so its text is noise; what the example shows is the mechanics: the explain report
(which layers became dense / selection / sparse, and why) and the text generated with dense
attention, with tidal, and with tidal plus KV-cache correction, from the same prompt.
"""

from __future__ import annotations

import argparse
import string
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tidal_compile
from tidal_compile.hf import compile_for_generation

ALPHABET = string.ascii_lowercase + " .,"


def encode(text: str) -> torch.Tensor:
    return torch.tensor([[ALPHABET.index(c) for c in text if c in ALPHABET]])


def decode(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[i] for i in ids.tolist())


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(ALPHABET), hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the default init, so selection matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).with_name("tiny_tidal.yaml")))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--correction-interval", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompt = encode("the tide comes in and the tide goes out, " * 6)
    print(f"prompt: {prompt.shape[1]} tokens; config: {args.config}")
    texts = {}
    for name, correction in (("dense attention", None), ("tidal", 0), ("tidal + correction", args.correction_interval)):
        torch._dynamo.reset()
        model = tiny_llama(args.seed)
        if correction is not None:
            compile_for_generation(model, args.config, correction={"interval": correction})
        start = time.perf_counter()
        print(f"{name}: generating {args.new_tokens} tokens"
              + (" (Inductor compiles prefill and decode graphs on first use, ~30 s) ..." if correction is not None else
                 " ..."), flush=True)
        out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
        texts[name] = out[0, prompt.shape[1]:]
        print(f"  {time.perf_counter() - start:.1f} s")
        if correction == 0:
            print("\n" + str(tidal_compile.explain(model)) + "\n")

    dense = texts["dense attention"]
    for name, tokens in texts.items():
        same = int((tokens == dense).sum())
        print(f"{name:20s}: {decode(tokens)!r}  ({same}/{len(dense)} tokens as dense)")


if __name__ == "__main__":
    main()
