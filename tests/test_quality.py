"""The shipped retrieval model (`models/retrieval-llama`, trained by examples/train_retrieval.py):
on short needle prompts, tidal with a budget well below the context answers every case that
full attention answers, through `compile_for_generation` and `generate` on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import StaticCache

from tidal_compile.eval import retrieval_data as data
from tidal_compile.eval.needle import load_model, needle_prompts
from tidal_compile.hf import compile_for_generation

MODEL = Path(__file__).resolve().parents[1] / "models" / "retrieval-llama"
LENGTH, BUDGET, DEPTHS, CASES = 768, 64, (0.1, 0.5, 0.9), 4


def _answers(model, prompts) -> list[bool]:
    hits = []
    for prompt, answer in prompts:
        cache = StaticCache(config=model.config, max_cache_len=LENGTH + data.VALUE_TOKENS)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                             max_new_tokens=data.VALUE_TOKENS, min_new_tokens=data.VALUE_TOKENS, do_sample=False,
                             pad_token_id=data.PAD)
        hits += (out[:, -data.VALUE_TOKENS:] == answer).all(dim=1).tolist()
    return hits


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="the shipped model is missing")
def test_tidal_answers_the_needles_full_attention_answers():
    language = data.FillerLanguage()
    prompts = [needle_prompts(LENGTH, depth, CASES, torch.device("cpu"), language) for depth in DEPTHS]
    full = _answers(load_model(MODEL, torch.device("cpu"), torch.float32), prompts)
    assert sum(full) >= 0.75 * len(full), f"the shipped model itself fails the needles: {full}"
    torch._dynamo.reset()
    model = compile_for_generation(load_model(MODEL, torch.device("cpu"), torch.float32), mode="tidal",
                                   budget=BUDGET, inner_backend="aot_eager")
    tidal = _answers(model, prompts)
    missed = [i for i, (f, t) in enumerate(zip(full, tidal)) if f and not t]
    assert not missed, f"tidal (budget {BUDGET}, context {LENGTH}) missed cases {missed} that full attention answers"
