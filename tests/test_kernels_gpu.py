"""Triton kernels on a CUDA GPU at real shapes, through the `tidal::` ops (marked `gpu`;
skipped without one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tidal_compile.ops import reference

import oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _real_problem(batch, heads, kv_heads, length, dtype, integer_valued=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(*shape):
        if integer_valued:
            return torch.randint(-2, 3, shape, generator=gen, device="cuda").to(dtype)
        return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    q, k, v = draw(batch, heads, 1, 128), draw(batch, kv_heads, length + 64, 128), draw(batch, kv_heads, length + 64, 128)
    mask = torch.zeros(batch, 1, 1, length + 64, dtype=torch.bool, device="cuda")
    mask[..., :length] = True  # the last 64 static-cache slots are unfilled
    if batch > 1:
        mask[1, ..., :17] = False  # left padding
    return q, k, v, mask


@pytest.mark.parametrize("length", [1000, 4099, 33000])
@pytest.mark.parametrize("batch, heads, kv_heads", [(1, 32, 8), (3, 32, 32)])
def test_gpu_dense_and_sparse_ops_equal_reference(length, batch, heads, kv_heads):
    tidal = torch.ops.tidal
    q, k, v, mask = _real_problem(batch, heads, kv_heads, length, torch.bfloat16)
    expected = reference.dense_attention(q, k, v, mask, 128 ** -0.5)
    assert oracle.relative_error(tidal.dense_attention(q, k, v, mask, 128 ** -0.5, []), expected) < 1e-2
    for granularity in ("query_head", "kv_head", "layer"):
        out, idx = tidal.selection_attention(q, k, v, mask, 128 ** -0.5, 2048, granularity, 0, 0, [])
        assert oracle.relative_error(out, expected) < 1e-2
        sparse = tidal.sparse_attention(q, k, v, idx, 128 ** -0.5)
        assert oracle.relative_error(sparse, reference.sparse_attention(q, k, v, idx, 128 ** -0.5)) < 1e-2


# Rows not a multiple of 16 positions; 128K + 17: 2049 groups of 64 (one step of 4096) and, at k=2048,
# 4097 groups of 32 (a step and a held tail), both with the gather split over programs where the rows are few.
@pytest.mark.parametrize("length, budget", [(1000, 256), (33000, 2048), (131072 + 17, 256), (131072 + 17, 2048)])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head", "layer"])
def test_gpu_topk_is_exactly_the_reference_set(length, budget, granularity):
    q, k, v, mask = _real_problem(2, 32, 8, length, torch.bfloat16, integer_valued=True)
    _, idx = torch.ops.tidal.selection_attention(q, k, v, mask, 1.0, budget, granularity, 4, 8, [])
    _, expected = reference.selection_attention(q, k, v, mask, 1.0, budget, granularity, 4, 8)
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)


@pytest.mark.parametrize("group", [1, 4, 64])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_gpu_topk_is_exact_at_every_group_length(group, granularity):
    """The grouped top-k with groups of 1 (one selection over the positions), few and many
    positions: the reference's indices, ties (integer scores) included (the chunked plan: the
    test above, at 33000 positions and budget 2048)."""
    from tidal_compile.ops import index_sets, kernels

    q, k, v, mask = _real_problem(2, 32, 8, 131072, torch.bfloat16, integer_valued=True, seed=1)
    length = k.shape[2]
    summary = kernels.summarize_mask(mask, 2, length, q.device, 4, 8)
    _, lse, logits = kernels.flash_decode(q, k, v, mask, 1.0, emit_logits=True, summary=summary)
    sets = index_sets(granularity, 32, 8)
    plan = kernels.plan_topk(2 * sets, length, 256, q.device, grouped=True, group=group)
    idx = kernels.select_topk(logits, lse, summary, 256, sets, granularity != "query_head", plan)
    _, expected = reference.selection_attention(q, k, v, mask, 1.0, 256, granularity, 4, 8)
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)


@pytest.mark.parametrize("length, batch", [(131072 + 17, 2), (32768, 16)])
def test_gpu_topk_holding_longer_rows_is_exact(length, batch):
    """`TopkPlan.hold_tail`: rows longer than a step and its tail (the candidates of k=2048,
    the group keys of many rows) hold both in registers and stream the rest; the reference's
    indices, ties included (many rows: the top groups' early exit with its slack too)."""
    from tidal_compile.ops import kernels

    q, k, v, mask = _real_problem(batch, 32, 8, length, torch.bfloat16, integer_valued=True, seed=2)
    length = k.shape[2]
    summary = kernels.summarize_mask(mask, batch, length, q.device, 4, 8)
    _, lse, logits = kernels.flash_decode(q, k, v, mask, 1.0, emit_logits=True, summary=summary)
    plan = dataclasses.replace(kernels.plan_topk(batch * 32, length, 2048, q.device, grouped=True), hold_tail=True)
    idx = kernels.select_topk(logits, lse, summary, 2048, 32, False, plan)
    _, expected = reference.selection_attention(q, k, v, mask, 1.0, 2048, "query_head", 4, 8)
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)


