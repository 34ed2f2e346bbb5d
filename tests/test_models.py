"""Whole Hugging Face decoders compiled with backend="tidal", against eager and the test-side
patched TidalDecode (tiny random-init Llama / Qwen2 / Mistral, GQA and MHA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import tidal_compile
from models import VOCAB, greedy_decode, prompts, tiny_model
from patched_attention import LayerPlan, patched

heads_and_kv = st.sampled_from([(4, 2), (4, 4), (4, 1), (6, 2)])  # GQA, MHA, MQA, G = 3
families = st.sampled_from(["llama", "qwen2", "mistral"])
# Whole-model examples cost seconds each: no shrinking, so a failure reports its example at once.
model_settings = settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck),
                          phases=(Phase.explicit, Phase.reuse, Phase.generate))


def compile_tidal(model, **options):
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    return torch.compile(model, backend="tidal", options=options)


def decode_report(model):
    graphs = [g for g in tidal_compile.explain(model) if g.phase == "decode"]
    assert len(graphs) == 1, f"expected one decode graph, got {tidal_compile.explain(model)}"
    return graphs[0]


def check_budget_covering_context(family, heads, kv_heads, layers, granularity, batch, padded, inner,
                                  device="cpu", eager_prefill=False, **options):
    model = tiny_model(family, layers=layers, heads=heads, kv_heads=kv_heads).to(device)
    prompt, padding = prompts(batch, 8, padded, seed=layers, device=device)
    steps, cache_len = 32, 48
    eager_tokens, eager_logits = greedy_decode(model, model, prompt, steps, cache_len, padding)
    compiled = compile_tidal(model, budget=cache_len, granularity=granularity, inner_backend=inner, **options)
    tokens, logits = greedy_decode(compiled, model, prompt, steps, cache_len, padding,
                                   prefill=model if eager_prefill else None, page_size=options.get("page_size"))
    report = decode_report(model)
    rewritten = "quest" if options.get("mode") == "quest" else "sparse"
    assert report.count(rewritten) > 0 and report.count("unchanged") == 0, str(report)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, eager_tokens)


@model_settings
@given(family=families, heads_kv=heads_and_kv, layers=st.integers(4, 8),
       granularity=st.sampled_from(["query_head", "kv_head", "layer"]), batch=st.integers(1, 2),
       padded=st.booleans())
def test_budget_covering_context_equals_eager(family, heads_kv, layers, granularity, batch, padded):
    """(a) k >= every valid length: each decode step's logits equal eager, tokens identical."""
    check_budget_covering_context(family, *heads_kv, layers, granularity, batch, padded, "eager")


@pytest.mark.slow
def test_budget_covering_context_equals_eager_inductor():
    """(a) once through the real Inductor compile (slow on CPU)."""
    check_budget_covering_context("llama", 4, 2, 6, "kv_head", 2, True, "inductor")


def check_against_patched_model(family, heads, kv_heads, layers, granularity, budget, batch, padded, inner,
                                mode="tidal"):
    model = tiny_model(family, layers=layers, heads=heads, kv_heads=kv_heads, dtype=torch.float64)
    prompt, padding = prompts(batch, 24, padded, seed=budget)
    steps, cache_len = 8, 40
    dense, selection = (0, 1), ((2,) if layers < 6 else (2, layers - 2))  # each feeds a sparse layer
    compiled = compile_tidal(model, budget=budget, granularity=granularity, dense_layers=list(dense),
                             selection_layers=list(selection), inner_backend=inner, mode=mode)
    tokens, logits = greedy_decode(compiled, model, prompt, steps, cache_len, padding)
    report = decode_report(model)
    expected_sparse = 0 if mode != "tidal" else layers - 2 - len(selection)
    assert report.count("sparse") == expected_sparse and report.count("dense") == 2, str(report)
    plan = LayerPlan(layers, dense, selection, budget, granularity, mode=mode)
    with patched(model, plan):
        _, expected = greedy_decode(model, model, prompt, steps, cache_len, padding, tokens=tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
    eager_tokens, eager_logits = greedy_decode(model, model, prompt, steps, cache_len, padding, tokens=tokens)
    assert (eager_logits - logits).abs().max() > 1e-4, "budget < length must change the output"


@model_settings
@given(family=families, heads_kv=heads_and_kv, layers=st.integers(5, 8),
       granularity=st.sampled_from(["query_head", "kv_head", "layer"]), budget=st.integers(2, 12),
       batch=st.integers(1, 2), padded=st.booleans())
def test_sparse_model_equals_layer_by_layer_patch(family, heads_kv, layers, granularity, budget, batch, padded):
    """(d) k < length: the compiled model equals a test-side TidalDecode patched per layer."""
    check_against_patched_model(family, *heads_kv, layers, granularity, budget, batch, padded, "eager")


def test_topk_oracle_mode_equals_patch():
    check_against_patched_model("llama", 4, 2, 5, "kv_head", 6, 2, True, "aot_eager", mode="topk_oracle")


@pytest.mark.slow
def test_sparse_model_equals_patch_inductor():
    """(d) once through the real Inductor compile (slow on CPU)."""
    check_against_patched_model("qwen2", 4, 2, 6, "query_head", 6, 2, True, "inductor")


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(pads=st.lists(st.integers(0, 10), min_size=2, max_size=3), budget=st.integers(3, 10),
       granularity=st.sampled_from(["query_head", "kv_head", "layer"]), seed=st.integers(0, 99))
def test_a_rows_output_does_not_depend_on_the_other_rows(pads, budget, granularity, seed):
    """Batched decoding with left padding of different lengths per row (budget below the
    context): changing every other row's tokens and padding leaves row 0's logits as they were."""
    model = tiny_model("llama", layers=5)
    length = 16
    compiled = compile_tidal(model, budget=budget, granularity=granularity, selection_layers=[2], inner_backend="eager")

    def row0_logits(pads, seed):
        prompt, _ = prompts(len(pads), length, False, seed=seed)
        prompt[0] = prompts(1, length, False, seed=0)[0][0]  # row 0 is always the same
        padding = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
        tokens = torch.arange(6).repeat(len(pads), 1) % VOCAB
        return greedy_decode(compiled, model, prompt, 6, 32, padding, tokens=tokens)[1][:, 0]

    changed = [pads[0]] + [(p + 3) % 11 for p in pads[1:]]
    torch.testing.assert_close(row0_logits(changed, seed + 1), row0_logits(pads, seed), rtol=1e-5, atol=1e-5)


def test_dynamic_compile_rewrites_and_serves_several_cache_lengths():
    """torch.compile(dynamic=True): head counts and scale are specialised (guards), the cache
    length stays symbolic on the CPU, and one decode graph serves two cache lengths, equal to
    the layer-by-layer TidalDecode patch."""
    model = tiny_model("llama", layers=4, dtype=torch.float64)
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    compiled = torch.compile(model, backend="tidal", dynamic=True,
                             options={"budget": 6, "selection_layers": [2], "inner_backend": "eager"})
    plan = LayerPlan(4, (0, 1), (2,), 6, "query_head")
    for cache_len in (40, 72):
        prompt, padding = prompts(2, 24, True)
        tokens, logits = greedy_decode(compiled, model, prompt, 4, cache_len, padding)
        with patched(model, plan):
            _, expected = greedy_decode(model, model, prompt, 4, cache_len, padding, tokens=tokens)
        torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
    assert [g.count("sparse") for g in tidal_compile.explain(model) if g.phase == "decode"] == [1]
