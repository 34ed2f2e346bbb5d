"""Generate with TidalDecode on the CPU: the project's retrieval model, `model.generate`,
backend="tidal".

    python examples/generate_cpu.py [--length 1024] [--depth 0.3] [--budget 64]

`models/retrieval-llama` (12 layers, trained by examples/train_retrieval.py; docs/quality.md)
reads a haystack of filler sentences holding one fact `KEY k v1 v2 v3 v4 v5 .` and is asked
`KEY k`: the answer is the fact's five values. The example prints the explain report (which
layers became dense / selection / sparse, and why) and the answers under dense attention,
tidal with this model's layer choice (examples/retrieval_llama.yaml), the same with KV-cache
correction, and tidal with the paper's default layers, all at a budget far below the context.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import tidal_compile
from tidal_compile.eval import retrieval_data as data
from tidal_compile.hf import compile_for_generation

ROOT = Path(__file__).resolve().parent.parent


def names(tokens: torch.Tensor) -> str:
    return " ".join(data.token_name(t) for t in tokens.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "retrieval-llama"))
    parser.add_argument("--length", type=int, default=1024, help="prompt length (tokens)")
    parser.add_argument("--depth", type=float, default=0.3, help="where the fact sits (0 = start, 1 = end)")
    parser.add_argument("--budget", type=int, default=64, help="positions each sparse layer attends to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    prompt, answer = data.needle_batch(data.FillerLanguage(), 1, args.length, args.depth, gen, torch.device("cpu"))
    print(f"prompt: {prompt.shape[1]} tokens, ending `{names(prompt[0, -2:])}`; the fact: "
          f"`KEY {data.token_name(int(prompt[0, -1]))} {names(answer[0])}` at depth {args.depth}; "
          f"budget {args.budget}")
    config = str(Path(__file__).with_name("retrieval_llama.yaml"))
    settings = {
        "dense attention": None,
        "tidal (retrieval_llama.yaml)": dict(config=config, budget=args.budget),
        "tidal + correction every 2": dict(config=config, budget=args.budget, correction={"interval": 2}),
        "tidal, paper default layers": dict(mode="tidal", budget=args.budget),
    }
    answers = {}
    for name, options in settings.items():
        torch._dynamo.reset()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        if options is not None:
            compile_for_generation(model, **options)
        start = time.perf_counter()
        print(f"{name}: generating (Inductor compiles prefill and decode graphs on first use) ..." if options else
              f"{name}: generating ...", flush=True)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=data.VALUE_TOKENS,
                             min_new_tokens=data.VALUE_TOKENS, do_sample=False, pad_token_id=data.PAD,
                             cache_implementation="static")
        answers[name] = out[0, prompt.shape[1]:]
        print(f"  {time.perf_counter() - start:.1f} s")
        if name == "tidal (retrieval_llama.yaml)":
            print("\n" + str(tidal_compile.explain(model)) + "\n")

    for name, tokens in answers.items():
        verdict = "correct" if torch.equal(tokens, answer[0]) else "wrong"
        print(f"{name:30s}: {names(tokens):20s} {verdict}")


if __name__ == "__main__":
    main()
