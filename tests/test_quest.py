"""Mode quest: reference ops against a loop oracle, incremental page metadata against a full
recompute, the Triton kernels (TRITON_INTERPRET=1 on CPU) against the reference, and whole
tiny models through the pass (budget covering the context equals eager; budget below it equals
a test-side Quest patched per layer; a new prompt in the same compiled model re-summarises)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tidal_compile
from tidal_compile.ops import kernels, reference

import oracle
from models import greedy_decode, prompts, tiny_model
from patched_attention import LayerPlan, patched
from strategies import decode_problems
from test_models import check_budget_covering_context, compile_tidal, decode_report

page_sizes = st.sampled_from([8, 16, 32])
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="kernels run on the CPU only in Triton's interpreter (set by conftest)")


@settings(max_examples=40, deadline=None)
@given(problem=decode_problems(max_len=100), page_size=st.sampled_from([4, 8, 16]), pages=st.integers(1, 6))
def test_quest_reference_equals_loop_oracle(problem, page_size, pages):
    p = problem
    budget = pages * page_size
    meta = reference.quest_page_metadata(p.key, p.mask, page_size)
    out = reference.quest_attention(p.query, p.key, p.value, p.mask, *meta, p.scale, budget, page_size)
    expected = oracle.quest(p.query, p.key, p.value, p.mask, p.scale, budget, page_size)
    assert oracle.relative_error(out, expected) < 1e-5


@settings(max_examples=40, deadline=None)
@given(problem=decode_problems(max_len=100, integer_valued=True), page_size=st.sampled_from([4, 8, 16]),
       pages=st.integers(1, 6))
def test_quest_pages_are_exactly_the_oracle_choice(problem, page_size, pages):
    """Integer inputs: exact scores and frequent ties (the lower page wins)."""
    p = problem
    budget = pages * page_size
    meta = reference.quest_page_metadata(p.key, p.mask, page_size)
    chosen = reference.quest_select_pages(p.query, *meta, p.mask, p.key.shape[2], budget, page_size)
    expected = [[oracle.quest_pages(p.query, p.key, p.mask, b, h, budget, page_size) for h in range(chosen.shape[1])]
                for b in range(chosen.shape[0])]
    assert chosen.tolist() == expected


@settings(max_examples=30, deadline=None)
@given(problem=decode_problems(max_len=100), page_size=page_sizes)
def test_quest_budget_covering_context_equals_dense(problem, page_size):
    p = problem
    length = p.key.shape[2]
    budget = -(-length // page_size) * page_size
    meta = reference.quest_page_metadata(p.key, p.mask, page_size)
    out = reference.quest_attention(p.query, p.key, p.value, p.mask, *meta, p.scale, budget, page_size)
    torch.testing.assert_close(out, reference.dense_attention(p.query, p.key, p.value, p.mask, p.scale))


def _draw_growing_cache(data, length, page_size, head_dim, max_batch):
    """A 2-KV-head cache whose sequences fill positions pads[b] .. start-1, then one more per
    decode step: (key, the mask of each step, empty [page_min, page_max, filled])."""
    batch = data.draw(st.integers(1, max_batch))
    start = data.draw(st.integers(1, length))
    pads = [data.draw(st.integers(0, start - 1)) for _ in range(batch)]
    key = torch.randn(batch, 2, length, head_dim, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    masks = []
    for end in range(start, length + 1):
        m = torch.zeros(batch, 1, 1, length, dtype=torch.bool)
        for b, pad in enumerate(pads):
            m[b, ..., pad:end] = True
        masks.append(m)
    pages = -(-length // page_size)
    empty = [torch.zeros(batch, 2, pages, head_dim), torch.zeros(batch, 2, pages, head_dim),
             torch.zeros(batch, dtype=torch.int32)]
    return key, masks, empty


@settings(max_examples=25, deadline=None)
@given(page_size=page_sizes, length=st.integers(2, 90), data=st.data())
def test_incremental_metadata_equals_full_recompute(page_size, length, data):
    """Metadata updated step by step (one position per decode step, after a prefill) equals the
    whole-cache recompute on every page holding a valid position; a new epoch starts over."""
    key, masks, state = _draw_growing_cache(data, length, page_size, head_dim=8, max_batch=3)
    batch, pages = key.shape[0], state[0].shape[2]
    for step, mask in enumerate(masks):
        reference.quest_update_metadata(key, mask, *state, new_sequence=step == 0, page_size=page_size)
        expected = reference.quest_page_metadata(key, mask, page_size)
        used = reference.pages_valid(reference.valid_positions(mask, batch, length, key.device), page_size, pages)
        for got, want in zip(state[:2], expected):
            torch.testing.assert_close(got[used[:, None].expand(-1, 2, -1)], want[used[:, None].expand(-1, 2, -1)],
                                       rtol=0, atol=0)
    # A new sequence in the same cache (shorter, different keys) is summarised from scratch.
    key2 = torch.randn_like(key)
    reference.quest_update_metadata(key2, masks[0], *state, new_sequence=False, page_size=page_size)
    if int(masks[-1].sum()) > int(masks[0].sum()):
        torch.testing.assert_close(state[0][:, :, :1], reference.quest_page_metadata(key2, masks[0], page_size)[0][:, :, :1])


@interpreted
@settings(max_examples=12, deadline=None)
@given(page_size=page_sizes, length=st.integers(2, 70), data=st.data())
def test_metadata_kernel_equals_reference_step_by_step(page_size, length, data):
    key, masks, ours = _draw_growing_cache(data, length, page_size, head_dim=16, max_batch=2)
    theirs = [t.clone() for t in ours]
    epoch, seen = torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    for step, mask in enumerate(masks[:6]):
        kernels.quest_update_metadata(key, mask, *ours, epoch, seen, page_size)
        reference.quest_update_metadata(key, mask, *theirs, new_sequence=step == 0, page_size=page_size)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(seen) == int(epoch)


@interpreted
@settings(max_examples=15, deadline=None)
@given(problem=decode_problems(max_len=90), page_size=page_sizes, pages=st.integers(2, 5))
def test_quest_kernel_equals_reference(problem, page_size, pages):
    p = problem
    budget = pages * page_size
    meta = reference.quest_page_metadata(p.key, p.mask, page_size)
    out = kernels.quest_attention(p.query, p.key, p.value, p.mask, *meta, p.scale, budget, page_size)
    expected = reference.quest_attention(p.query, p.key, p.value, p.mask, *meta, p.scale, budget, page_size)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


def test_quest_tiny_model_budget_covering_context_equals_eager():
    check_budget_covering_context("qwen2", 4, 2, 5, "query_head", 2, True, "aot_eager", mode="quest", page_size=16)


@pytest.mark.parametrize("page_size", [8, 16])
def test_quest_tiny_model_equals_layer_by_layer_patch(page_size):
    """Budget below the context: the compiled model equals a test-side Quest patched per layer,
    for two different prompts through the same compiled model (the second prefill makes the
    decode graph re-summarise the cache: no stale pages)."""
    model = tiny_model("llama", layers=5, heads=4, kv_heads=2, dtype=torch.float64)
    budget, steps, cache_len = 2 * page_size, 8, 56
    compiled = compile_tidal(model, mode="quest", budget=budget, page_size=page_size, inner_backend="aot_eager")
    plan = LayerPlan(5, (0, 1), (), budget, "query_head", mode="quest", page_size=page_size)
    for seed, padded in ((0, True), (1, False)):
        prompt, padding = prompts(2, 40, padded, seed=seed)
        tokens, logits = greedy_decode(compiled, model, prompt, steps, cache_len, padding)
        with patched(model, plan):
            _, expected = greedy_decode(model, model, prompt, steps, cache_len, padding, tokens=tokens)
        torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
        _, dense = greedy_decode(model, model, prompt, steps, cache_len, padding, tokens=tokens)
        assert (dense - logits).abs().max() > 1e-4, "budget < length must change the output"
    assert decode_report(model).count("quest") == 3


def test_quest_ops_reject_bad_metadata_and_page_size():
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 20, 8)
    meta = reference.quest_page_metadata(k, None, 4)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        torch.ops.tidal.quest_attention(q, k, k, None, *meta, 1.0, 12, 6)
    with pytest.raises(ValueError, match="page_min must be"):
        torch.ops.tidal.quest_attention(q, k, k, None, meta[0][:, :, :2], meta[1], 1.0, 8, 4)


def test_prefill_graph_bumps_the_shared_epoch():
    """Each prefill through the compiled model bumps the QuestState epoch that decode graphs read."""
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2)
    options = {"mode": "quest", "budget": 32, "page_size": 8, "inner_backend": "aot_eager"}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="tidal", options=options)
    prompt, _ = prompts(1, 20, False)
    greedy_decode(compiled, model, prompt, 2, 40)
    state = options["quest_state"]
    assert isinstance(state, tidal_compile.QuestState) and int(state.epoch(torch.device("cpu"))) == 1
    greedy_decode(compiled, model, prompt, 2, 40)
    assert int(state.epoch(torch.device("cpu"))) == 2


def test_uncompiled_prefill_starts_a_new_quest_epoch():
    """With the prefill outside the compiled graphs (CUDA-graph decoding), the prefill path bumps
    the Quest epoch itself: a second sequence decodes exactly as through a fresh compile; without
    the bump its page metadata would be stale (checked: the output differs)."""
    from tidal_compile.hf import TidalForward, _uncompiled_prefill

    model = tiny_model("llama", layers=4, heads=4, kv_heads=2, dtype=torch.float64)
    first, _ = prompts(1, 24, False, seed=0)
    second, _ = prompts(1, 40, False, seed=1)  # longer than the first sequence: no shrink to detect

    def second_sequence_logits(bump: bool, after_first: bool):
        options = {"mode": "quest", "budget": 16, "page_size": 8, "inner_backend": "aot_eager",
                   "quest_state": tidal_compile.QuestState()}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="tidal", options=options)
        prefill = _uncompiled_prefill(model, options["quest_state"] if bump else None)
        forward = TidalForward(compiled, 0, prefill=prefill)
        if after_first:
            greedy_decode(forward, model, first, 6, 56)
        return greedy_decode(forward, model, second, 6, 56, tokens=torch.zeros(1, 6, dtype=torch.long))[1]

    fresh = second_sequence_logits(bump=True, after_first=False)
    torch.testing.assert_close(second_sequence_logits(bump=True, after_first=True), fresh, rtol=0, atol=0)
    assert (second_sequence_logits(bump=False, after_first=True) - fresh).abs().max() > 1e-6