def test_gpu_compiled_tiny_model_equals_eager():
    from test_models import check_budget_covering_context

    check_budget_covering_context("llama", 8, 2, 6, "kv_head", 2, True, "inductor", device="cuda")


def test_gpu_cuda_graph_decode_equals_eager():
    """backend option cudagraphs (what mode="reduce-overhead" does): decode steps with the tidal
    ops captured in CUDA graphs and replayed equal eager (the prompt runs eagerly, so the static
    cache is allocated outside the graphs)."""
    from test_models import check_budget_covering_context

    check_budget_covering_context("qwen2", 8, 2, 6, "query_head", 2, True, "inductor", device="cuda",
                                  eager_prefill=True, cudagraphs=True)


def test_gpu_decode_mask_is_computed_once_per_step():
    """mode full: Inductor computes Hugging Face's decode mask (`arange` <= cache position) in one
    launch a step, not once per attention layer that reads it (`tidal::materialized_mask`)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from models import greedy_decode, prompts, tiny_model

    torch._dynamo.reset()
    model = tiny_model("llama", layers=6).cuda()
    prompt, padding = prompts(2, 12, True, device="cuda")
    forward = torch.compile(model, backend="tidal", options={"mode": "full"})
    _, codes = run_and_get_code(lambda: greedy_decode(forward, model, prompt, 2, 32, padding, prefill=model))
    assert codes
    for code in codes:  # each decode graph Inductor compiled
        launches = re.findall(r"(triton_\w+)\.run\(", code)
        mask_launches = [name for name in launches if "arange" in name and "_le_" in name]
        assert len(mask_launches) == 1, mask_launches


def test_gpu_ops_under_reduce_overhead_equal_eager():
    """torch.compile(fn, backend="tidal", mode="reduce-overhead") over the ops: replays equal eager
    (indices exactly)."""
    def attend(q, k, v, mask):
        out, idx = torch.ops.tidal.selection_attention(q, k, v, mask, 0.1, 256, "kv_head", 0, 4, [])
        return out, idx, torch.ops.tidal.sparse_attention(q, k, v, idx, 0.1), \
            torch.ops.tidal.dense_attention(q, k, v, mask, 0.1, [])

    q, k, v, mask = _real_problem(2, 8, 2, 3000, torch.bfloat16)
    expected = attend(q, k, v, mask)
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="tidal", mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        out, idx, sparse, dense = compiled(q, k, v, mask)
        torch.testing.assert_close(idx, expected[1], rtol=0, atol=0)
        # Inductor autotunes the tiles itself: its pick may sum in another order than eager's.
        for ours, ref in zip((out, sparse, dense), (expected[0], expected[2], expected[3])):
            assert oracle.relative_error(ours, ref) < 1e-2


def test_gpu_generate_with_cuda_graphs_and_correction_equals_eager():
    """compile_for_generation(cudagraphs=True): generate (correction every 3 steps, k covering
    the context) gives eager's tokens."""
    import tidal_compile
    from models import prompts, tiny_model
    from tidal_compile.hf import compile_for_generation

    torch._dynamo.reset()
    tidal_compile.clear_reports()
    model = tiny_model("llama", layers=6).cuda()
    prompt, padding = prompts(2, 12, True, device="cuda")
    kwargs = dict(attention_mask=padding.long(), max_new_tokens=12, do_sample=False, cache_implementation="static")
    expected = model.generate(prompt, disable_compile=True, **kwargs)  # transformers compiles static-cache decoding on CUDA
    compile_for_generation(model, budget=64, correction={"interval": 3}, cudagraphs=True)
    assert model.forward.prefill.__func__ is type(model).forward, "sequences start uncompiled"
    assert torch.equal(model.generate(prompt, **kwargs), expected)
    assert any(g.phase == "decode" and g.count("sparse") > 0 for g in tidal_compile.explain(model))


