"""tidal_compile.step_graph: decode steps replayed from one captured graph per sequence.

A CUDA graph needs a GPU; here a CPU stand-in captures (`replay_on_cpu`): its replays run the
captured step again over the same argument buffers and write the outputs into the first
replay's tensors, as a graph's replays overwrite its outputs. It does not stand in for what a
graph skips (the host's Python): `host_state` guards that, tested below with a cache that keeps
a Python counter. The real capture: tests/test_kernels_gpu.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import tidal_compile
from tidal_compile import ConfigError, TidalCache, TidalFallbackWarning
from tidal_compile.hf import compile_for_generation
from tidal_compile.step_graph import StepGraph, host_state
from models import CACHE, prompts, tiny_model

FAST = {"inner_backend": "eager"}
GENERATE = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True)


class ReplayOnCpu:
    """A CPU stand-in for `capture_cuda_graph` that counts captures and replays."""

    def __init__(self):
        self.captures = self.replays = 0

    def __call__(self, step):
        self.captures += 1
        kept = []

        def replay():
            self.replays += 1
            outputs = step()
            if not kept:
                kept.append(outputs)
            else:
                kept[0].logits.copy_(outputs.logits)
            return kept[0]

        return replay


def with_step_graph(model, capture):
    """compile_for_generation's model with its decode steps going through a StepGraph on `capture`
    (step_graphs=True itself needs a CUDA model)."""
    model.forward.step_graph = StepGraph(model.forward.compiled, capture=capture)
    return model


def setup(family="llama", config=None, **options):
    """A tiny model of `family` (`config`: its config overrides) set up by compile_for_generation."""
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    model = tiny_model(family, layers=5, **(config or {}))
    return compile_for_generation(model, budget=6, selection_layers=[2], **FAST, **options)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck),
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(batch=st.integers(1, 2), padded=st.booleans(), interval=st.sampled_from([0, 2]),
       mode=st.sampled_from(["tidal", "quest"]))
def test_generate_through_a_step_graph_equals_the_compiled_forward(batch, padded, interval, mode):
    """Replayed steps (the mask padded to the cache, arguments copied into buffers) give the
    compiled forward's tokens and logits, correction on and off, over two generate calls (each
    call's cache captured anew)."""
    options = dict(mode=mode, correction={"interval": interval}, **({"page_size": 2} if mode == "quest" else {}))
    prompt, padding = prompts(batch, 14, padded)
    kwargs = dict(attention_mask=None if padding is None else padding.long(), **GENERATE)
    want = setup(**options).generate(prompt, **kwargs)
    capture = ReplayOnCpu()
    model = with_step_graph(setup(**options), capture)
    assert "no decode step captured yet" in str(tidal_compile.explain(model))
    for _ in range(2):
        got = model.generate(prompt, **kwargs)
        assert got.sequences.shape[1] == prompt.shape[1] + GENERATE["max_new_tokens"]
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=0, atol=0)
    assert capture.captures == 2, "one capture per generate call (a new cache each)"
    assert capture.replays == 2 * (GENERATE["max_new_tokens"] - 2), "every step after a call's first decode replays"
    assert "replayed from one CUDA graph per sequence (2 captures so far)" in str(tidal_compile.explain(model))


def decode_steps(model, steps, cache=None, length=10, seed=0):
    """Prefill a prompt of `length` and `steps` greedy decode steps through model.forward, with
    generate's growing 2-D mask; every output kept."""
    prompt, _ = prompts(1, length, False, seed=seed)
    cache = cache if cache is not None else TidalCache(model.config, max_cache_len=32)
    outputs = [model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **{CACHE: cache})]
    for position in range(length, length + steps):
        token = outputs[-1].logits[:, -1:].argmax(-1)
        outputs.append(model(input_ids=token, position_ids=torch.tensor([[position]]),
                             attention_mask=torch.ones(1, position + 1, dtype=torch.long), use_cache=True,
                             **{CACHE: cache}))
    return outputs


def test_replays_serve_a_reset_cache_and_leave_the_callers_outputs_alone():
    """The same cache, reset for a shorter sequence, replays the same graph (the mask columns the
    longer sequence set lie past the shorter one's queries); a replay overwrites the graph's
    outputs, and what earlier steps returned stays as it was."""
    def two_sequences(model):
        cache = TidalCache(model.config, max_cache_len=32)
        first = decode_steps(model, 4, cache, length=20, seed=1)
        cache.reset()
        return first + decode_steps(model, 4, cache, length=9, seed=2)

    with torch.no_grad():
        expected = [out.logits.clone() for out in two_sequences(setup())]
        capture = ReplayOnCpu()
        got = two_sequences(with_step_graph(setup(), capture))
    assert capture.captures == 1 and capture.replays == 7  # all but the first decode step replay
    for out, want in zip(got, expected):
        torch.testing.assert_close(out.logits, want, rtol=0, atol=0)


