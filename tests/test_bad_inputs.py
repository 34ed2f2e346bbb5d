"""Bad input gets a clear error naming the problem (or a documented dense fallback with a
warning) before any kernel runs; each case of docs/testing.md's table is here or named there."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import tidal_compile
from models import CACHE, greedy_decode, prompts, tiny_model


def test_a_prompt_longer_than_the_static_cache_is_named_at_compile_time():
    model = tiny_model("llama", layers=2)
    torch._dynamo.reset()
    compiled = tidal_compile.compile(model, budget=4, dense_layers=[0], selection_layers=[1])  # Inductor
    prompt, _ = prompts(1, 12, False)
    with pytest.raises(Exception, match="a KV-cache write of 12 positions into a cache of 8 .* max_cache_len"):
        compiled(input_ids=prompt, use_cache=True, **{CACHE: StaticCache(config=model.config, max_cache_len=8)})


def test_a_budget_larger_than_the_cache_keeps_every_position():
    model = tiny_model("llama", layers=4)
    prompt, padding = prompts(2, 10, True)
    tokens, expected = greedy_decode(model, model, prompt, 6, 24, padding)
    torch._dynamo.reset()
    compiled = tidal_compile.compile(model, budget=4096, selection_layers=[2], inner_backend="eager")
    _, logits = greedy_decode(compiled, model, prompt, 6, 24, padding, tokens=tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_a_model_without_generate_is_refused_by_compile_for_generation():
    from tidal_compile.hf import compile_for_generation

    with pytest.raises(TypeError, match="needs a decoder-only model with generate"):
        compile_for_generation(torch.nn.Linear(2, 2), budget=4)


def test_decoding_past_the_end_of_a_plain_static_cache_is_named_on_the_cpu():
    """transformers' StaticCache with the bare backend: the write past its end raises tidal's
    message (a check before the write), not an index error inside an Inductor kernel."""
    model = tiny_model("llama", layers=2)
    torch._dynamo.reset()
    compiled = tidal_compile.compile(model, budget=4, dense_layers=[0], selection_layers=[1])  # Inductor
    prompt, _ = prompts(1, 6, False)
    with pytest.raises(Exception, match="a KV-cache write past the end of the static cache \\(8 positions\\)"):
        greedy_decode(compiled, model, prompt, 4, 8)
