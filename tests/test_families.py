"""Every model family transformers can run with SDPA: the pass finds every attention layer, and
with a budget covering the context tidal gives the uncompiled model's greedy tokens and logits
over 32 decode steps (tiny random models built from each family's config, no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers

import tidal_compile
from models import VOCAB, greedy_decode, prompts

STEPS, PROMPT, CACHE_LEN = 32, 8, 48
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=256)
GQA = dict(num_key_value_heads=2)
MIXED = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]

# family: (config class, model class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", GQA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", GQA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(GQA, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(GQA, sliding_window=None)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(GQA, sliding_window=12)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(GQA, pad_token_id=0)),
    "gemma3_mixed_sliding": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                             dict(GQA, head_dim=16, sliding_window=12, layer_types=MIXED)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", GQA),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", GQA),
    "cohere": ("CohereConfig", "CohereForCausalLM", GQA),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", GQA),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2)),
}


def build(family: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    config_name, model_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **overrides}, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_budget_covering_the_context_equals_the_model(family):
    model = build(family)
    prompt, padding = prompts(2, PROMPT, True)
    expected_tokens, expected = greedy_decode(model, model, prompt, STEPS, CACHE_LEN, padding)
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    compiled = tidal_compile.compile(model, budget=CACHE_LEN, dense_layers=[0], selection_layers=[1],
                                     inner_backend="eager")
    tokens, logits = greedy_decode(compiled, model, prompt, STEPS, CACHE_LEN, padding)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    graphs = [g for g in tidal_compile.explain(model) if g.phase == "decode"]  # sliding layers: 2, once full
    assert graphs
    for decode in graphs:
        assert [r.layer for r in decode.layers] == [0, 1, 2, 3], "the pass finds every attention layer"
        assert decode.count("unchanged") == 0, str(decode)
        if family == "gemma3_mixed_sliding":  # layers 0, 1, 3 slide, layer 2 attends to everything
            assert decode.count("sparse") == 1 and "another mask" in decode.layers[2].reason, str(decode)
        else:
            assert decode.count("sparse") == 2, str(decode)


def test_gemma2_attention_without_sdpa_is_named_and_left_alone():
    """Gemma-2 soft-caps its attention logits, which SDPA cannot (transformers 5.24 refuses SDPA
    for it): with eager attention nothing is rewritten, the output is the model's own, and
    warnings name the layers and the fix, before the first call and at compile time."""
    config = transformers.Gemma2Config(**COMMON, **GQA, head_dim=16, sliding_window=12, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    prompt, _ = prompts(1, PROMPT, False)
    expected_tokens, expected = greedy_decode(model, model, prompt, 4, CACHE_LEN)
    torch._dynamo.reset()
    with pytest.warns(tidal_compile.TidalFallbackWarning, match="the model's attention is 'eager'"):
        compiled = tidal_compile.compile(model, budget=8, inner_backend="eager")
    with pytest.warns(tidal_compile.TidalFallbackWarning, match=r"layers \[0, 1, 2, 3\]: attention computed "
                      "without scaled_dot_product_attention"):
        tokens, logits = greedy_decode(compiled, model, prompt, 4, CACHE_LEN)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, masks", [("llama", 1), ("qwen2", 1), ("mistral_sliding_window", 1),
                                           ("gemma3_mixed_sliding", 2)])
def test_decode_graph_reads_one_copy_of_each_mask(family, masks):
    """Hugging Face builds a decode step's mask once per attention kind: the rewritten graph copies
    each once (`tidal::materialized_mask`, so Inductor does not recompute it per layer) and every
    layer reads its kind's copy. A transformers release that rebuilt or sliced the mask per layer
    would multiply the copies and fail here."""
    from tidal_compile.backend import tidal_backend

    graphs = []

    def keep_graph(gm, example_inputs):
        compiled = tidal_backend(gm, example_inputs, options=dict(mode="full", inner_backend="eager"))
        graphs.append(gm)
        return compiled

    model = build(family)
    prompt, padding = prompts(2, PROMPT, True)
    torch._dynamo.reset()
    greedy_decode(torch.compile(model, backend=keep_graph), model, prompt, 2, CACHE_LEN, padding)
    dense = torch.ops.tidal.dense_attention.default
    decode = [gm.graph for gm in graphs if any(n.target == dense for n in gm.graph.nodes)]
    assert decode
    for graph in decode:
        copies = [n for n in graph.nodes if n.target == torch.ops.tidal.materialized_mask.default]
        read = {n.args[3] for n in graph.nodes if n.target == dense}
        assert len(copies) == masks and read == set(copies), graph
