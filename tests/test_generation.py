"""tidal_compile.hf: KV-cache correction, generate integration, and the not-yet-supported cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from transformers import StaticCache

import tidal_compile
from tidal_compile import ConfigError, TidalCache, TidalFallbackWarning
from tidal_compile.hf import compile_for_generation
from models import CACHE, greedy_decode, prompts, tiny_model

FAST = {"inner_backend": "eager"}
slow_settings = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck),
                         phases=(Phase.explicit, Phase.reuse, Phase.generate))


def fresh(model):
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    return model


def eager(model):
    """The model's own (dense, uncompiled) forward, whatever model.forward was replaced by."""
    return lambda **kwargs: type(model).forward(model, **kwargs)


def dense_cache(model, tokens, padding, cache_len, padded_positions=True):
    """Cache entries of one dense prefill over `tokens`: the K/V a dense-only run writes.
    Positions skip left padding as in `greedy_decode`, or, like transformers' generate, count
    every slot (`padded_positions=False`)."""
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    mask = torch.ones(tokens.shape[0], cache_len, dtype=torch.long)
    if padding is not None:
        mask[:, : padding.shape[1]] = padding.long()
    position = (mask[:, : tokens.shape[1]].cumsum(-1) - 1).clamp(min=0)
    if not padded_positions:
        position = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        eager(model)(input_ids=tokens, attention_mask=mask, position_ids=position, **{CACHE: cache})
    return cache


def run_with_correction(interval, steps, batch, padded, budget=4):
    model = fresh(tiny_model("llama", layers=6))
    compile_for_generation(model, budget=budget, selection_layers=[2], correction={"interval": interval}, **FAST)
    prompt, padding = prompts(batch, 20, padded)
    cache_len = 20 + steps + 2
    cache = TidalCache(model.config, max_cache_len=cache_len)
    tokens, _ = greedy_decode(model, model, prompt, steps, cache_len, padding, cache=cache)
    sequence = torch.cat([prompt, tokens], dim=1)
    return model, cache, dense_cache(model, sequence, padding, cache_len), prompt.shape[1]


@slow_settings
@given(interval=st.integers(1, 4), steps=st.integers(2, 10), batch=st.integers(1, 2), padded=st.booleans())
def test_corrected_entries_equal_a_dense_run(interval, steps, batch, padded):
    """After each correction the rewritten cache entries are the K/V a dense-only run writes."""
    _, cache, dense, start = run_with_correction(interval, steps, batch, padded)
    corrected = interval * ((steps - 1) // interval)  # corrections run before steps interval+1, 2*interval+1, ...
    end = start + corrected
    for ours, ref in zip(cache.layers, dense.layers):
        torch.testing.assert_close(ours.keys[:, :, :end], ref.keys[:, :, :end], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.values[:, :, :end], ref.values[:, :, :end], rtol=1e-4, atol=1e-4)
    polluted = max((ours.keys[:, :, end:start + steps] - ref.keys[:, :, end:start + steps]).abs().max().item()
                   for ours, ref in zip(cache.layers[3:], dense.layers[3:]))
    assert polluted > 1e-4, "entries written by sparse steps (not yet corrected) differ from dense"


def test_interval_one_writes_dense_kv():
    steps = 8
    _, cache, dense, start = run_with_correction(1, steps, 2, True)
    end = start + steps - 1  # every entry but the last step's has been corrected
    for ours, ref in zip(cache.layers, dense.layers):
        torch.testing.assert_close(ours.keys[:, :, :end], ref.keys[:, :, :end], rtol=1e-4, atol=1e-4)


def test_without_correction_entries_stay_polluted():
    _, cache, dense, start = run_with_correction(0, 6, 1, False)
    assert (cache.layers[5].keys[:, :, start:start + 5] - dense.layers[5].keys[:, :, start:start + 5]).abs().max() > 1e-4


@pytest.mark.parametrize("interval", [0, 3])
def test_generate_through_compile_for_generation(interval):
    """model.generate with tidal (k >= length) gives eager's tokens, correction on and off, and
    the decode steps run the rewritten graph."""
    model = fresh(tiny_model("llama", layers=6))
    prompt, padding = prompts(2, 12, True)
    mask = padding.long()
    expected = model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              cache_implementation="static")
    compile_for_generation(model, budget=64, correction={"interval": interval}, **FAST)
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, expected)
    decode = [g for g in tidal_compile.explain(model) if g.phase == "decode"]
    assert len(decode) == 1, "one decode graph serves every step (no recompile per token)"
    assert decode[0].count("sparse") > 0