@pytest.mark.parametrize("length, budget, page_size", [(1000, 256, 16), (33000, 2048, 16), (131072, 256, 32)])
def test_gpu_quest_ops_equal_reference(length, budget, page_size):
    """A first call summarises every page (after a prefill), a decode step's call the page it
    wrote; each time the metadata, `filled` and the output match the reference."""
    tidal = torch.ops.tidal
    q, k, v, mask = _real_problem(2, 32, 8, length, torch.bfloat16)
    pages = -(-k.shape[2] // page_size)
    page_min = torch.zeros(2, 8, pages, 128, dtype=torch.bfloat16, device="cuda")
    page_max, filled = torch.zeros_like(page_min), torch.zeros(2, dtype=torch.int32, device="cuda")
    for step in range(2):
        if step:  # a decode step: its token written at the first unfilled slot
            mask[..., length] = True
            tidal.quest_cache_write(k, page_min, page_max, filled, torch.tensor(length, device="cuda"))
        out = tidal.quest_attention(q, k, v, mask, page_min, page_max, filled, 128 ** -0.5, budget, page_size, [])
        expected_min, expected_max = reference.quest_page_metadata(k, mask, page_size)
        valid = reference.valid_positions(mask, 2, k.shape[2], k.device)
        used = reference.pages_valid(valid, page_size, pages)[:, None].expand(-1, 8, -1)
        assert torch.equal(page_min[used], expected_min[used]) and torch.equal(page_max[used], expected_max[used])
        assert torch.equal(filled, reference.valid_length(valid).to(filled.dtype))
        expected = reference.quest_attention(q, k, v, mask, page_min, page_max, 128 ** -0.5, budget, page_size)
        assert oracle.relative_error(out, expected) < 1e-2


def test_gpu_quest_compiled_tiny_model_equals_eager():
    from test_models import check_budget_covering_context

    check_budget_covering_context("llama", 8, 2, 6, "query_head", 2, True, "inductor", device="cuda",
                                  mode="quest", page_size=16)


@pytest.mark.parametrize("batch, heads, kv_heads, length", [(1, 32, 8, 33000), (4, 32, 32, 8192)])
def test_gpu_autotuned_tiles_equal_fixed_tiles(monkeypatch, batch, heads, kv_heads, length):
    """The autotuner times the candidates, keeps one of them, and its output matches the fixed
    default tiles' (TIDAL_AUTOTUNE=0) and the reference."""
    from tidal_compile.ops import kernels

    autotuners = []
    autotuned = kernels._autotuned
    monkeypatch.setattr(kernels, "_autotuned", lambda *args: autotuners.append(autotuned(*args)) or autotuners[-1])
    q, k, v, mask = _real_problem(batch, heads, kv_heads, length, torch.bfloat16)
    tuned, _, _ = kernels.flash_decode(q, k, v, mask, 128 ** -0.5)
    fixed, _, _ = kernels.flash_decode(q, k, v, mask, 128 ** -0.5, blocks=kernels.decode_blocks(128, batch * kv_heads))
    expected = reference.dense_attention(q, k, v, mask, 128 ** -0.5)
    assert oracle.relative_error(tuned, expected) < 1e-2 and oracle.relative_error(tuned, fixed) < 1e-2
    assert len(autotuners) == 1, "only the launch without fixed tiles is autotuned"
    best = autotuners[0].best_config
    assert (best.kwargs["BLOCK_N"], best.num_warps, best.num_stages) in kernels.TUNE_CANDIDATES


def test_gpu_offsets_past_2_31_elements():
    """A KV cache of more than 2^31 elements per tensor (int64 offsets): the last sequence's dense,
    selection (exact top-k, integer-valued data) and sparse results equal the reference run on
    that sequence alone."""
    batch, heads, kv_heads, length = 16, 32, 8, 132032
    q, k, v, mask = _real_problem(batch, heads, kv_heads, length, torch.bfloat16, integer_valued=True)
    assert k.numel() > 2 ** 31  # every sequence has 64 unfilled slots at the end (_real_problem)
    last = slice(batch - 1, batch)
    tidal = torch.ops.tidal
    expected = reference.dense_attention(q[last], k[last], v[last], mask[last], 1.0)
    assert oracle.relative_error(tidal.dense_attention(q, k, v, mask, 1.0, [])[last], expected) < 1e-2
    out, idx = tidal.selection_attention(q, k, v, mask, 1.0, 256, "query_head", 0, 0, [])
    _, expected_idx = reference.selection_attention(q[last], k[last], v[last], mask[last], 1.0, 256, "query_head", 0, 0)
    assert oracle.relative_error(out[last], expected) < 1e-2
    torch.testing.assert_close(idx[last], expected_idx, rtol=0, atol=0)
    sparse = tidal.sparse_attention(q, k, v, idx, 1.0)[last]
    assert oracle.relative_error(sparse, reference.sparse_attention(q[last], k[last], v[last], idx[last], 1.0)) < 1e-2


def test_gpu_generate_with_step_graphs_equals_eager():
    """compile_for_generation(step_graphs=True): each generate call's decode steps replay one CUDA
    graph captured whole (correction every 3 steps, k covering the context), and give eager's
    tokens, for two prompts in a row."""
    import tidal_compile
    from models import prompts, tiny_model
    from tidal_compile.hf import compile_for_generation

    torch._dynamo.reset()
    tidal_compile.clear_reports()
    model = tiny_model("llama", layers=6).cuda()
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    runs = []
    for seed, padded in ((0, True), (1, False)):
        prompt, padding = prompts(2, 12 + 8 * seed, padded, seed=seed, device="cuda")
        mask = torch.ones_like(prompt) if padding is None else padding.long()
        runs.append((prompt, mask, model.generate(prompt, attention_mask=mask, disable_compile=True,
                                                  cache_implementation="static", **kwargs)))
    compile_for_generation(model, budget=64, correction={"interval": 3}, step_graphs=True)
    for prompt, mask, expected in runs:
        assert torch.equal(model.generate(prompt, attention_mask=mask, **kwargs), expected)
    assert model.forward.step_graph.captures == 2, "one capture per generate call"
    assert any(g.phase == "decode" and g.count("sparse") > 0 for g in tidal_compile.explain(model))


@pytest.mark.parametrize("graphs", ["cudagraphs", "step_graphs"])
def test_gpu_quest_through_generate_with_cuda_graphs_two_prompts_in_a_row(graphs):
    """compile_for_generation(mode quest, cudagraphs=True, or step_graphs=True: the whole step in
    one graph): each generate call gets its own TidalCache, the decode steps replay CUDA graphs
    over its page metadata, and a second, longer prompt decodes like the test-side Quest (tokens
    equal, logits within fp32 kernel tolerance)."""
    import tidal_compile
    from models import prompts, tiny_model
    from patched_attention import LayerPlan, patched
    from tidal_compile.hf import compile_for_generation

    torch._dynamo.reset()
    tidal_compile.clear_reports()
    reference_model = tiny_model("llama", layers=5, heads=8, kv_heads=2)  # the float64 loop oracle runs on the CPU
    model = tiny_model("llama", layers=5, heads=8, kv_heads=2).cuda()
    plan = LayerPlan(5, (0, 1), (), 32, "query_head", mode="quest", page_size=16)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = [prompts(1, length, False, seed=seed)[0] for seed, length in ((0, 100), (1, 300))]
    expected = []
    for prompt in runs:
        with patched(reference_model, plan):
            expected.append(reference_model.generate(prompt, cache_implementation="static", **kwargs))
    compile_for_generation(model, mode="quest", budget=32, page_size=16, **{graphs: True})
    for prompt, want in zip(runs, expected):
        got = model.generate(prompt.cuda(), max_cache_len=400, **kwargs)
        assert torch.equal(got.sequences.cpu(), want.sequences)
        assert oracle.relative_error(torch.stack(got.logits).cpu(), torch.stack(want.logits)) < 1e-3
    assert any(g.phase == "decode" and g.count("quest") == 3 for g in tidal_compile.explain(model))
    if graphs == "step_graphs":
        assert model.forward.step_graph.captures == 2, "one capture per generate call"


def test_gpu_dynamic_compile_equals_eager():
    """torch.compile(dynamic=True): the cache length is symbolic when the graph is traced; the
    kernels' launch plans specialise on it (a guard), and decoding with two cache sizes equals
    eager for both."""
    import tidal_compile
    from models import greedy_decode, prompts, tiny_model

    torch._dynamo.reset()
    model = tiny_model("llama", layers=4, heads=8, kv_heads=2).cuda()
    compiled = torch.compile(model, backend="tidal", dynamic=True, options={"budget": 8, "selection_layers": [2]})
    for cache_len in (40, 72):
        prompt, padding = prompts(2, 24, True, device="cuda")
        tokens, logits = greedy_decode(compiled, model, prompt, 6, cache_len, padding)
        plain = tidal_compile.compile(model, budget=8, selection_layers=[2], inner_backend="eager")
        expected_tokens, expected = greedy_decode(plain, model, prompt, 6, cache_len, padding, tokens=tokens)
        assert oracle.relative_error(logits, expected) < 1e-3


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_gpu_every_head_dim_runs_the_kernels_and_equals_the_reference(head_dim):
    """Head dims of the families (64 GPT-NeoX / Phi, 80 Phi-2 style, 96 Phi-3, 128 Llama, 256
    Gemma): dense, selection (exact top-k on integer data) and sparse equal the reference."""
    from tidal_compile.ops.library import kernel_fallback

    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    q, k, v = (torch.randint(-2, 3, shape, generator=gen, device="cuda").to(torch.bfloat16)
               for shape in ((2, 8, 1, head_dim), (2, 2, 3000, head_dim), (2, 2, 3000, head_dim)))
    mask = torch.ones(2, 1, 1, 3000, dtype=torch.bool, device="cuda")
    mask[1, ..., :100] = False
    assert kernel_fallback(q, v, mask) is None
    tidal = torch.ops.tidal
    expected = reference.dense_attention(q, k, v, mask, 0.05)
    assert oracle.relative_error(tidal.dense_attention(q, k, v, mask, 0.05, []), expected) < 1e-2
    for granularity in ("query_head", "kv_head"):
        out, idx = tidal.selection_attention(q, k, v, mask, 1.0, 256, granularity, 0, 0, [])
        _, expected_idx = reference.selection_attention(q, k, v, mask, 1.0, 256, granularity, 0, 0)
        torch.testing.assert_close(idx, expected_idx, rtol=0, atol=0)
        sparse = tidal.sparse_attention(q, k, v, idx, 0.05)
        assert oracle.relative_error(sparse, reference.sparse_attention(q, k, v, idx, 0.05)) < 1e-2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_gpu_compiled_model_in_each_dtype_equals_eager(dtype, tolerance):
    """Budget covering the context, Inductor, each kernel dtype: logits within the dtype's
    tolerance of the uncompiled model (teacher-forced, so both see the same tokens)."""
    from models import greedy_decode, prompts, tiny_model
    from test_models import compile_tidal

    model = tiny_model("llama", layers=4, heads=8, kv_heads=2, dtype=dtype).cuda()
    prompt, padding = prompts(2, 20, True, device="cuda")
    tokens, expected = greedy_decode(model, model, prompt, 8, 40, padding)
    compiled = compile_tidal(model, budget=40, selection_layers=[2])
    _, logits = greedy_decode(compiled, model, prompt, 8, 40, padding, tokens=tokens)
    assert oracle.relative_error(logits, expected) < tolerance


def test_gpu_a_thousand_decode_steps_with_cuda_graphs():
    """1,000 decode steps through compile_for_generation(cudagraphs=True), budget covering the
    context: no graph compiled after the first steps, memory flat after warm-up, and the tokens
    of the uncompiled model."""
    import transformers

    import tidal_compile
    from models import prompts, tiny_model
    from tidal_compile.hf import compile_for_generation

    torch._dynamo.reset()
    tidal_compile.clear_reports()
    model = tiny_model("llama", layers=4, heads=8, kv_heads=2).cuda()
    prompt, _ = prompts(1, 16, False, device="cuda")
    kwargs = dict(max_new_tokens=1000, min_new_tokens=1000, do_sample=False)
    expected = model.generate(prompt, cache_implementation="static", disable_compile=True, **kwargs)
    compile_for_generation(model, budget=2048, selection_layers=[2], cudagraphs=True)
    memory, graphs = [], []

    class Probe(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - 16 in (50, 999):
                torch.cuda.synchronize()
                memory.append(torch.cuda.memory_allocated())
                graphs.append(len(tidal_compile.explain()))
            return scores

    out = model.generate(prompt, max_cache_len=1100, logits_processor=[Probe()], **kwargs)
    assert torch.equal(out, expected)
    assert graphs[0] == graphs[1], f"graphs compiled after step 50: {graphs}"
    assert memory[1] <= memory[0] * 1.01, f"memory grew from {memory[0]} to {memory[1]} bytes"
