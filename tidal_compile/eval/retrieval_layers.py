"""Which layers retrieve: at the query `KEY k` of needle prompts, the share of each layer's
attention (mean over heads, and the largest head) on the needle's slot `KEY k v1..v5 .`.

    python -m tidal_compile.eval.retrieval_layers --model models/retrieval-llama --length 1024

A layer whose heads put most of their attention on the needle is where the model retrieves; it
is the layer whose top-k a tidal selection must cover (docs/quality.md).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from tidal_compile.eval import retrieval_data as data
from tidal_compile.eval.needle import load_model, needle_prompts


@torch.no_grad()
def needle_attention(model: torch.nn.Module, length: int, depths: list[float], cases: int) -> torch.Tensor:
    """[layers, 2]: mean over prompts of (mean over heads, max over heads) of the attention the
    last prompt position pays to the needle slot."""
    model.set_attn_implementation("eager")  # attention probabilities are returned by eager attention only
    language = data.FillerLanguage()
    rows = []
    for depth in depths:
        prompt, answer = needle_prompts(length, depth, cases, torch.device("cpu"), language)
        attentions = model(prompt, output_attentions=True).attentions  # per layer [B, H, L, L]
        starts = [next(i for i in range(len(r) - 2) if r[i] == data.KEY and r[i + 1] == r[-1]) for r in prompt.tolist()]
        needle = torch.zeros(prompt.shape, dtype=torch.bool)
        for b, start in enumerate(starts):
            needle[b, start:start + data.SLOT] = True
        per_layer = []
        for probs in attentions:
            share = (probs[:, :, -1, :] * needle[:, None, :]).sum(-1)  # [B, H]
            per_layer.append(torch.stack([share.mean(1), share.max(1).values], dim=-1).mean(0))
        rows.append(torch.stack(per_layer))
    return torch.stack(rows).mean(0)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args(argv)
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    shares = needle_attention(model, args.length, args.depths, args.cases)
    print(f"attention on the needle at the query ({args.length} tokens, depths {args.depths}, {args.cases} prompts each)")
    for layer, (mean, top) in enumerate(shares.tolist()):
        print(f"layer {layer:3d}  mean over heads {mean:.3f}  largest head {top:.3f}")


if __name__ == "__main__":
    main()