def test_a_guard_filter_reaches_dynamo_and_keeps_the_tokens():
    """compile_for_generation passes guard_filter_fn to torch.compile: Dynamo calls it with the
    decode graph's guards, and dropping the module guards changes no token."""
    model = fresh(tiny_model("llama", layers=4))
    prompt, _ = prompts(1, 10, False)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    seen = []

    def skip_module_guards(entries):
        seen.append(len(entries))
        return torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)

    compile_for_generation(model, budget=64, guard_filter_fn=skip_module_guards, **FAST)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    assert seen and min(seen) > 0
    with pytest.raises(ConfigError, match="guard_filter_fn must be a function"):
        compile_for_generation(fresh(tiny_model("llama", layers=4)), budget=64, guard_filter_fn="nn_modules")


def test_generate_with_transformers_compile_config():
    """generate(compile_config=CompileConfig(backend="tidal", ...)) compiles with tidal."""
    from transformers import CompileConfig

    model = fresh(tiny_model("qwen2", layers=5))
    prompt, _ = prompts(1, 10, False)
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    config = CompileConfig(backend="tidal", mode=None, fullgraph=False, options={"budget": 64, **FAST})
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static",
                         compile_config=config)
    assert torch.equal(out, expected)
    assert any(g.phase == "decode" and g.count("sparse") > 0 for g in tidal_compile.explain(model))


def test_beam_search_runs_without_correction_with_a_warning():
    model = fresh(tiny_model("llama", layers=6))
    prompt, _ = prompts(1, 10, False)
    expected = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, cache_implementation="static")
    compile_for_generation(model, budget=64, correction={"interval": 2}, **FAST)
    with pytest.warns(TidalFallbackWarning, match="does not support beam search"):
        out = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(out, expected)
    assert model.forward.interval == 2, "correction comes back for the next call"


def test_dynamic_cache_runs_dense_with_a_warning():
    model = fresh(tiny_model("llama", layers=5))
    prompt, _ = prompts(1, 10, False)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    compile_for_generation(model, budget=4, **FAST)
    with pytest.warns(TidalFallbackWarning, match="needs a static cache"):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="dynamic")
    assert torch.equal(out, expected)
    assert tidal_compile.explain(model) == [], "nothing was compiled for the dense call"


def test_a_sliding_window_layer_never_reuses_full_attention_indices():
    """Layer 3 is sliding-window, its selection layer 2 full attention: compile_for_generation
    names it before the first call, the config stays as given, and the pass keeps it dense;
    the full-attention layers after it reuse layer 2's indices."""
    layer_types = ["full_attention"] * 3 + ["sliding_attention"] + ["full_attention"] * 2
    model = fresh(tiny_model("qwen2", layers=6, layer_types=layer_types, sliding_window=6, use_sliding_window=True))
    with pytest.warns(TidalFallbackWarning, match=r"layers \[3\] will stay dense: their selection layer"):
        compile_for_generation(model, budget=4, selection_layers=[2], **FAST)
    prompt, _ = prompts(1, 12, False)
    with pytest.warns(TidalFallbackWarning, match="layer 3 stays dense: dense fallback: attends under another mask"):
        model.generate(prompt, max_new_tokens=3, do_sample=False)
    decode = next(g for g in tidal_compile.explain(model) if g.phase == "decode")
    kinds = {r.layer: r.kind for r in decode.layers}
    assert (kinds[2], kinds[3], kinds[4], kinds[5]) == ("selection", "dense", "sparse", "sparse")


def test_encoder_decoder_models_stay_dense_with_a_warning():
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32)).eval()
    forward = model.forward
    with pytest.warns(TidalFallbackWarning, match="encoder-decoder models are not supported"):
        assert compile_for_generation(model, budget=4) is model
    assert model.forward == forward


def test_layer_sets_are_checked_against_the_model_at_setup():
    model = tiny_model("llama", layers=4)
    with pytest.raises(tidal_compile.ConfigError, match="selection_layers: layer 4 is out of range"):
        compile_for_generation(model, selection_layers=[2, 4])


def test_plain_torch_compile_of_forward_with_static_cache_generate():
    """The README's usage: model.forward = torch.compile(..., backend="tidal"), then generate."""
    model = fresh(tiny_model("mistral", layers=5, kv_heads=4))
    prompt, _ = prompts(1, 10, False)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend="tidal", options={"budget": 64, **FAST})
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(out, expected)
    assert any(g.phase == "decode" and g.count("sparse") > 0 for g in tidal_compile.explain(model))