def test_a_cache_that_keeps_host_state_decodes_without_the_graph():
    """transformers' sliding-window layers count their length in a Python int, which a replay would
    not advance: the warm-up step shows it, and the sequence decodes with the compiled forward."""
    prompt, _ = prompts(1, 12, False)
    sliding = dict(use_sliding_window=True, sliding_window=32, layer_types=["sliding_attention"] * 5)
    expected = setup("qwen2", sliding).generate(prompt, **GENERATE)
    capture = ReplayOnCpu()
    model = with_step_graph(setup("qwen2", sliding), capture)
    with pytest.warns(TidalFallbackWarning, match="changes the cache's host-side state"):
        got = model.generate(prompt, **GENERATE)
    assert torch.equal(got.sequences, expected.sequences)
    assert capture.captures == 0
    assert "decoded with the compiled forward: a decode step changes" in str(tidal_compile.explain(model))


def test_host_state_leaves_out_tensors_and_tidal_bookkeeping():
    model = tiny_model("llama", layers=2)
    cache = TidalCache(model.config, max_cache_len=8)
    state = host_state(cache)
    assert len(state) == 3  # the cache and its two layers
    assert "sequence" not in state[0]
    assert not any(isinstance(v, torch.Tensor) for holder in state for v in holder.values())


def test_a_step_that_cannot_be_captured_decodes_without_the_graph():
    def refuse(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    prompt, _ = prompts(1, 12, False)
    expected = setup().generate(prompt, **GENERATE)
    model = with_step_graph(setup(), refuse)
    with pytest.warns(TidalFallbackWarning, match="cannot be captured in one CUDA graph .operation not permitted"):
        got = model.generate(prompt, **GENERATE)
    assert torch.equal(got.sequences, expected.sequences)
    assert "cannot be captured" in str(tidal_compile.explain(model))


def test_a_moved_cache_tensor_is_captured_anew():
    """A cache tensor re-allocated between steps (beam search reorders by re-allocating) changes the
    signature: the step is captured again, never replayed over the old addresses."""
    capture = ReplayOnCpu()
    model = with_step_graph(setup(), capture)
    prompt, _ = prompts(1, 10, False)
    cache = TidalCache(model.config, max_cache_len=24)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **{CACHE: cache})
        for position in range(10, 14):
            if position == 12:
                layer = cache.layers[3]
                layer.keys = layer.keys.clone()
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, position_ids=torch.tensor([[position]]), use_cache=True, **{CACHE: cache})
    assert capture.captures == 2
    assert capture.replays == 2  # steps 11 and 13


def test_a_sequence_that_keeps_moving_its_cache_is_warned_about_once():
    """Every step re-allocates a cache tensor: every step captures anew, and the third recapture of
    the one sequence warns (once) that step_graphs gains nothing there."""
    capture = ReplayOnCpu()
    model = with_step_graph(setup(), capture)
    prompt, _ = prompts(1, 10, False)
    cache = TidalCache(model.config, max_cache_len=24)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=prompt, use_cache=True, **{CACHE: cache})
        for position in range(10, 16):
            layer = cache.layers[3]
            layer.keys = layer.keys.clone()
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, position_ids=torch.tensor([[position]]), use_cache=True, **{CACHE: cache})
    anew = [w for w in caught if issubclass(w.category, TidalFallbackWarning) and "anew 3 times" in str(w.message)]
    assert len(anew) == 1
    assert (capture.captures, capture.replays) == (6, 0)


def test_beam_search_decodes_without_the_graph_with_a_warning():
    prompt, _ = prompts(1, 10, False)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False)
    expected = setup().generate(prompt, **kwargs)
    capture = ReplayOnCpu()
    model = with_step_graph(setup(), capture)
    with pytest.warns(TidalFallbackWarning, match="step_graphs does not support beam search"):
        got = model.generate(prompt, **kwargs)
    assert torch.equal(got, expected)
    assert capture.captures == 0
    assert model.forward.step_graph is not None, "the graph comes back for the next call"
    assert "compiled forward: beam search" in str(tidal_compile.explain(model))


def test_step_graph_options_are_checked():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ConfigError, match="step_graphs=True needs the model on a CUDA GPU"):
        compile_for_generation(model, budget=8, step_graphs=True)
    with pytest.raises(ConfigError, match="both capture the decode steps"):
        compile_for_generation(model, budget=8, step_graphs=True, cudagraphs=True)
    with pytest.raises(ConfigError, match="step_graphs must be True or False"):
        compile_for_generation(model, budget=8, step_graphs="yes")


def test_generate_lets_go_of_its_cache():
    """The captured graph's outputs hold the cache; generate releases them when it returns, so the
    cache is freed with the caller's last reference."""
    import gc
    import weakref

    model = with_step_graph(setup(), ReplayOnCpu())
    prompt, _ = prompts(1, 10, False)
    out = model.generate(prompt, **GENERATE)
    cache = weakref.ref(out.past_key_values)
    del out
    gc.collect()
    assert cache() is None
