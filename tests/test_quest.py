"""Mode quest: reference ops against a loop oracle, incremental page metadata against a full
recompute, the Triton kernels (TRITON_INTERPRET=1 on CPU) against the reference, and whole
tiny models through the pass (budget covering the context equals eager; budget below it equals
a test-side Quest patched per layer; the page metadata lives in the TidalCache, so a new prompt
gets new pages, and cache writes mark the pages they touch stale)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._dynamo.backends.common import aot_autograd

import tidal_compile
from tidal_compile import TidalCache, hf_compat
from tidal_compile.hf import compile_for_generation
from tidal_compile.ops import reference
from tidal_compile.ops.library import kernels  # None without Triton

import oracle
from models import CACHE, greedy_decode, prompts, tiny_model
from patched_attention import LayerPlan, patched
from strategies import decode_problems
from test_models import check_budget_covering_context, compile_tidal, decode_report

page_sizes = st.sampled_from([8, 16, 32])
interpreted = pytest.mark.skipif(kernels is None or os.environ.get("TRITON_INTERPRET") != "1",
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


def _write(filled: torch.Tensor, position: int) -> None:
    """What a TidalCache layer does on a cache write from `position` on: those pages are stale."""
    unused = torch.empty(0)
    torch.ops.tidal.quest_cache_write(unused, unused, unused, filled, torch.tensor(position))


def _written_from(step: int, mask: torch.Tensor) -> int:
    """Step 0 is the prefill (writes from 0), every later step writes its token at the end."""
    return 0 if step == 0 else int(reference.valid_length(mask[:, 0, 0]).max()) - 1


def test_cache_write_traces_into_tensor_ops_inductor_can_fuse():
    """Under torch.compile `tidal::quest_cache_write` is its torch ops (a minimum and a copy), which
    Inductor fuses into a neighbouring kernel; an opaque op cost two launches a layer on the H200
    (docs/benchmarks.md)."""
    graphs = []

    def capture(graph: torch.fx.GraphModule, _inputs):
        graphs.append(graph)
        return graph

    filled = torch.full((2,), 9, dtype=torch.int32)
    torch.compile(_write, backend=aot_autograd(fw_compiler=capture))(filled, 5)
    assert filled.tolist() == [5, 5]
    targets = {node.target for node in graphs[0].graph.nodes}
    assert torch.ops.aten.minimum.default in targets
    assert not any(isinstance(target, torch._ops.OpOverload) and target.namespace == "tidal" for target in targets)


@settings(max_examples=25, deadline=None)
@given(page_size=page_sizes, length=st.integers(2, 90), data=st.data())
def test_incremental_metadata_equals_full_recompute(page_size, length, data):
    """Metadata updated step by step (one position per decode step, after a prefill) equals the
    whole-cache recompute on every page holding a valid position; a new sequence written into
    the same cache (its writes lower `filled` to 0) is summarised from scratch."""
    key, masks, state = _draw_growing_cache(data, length, page_size, head_dim=8, max_batch=3)
    batch, pages = key.shape[0], state[0].shape[2]
    for step, mask in enumerate(masks):
        _write(state[2], _written_from(step, mask))
        reference.quest_update_metadata(key, mask, *state, page_size=page_size)
        expected = reference.quest_page_metadata(key, mask, page_size)
        used = reference.pages_valid(reference.valid_positions(mask, batch, length, key.device), page_size, pages)
        for got, want in zip(state[:2], expected):
            torch.testing.assert_close(got[used[:, None].expand(-1, 2, -1)], want[used[:, None].expand(-1, 2, -1)],
                                       rtol=0, atol=0)
    key2 = torch.randn_like(key)
    _write(state[2], 0)
    reference.quest_update_metadata(key2, masks[-1], *state, page_size=page_size)
    for got, want in zip(state[:2], reference.quest_page_metadata(key2, masks[-1], page_size)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@interpreted
@settings(max_examples=12, deadline=None)
@given(page_size=st.sampled_from([4, 8, 16]), length=st.integers(2, 70), block_pages=st.sampled_from([16, 64]),
       data=st.data())
def test_quest_kernel_keeps_metadata_and_attends_as_reference_step_by_step(page_size, length, block_pages, data):
    """The page-score launch brings the stale pages of its block of pages up to date first: after
    a prefill (every page, across blocks when `block_pages` is below the page count) and then one
    page a decode step, the metadata, `filled` and the output equal the reference update followed by
    the reference attention."""
    key, masks, ours = _draw_growing_cache(data, length, page_size, head_dim=16, max_batch=2)
    theirs = [t.clone() for t in ours]
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    value = torch.randn(key.shape, generator=generator)
    budget = page_size * data.draw(st.integers(1, 3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "QUEST_BLOCK_P", block_pages)
        for step, mask in enumerate(masks[:6]):
            query = torch.randn(key.shape[0], 4, 1, 16, generator=generator)
            for state in (ours, theirs):
                _write(state[2], _written_from(step, mask))
            out = kernels.quest_attention(query, key, value, mask, *ours, 0.25, budget, page_size)
            reference.quest_update_metadata(key, mask, *theirs, page_size=page_size)
            expected = reference.quest_attention(query, key, value, mask, *theirs[:2], 0.25, budget, page_size)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


@interpreted
@settings(max_examples=15, deadline=None)
@given(problem=decode_problems(max_len=90), page_size=page_sizes, pages=st.integers(2, 5), additive=st.booleans())
def test_quest_kernel_equals_reference(problem, page_size, pages, additive):
    """From a cache never summarised (`filled` 0): the launch summarises every page, then attends;
    under a boolean mask or its additive form."""
    p = problem
    mask = p.mask
    if mask is not None and additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    budget = pages * page_size
    meta = reference.quest_page_metadata(p.key, mask, page_size)
    ours = [torch.zeros_like(meta[0]), torch.zeros_like(meta[1]), torch.zeros(p.key.shape[0], dtype=torch.int32)]
    out = kernels.quest_attention(p.query, p.key, p.value, mask, *ours, p.scale, budget, page_size)
    expected = reference.quest_attention(p.query, p.key, p.value, mask, *meta, p.scale, budget, page_size)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    valid = reference.valid_positions(mask, p.key.shape[0], p.key.shape[2], p.key.device)
    assert ours[2].tolist() == reference.valid_length(valid).tolist()


@interpreted
@settings(max_examples=12, deadline=None)
@given(problem=decode_problems(max_len=90), page_size=page_sizes, pages=st.integers(1, 5), grouped=st.booleans())
def test_quest_page_topk_in_both_plans_equals_reference(problem, page_size, pages, grouped):
    """The top-k over page scores in either plan, its rows bounded in pages from the token mask
    summary (the current token's page forced), picks the reference's pages."""
    p = problem
    b, h, length = p.query.shape[0], p.query.shape[1], p.key.shape[2]
    meta = reference.quest_page_metadata(p.key, p.mask, page_size)
    valid = reference.valid_positions(p.mask, b, length, p.query.device)
    scores = reference.quest_page_scores(p.query, *meta, reference.pages_valid(valid, page_size, meta[0].shape[2]))
    plan = kernels.plan_topk(b * h, scores.shape[2], pages, p.query.device, grouped=grouped, chunk=4, block=2,
                             group=2 if grouped else None)
    summary = kernels.summarize_mask(p.mask, b, length, p.query.device)
    chosen = kernels.select_topk(scores, scores, summary, pages, h, False, plan, page_size=page_size)
    expected = reference.quest_select_pages(p.query, *meta, p.mask, length, pages * page_size, page_size)
    assert torch.equal(chosen, expected)


def test_quest_tiny_model_budget_covering_context_equals_eager():
    check_budget_covering_context("qwen2", 4, 2, 5, "query_head", 2, True, "aot_eager", mode="quest", page_size=16)


@pytest.mark.parametrize("page_size", [8, 16])
def test_quest_tiny_model_equals_layer_by_layer_patch(page_size):
    """Budget below the context: the compiled model equals a test-side Quest patched per layer,
    for two different prompts through the same compiled model (each in its own TidalCache)."""
    model = tiny_model("llama", layers=5, heads=4, kv_heads=2, dtype=torch.float64)
    budget, steps, cache_len = 2 * page_size, 8, 56
    compiled = compile_tidal(model, mode="quest", budget=budget, page_size=page_size, inner_backend="aot_eager")
    plan = LayerPlan(5, (0, 1), (), budget, "query_head", mode="quest", page_size=page_size)
    for seed, padded in ((0, True), (1, False)):
        prompt, padding = prompts(2, 40, padded, seed=seed)
        tokens, logits = greedy_decode(compiled, model, prompt, steps, cache_len, padding, page_size=page_size)
        with patched(model, plan):
            _, expected = greedy_decode(model, model, prompt, steps, cache_len, padding, tokens=tokens)
        torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-7)
        _, dense = greedy_decode(model, model, prompt, steps, cache_len, padding, tokens=tokens)
        assert (dense - logits).abs().max() > 1e-4, "budget < length must change the output"
    assert decode_report(model).count("quest") == 3


def test_quest_ops_reject_bad_metadata_and_page_size():
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 20, 8)
    meta = reference.quest_page_metadata(k, None, 4)
    filled = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        torch.ops.tidal.quest_attention(q, k, k, None, *meta, filled, 1.0, 12, 6, [])
    with pytest.raises(ValueError, match="page_min must be"):
        torch.ops.tidal.quest_attention(q, k, k, None, meta[0][:, :, :2], meta[1], filled, 1.0, 8, 4, [])
    with pytest.raises(ValueError, match=r"filled must be int32 \[B\]"):
        torch.ops.tidal.quest_attention(q, k, k, None, *meta, filled.long(), 1.0, 8, 4, [])


def test_quest_without_a_tidal_cache_stays_dense_and_says_how_to_fix_it():
    """A plain StaticCache has no page metadata: the layers stay dense, with a warning naming
    TidalCache; the same compile with a TidalCache rewrites them."""
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2)
    compiled = compile_tidal(model, mode="quest", budget=32, page_size=8, inner_backend="eager")
    prompt, _ = prompts(1, 20, False)
    with pytest.warns(tidal_compile.TidalFallbackWarning, match="pass cache=tidal_compile.TidalCache"):
        greedy_decode(compiled, model, prompt, 2, 40)
    assert decode_report(model).count("quest") == 0
    tidal_compile.clear_reports()
    greedy_decode(compiled, model, prompt, 2, 40, cache=TidalCache(model.config, max_cache_len=40, page_size=8))
    assert [g.count("quest") for g in tidal_compile.explain(model) if g.phase == "decode"] == [2]


def test_a_cache_with_pages_of_another_size_stays_dense():
    model = tiny_model("llama", layers=4, heads=4, kv_heads=2)
    compiled = compile_tidal(model, mode="quest", budget=32, page_size=8, inner_backend="eager")
    prompt, _ = prompts(1, 20, False)
    with pytest.warns(tidal_compile.TidalFallbackWarning, match="pages of another size than page_size=8"):
        greedy_decode(compiled, model, prompt, 2, 40, cache=TidalCache(model.config, max_cache_len=40, page_size=16))


def generate_quest_logits(model, prompt, **kwargs):
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **kwargs)
    return out.sequences, torch.stack(out.logits)


def test_quest_through_generate_two_prompts_in_a_row():
    """compile_for_generation in mode quest: each generate call gets its own TidalCache, so a
    second, longer prompt decodes over its own pages (equal to the test-side Quest), with
    nothing for the user to call between them."""
    model = tiny_model("llama", layers=5, heads=4, kv_heads=2, dtype=torch.float64)
    plan = LayerPlan(5, (0, 1), (), 16, "query_head", mode="quest", page_size=8)
    first, _ = prompts(1, 24, False, seed=0)
    second, _ = prompts(1, 40, False, seed=1)
    expected = []
    for prompt in (first, second):
        with patched(model, plan):
            expected.append(generate_quest_logits(model, prompt, cache_implementation="static"))
    dense = generate_quest_logits(model, second, cache_implementation="static")[1]
    torch._dynamo.reset()
    compile_for_generation(model, mode="quest", budget=16, page_size=8, inner_backend="eager")
    for prompt, (tokens, logits) in zip((first, second), expected):
        ours = generate_quest_logits(model, prompt)
        assert torch.equal(ours[0], tokens)
        torch.testing.assert_close(ours[1], logits, rtol=1e-7, atol=1e-7)
    assert (dense - logits).abs().max() > 1e-4, "budget < length must change the output"


def test_quest_metadata_after_correction_matches_the_corrected_cache(monkeypatch):
    """A correction rewrites cache entries; the cache write lowers `filled`, so the next step
    re-summarises those pages: after generate, every Quest layer's page metadata equals a recompute
    from its final keys. Negative control: writes that do not lower `filled` leave stale pages."""
    prompt, _ = prompts(1, 30, False)

    def metadata_error():
        torch._dynamo.reset()
        model = tiny_model("llama", layers=5, heads=4, kv_heads=2)
        compile_for_generation(model, mode="quest", budget=16, page_size=8, correction={"interval": 2},
                               inner_backend="eager")
        cache = TidalCache(model.config, max_cache_len=48, page_size=8)
        model.generate(prompt, max_new_tokens=10, do_sample=False, **{CACHE: cache})
        assert cache.sequence.corrections == 4
        valid = torch.zeros(1, 1, 1, 48, dtype=torch.bool)
        valid[..., : cache.sequence.length] = True
        return max((layer.page_min[..., : -(-cache.sequence.length // 8), :]
                    - reference.quest_page_metadata(layer.keys, valid, 8)[0][..., : -(-cache.sequence.length // 8), :]
                    ).abs().max().item() for layer in cache.layers[2:])  # the Quest layers

    assert metadata_error() == 0
    monkeypatch.setattr(hf_compat, "written_end", lambda layer: torch.tensor(10**6))
    assert metadata_error() > 0