@pytest.mark.parametrize("padded", [False, True])
def test_correction_inside_generate_writes_dense_kv(padded):
    """Through model.generate (4-D mask built by transformers), corrected entries equal a dense run's."""
    model = fresh(tiny_model("llama", layers=6))
    compile_for_generation(model, budget=4, selection_layers=[2], correction={"interval": 3}, **FAST)
    prompt, padding = prompts(2, 16, padded)
    steps, cache_len = 8, 30
    cache = TidalCache(model.config, max_cache_len=cache_len)
    mask = padding.long() if padding is not None else torch.ones_like(prompt)
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=steps + 1, do_sample=False, **{CACHE: cache})
    sequence = out[:, : 16 + steps]
    dense = dense_cache(model, sequence, padding, cache_len, padded_positions=False)
    end = 16 + 3 * ((steps - 1) // 3)
    for ours, ref in zip(cache.layers, dense.layers):
        torch.testing.assert_close(ours.keys[:, :, :end], ref.keys[:, :, :end], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.values[:, :, :end], ref.values[:, :, :end], rtol=1e-4, atol=1e-4)
    polluted = (cache.layers[5].keys[:, :, end:16 + steps] - dense.layers[5].keys[:, :, end:16 + steps]).abs().max()
    assert polluted > 1e-4, "the steps since the last correction were sparse, so the test can fail"


def test_one_token_prompt_starts_a_new_sequence():
    """A one-token prompt goes through the decode graph; correction must still anchor on it and
    not on the previous sequence's tokens."""
    model = fresh(tiny_model("llama", layers=6))
    compile_for_generation(model, budget=4, selection_layers=[2], correction={"interval": 2}, **FAST)
    first, _ = prompts(1, 12, False, seed=1)
    model.generate(first, max_new_tokens=5, do_sample=False)  # leaves steps pending
    prompt, _ = prompts(1, 1, False, seed=2)
    cache = TidalCache(model.config, max_cache_len=16)
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, **{CACHE: cache})
    dense = dense_cache(model, out[:, :10], None, 16)
    end = 1 + 2 * ((9 - 1) // 2)
    for ours, ref in zip(cache.layers, dense.layers):
        torch.testing.assert_close(ours.keys[:, :, :end], ref.keys[:, :, :end], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt_length", [1, 8])
def test_sequence_starts_run_the_prefill_forward(prompt_length):
    """A prompt, or a one-token prompt into a new TidalCache, runs `prefill`; decode steps run the
    compiled forward (with cudagraphs, prefill is the uncompiled forward: tests/test_kernels_gpu.py)."""
    from tidal_compile.hf import TidalForward

    model = fresh(tiny_model("llama", layers=4))
    calls = []

    def recording(name):
        return lambda **kwargs: calls.append(name) or eager(model)(**kwargs)

    forward = TidalForward(recording("compiled"), 0, prefill=recording("prefill"))
    prompt, _ = prompts(1, prompt_length, False)
    greedy_decode(forward, model, prompt, 3, 16, cache=TidalCache(model.config, max_cache_len=16))
    assert calls == ["prefill"] + ["compiled"] * 3


def test_cuda_graphs_without_a_gpu_are_a_clear_error():
    model = fresh(tiny_model("llama", layers=4))
    with pytest.raises(tidal_compile.ConfigError, match="cudagraphs=True needs the model on a CUDA GPU"):
        compile_for_generation(model, budget=8, cudagraphs=True)
    compiled = torch.compile(model, backend="tidal", options={"cudagraphs": True})
    prompt, _ = prompts(1, 4, False)
    with pytest.raises(Exception, match="cudagraphs=True needs a CUDA GPU"):
        compiled(prompt)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@pytest.mark.parametrize("rounds", [1, 3])
def test_generate_counts_one_correction_per_interval(name, rounds):
    """A generate call of rounds x interval decode steps corrects `rounds` - 1 times (the last
    round's steps are still pending when generation ends), whichever name the cache comes under."""
    if name == "cache" and CACHE != "cache":
        pytest.skip("this transformers release takes the cache as past_key_values only")
    model = fresh(tiny_model("llama", layers=6))
    compile_for_generation(model, budget=4, selection_layers=[2], correction={"interval": 3}, **FAST)
    prompt, _ = prompts(1, 10, False)
    cache = TidalCache(model.config, max_cache_len=40)
    model.generate(prompt, max_new_tokens=3 * rounds + 1, do_sample=False, **{name: cache})
    assert (cache.sequence.length, cache.sequence.corrections) == (10 + 3 * rounds, rounds - 1)


def test_correction_with_a_plain_static_cache_warns():
    model = fresh(tiny_model("llama", layers=5))
    compile_for_generation(model, budget=4, selection_layers=[2], correction={"interval": 2}, **FAST)
    prompt, _ = prompts(1, 10, False)
    with pytest.warns(TidalFallbackWarning, match="decodes without correction"):
        model.generate(prompt, max_new_tokens=4, do_sample=False,
                       **{CACHE: StaticCache(config=model.config, max_cache_len=20)})


def test_decoding_past_the_cache_is_a_clear_error():
    model = fresh(tiny_model("llama", layers=4))
    compile_for_generation(model, budget=4, **FAST)
    prompt, _ = prompts(1, 10, False)
    with pytest.raises(ValueError, match="needs 13 cache positions .* TidalCache holds 12"):
        model.generate(prompt, max_new_tokens=5, do_sample=False, **{CACHE: TidalCache(model.config, max_cache_len=12)})
    with pytest.raises(ValueError, match="needs 10 cache positions"):
        model.generate(prompt, max_new_tokens=5, do_sample=False, **{CACHE: TidalCache(model.config, max_cache_len=8)})
