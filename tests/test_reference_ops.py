"""The tidal ops (CPU: plain-PyTorch reference) against the independent oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tidal_compile  # noqa: F401  (registers torch.ops.tidal)
from tidal_compile.ops import reference
import oracle
from strategies import DTYPES, TOLERANCE, budgets, decode_problems, granularities

tidal = torch.ops.tidal


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    err = oracle.relative_error(actual, expected)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} over {TOLERANCE[dtype]:.0e} for {dtype}"


def sdpa(p) -> torch.Tensor:
    mask = None if p.mask is None else p.mask
    groups = p.query.shape[1] // p.num_kv_heads
    k, v = (x.double().repeat_interleave(groups, 1) for x in (p.key, p.value))
    return F.scaled_dot_product_attention(p.query.double(), k, v, attn_mask=mask, scale=p.scale)


@settings(max_examples=60, deadline=None)
@given(p=decode_problems(dtypes=DTYPES))
def test_dense_attention_equals_sdpa(p):
    out = tidal.dense_attention(p.query, p.key, p.value, p.mask, p.scale, [])
    assert_close(out, sdpa(p), p.query.dtype)


@settings(max_examples=60, deadline=None)
@given(p=decode_problems(dtypes=DTYPES), budget=budgets, granularity=granularities)
def test_selection_output_is_the_dense_output(p, budget, granularity):
    out, _ = tidal.selection_attention(p.query, p.key, p.value, p.mask, p.scale, budget, granularity, 0, 0, [])
    assert_close(out, oracle.dense(p.query, p.key, p.value, p.mask, p.scale), p.query.dtype)


@settings(max_examples=80, deadline=None)
@given(p=decode_problems(integer_valued=True), budget=budgets, sink=st.integers(0, 3), recent=st.integers(0, 3))
def test_selection_indices_equal_exact_topk(p, budget, sink, recent):
    """Integer q/k and scale 1 make logits exact in any summation order, so ties are real and
    must go to the lower position (query_head ranks by logits; the probability sums of kv_head
    and layer are not exact, see the next test)."""
    budget = max(budget, sink + max(recent, 1))
    _, idx = tidal.selection_attention(p.query, p.key, p.value, p.mask, p.scale, budget, "query_head",
                                       sink, recent, [])
    expected = oracle.selection_indices(p.query, p.key, p.mask, p.scale, budget, "query_head", sink, recent)
    assert idx.dtype == torch.int32
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(p=decode_problems(), budget=budgets, granularity=granularities, sink=st.integers(0, 3),
       recent=st.integers(0, 3))
def test_selection_indices_are_a_topk_of_float_scores(p, budget, granularity, sink, recent):
    """Random floats: the chosen set is a top-k of the float64 scores, up to rounding near the cut."""
    budget = max(budget, sink + max(recent, 1))
    _, idx = tidal.selection_attention(p.query, p.key, p.value, p.mask, p.scale, budget, granularity,
                                       sink, recent, [])
    oracle.assert_is_topk(idx, p.query, p.key, p.mask, p.scale, budget, granularity, sink, recent)


@settings(max_examples=40, deadline=None)
@given(p=decode_problems(integer_valued=True), granularity=granularities)
def test_all_equal_scores_pick_lowest_positions(p, granularity):
    """Identical keys tie every position exactly (integer inputs: exact logits, so identical
    probabilities too): the lowest positions win, plus the current token."""
    key = p.key[:, :, :1].expand_as(p.key).contiguous()
    budget = 3
    _, idx = tidal.selection_attention(p.query, key, p.value, p.mask, p.scale, budget, granularity, 0, 0, [])
    for b in range(idx.shape[0]):
        valid = oracle.valid_positions(p.mask, b, key.shape[2])
        expected = sorted(set(valid[:budget - 1]) | {valid[-1]})
        expected += [-1] * (budget - len(expected))
        assert all(idx[b, s].tolist() == expected for s in range(idx.shape[1]))


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (12, 3), (32, 8)])
@pytest.mark.parametrize("granularity", ["kv_head", "layer"])
def test_summed_probabilities_of_tied_positions_are_exactly_equal(heads, kv_heads, granularity):
    """Every length up to 40 (vector lanes and their tails): positions with identical logits in
    every head get bit-identical summed scores, so the lowest positions win."""
    gen = torch.Generator().manual_seed(heads)
    for length in range(1, 41):
        logits = torch.randn(2, heads, 1, generator=gen).expand(2, heads, length).contiguous()
        valid = torch.ones(2, heads, length, dtype=torch.bool)
        rank, _ = reference.selection_ranking(logits, valid, kv_heads, granularity)
        assert torch.equal(rank, rank[..., :1].expand_as(rank)), f"length {length}"
        indices = reference.top_positions(rank, valid[:, : rank.shape[1]], 3)
        assert indices.tolist() == [[[0, 1, length - 1][:min(3, length)] + [-1] * (3 - min(3, length))]
                                    * rank.shape[1]] * 2


@settings(max_examples=60, deadline=None)
@given(p=decode_problems(dtypes=DTYPES), budget=budgets, granularity=granularities, data=st.data())
def test_sparse_equals_softmax_over_gathered_positions(p, budget, granularity, data):
    """Any valid index sets (not only selected ones): attention over exactly those positions."""
    sets = {"query_head": p.query.shape[1], "kv_head": p.num_kv_heads, "layer": 1}[granularity]
    rows = []
    for b in range(p.query.shape[0]):
        valid = oracle.valid_positions(p.mask, b, p.key.shape[2])
        per_set = []
        for _ in range(sets):
            picked = sorted(data.draw(st.lists(st.sampled_from(valid), min_size=1, max_size=budget, unique=True)))
            per_set.append(picked + [-1] * (budget - len(picked)))
        rows.append(per_set)
    indices = torch.tensor(rows, dtype=torch.int32)
    out = tidal.sparse_attention(p.query, p.key, p.value, indices, p.scale)
    assert_close(out, oracle.sparse(p.query, p.key, p.value, indices, p.scale), p.query.dtype)


@settings(max_examples=60, deadline=None)
@given(p=decode_problems(dtypes=DTYPES), granularity=granularities, extra=st.integers(0, 8))
def test_budget_covering_context_equals_dense(p, granularity, extra):
    """The central property: with k >= L every valid position is selected, so sparse == dense."""
    budget = p.key.shape[2] + extra
    dense, idx = tidal.selection_attention(p.query, p.key, p.value, p.mask, p.scale, budget, granularity, 0, 0, [])
    out = tidal.sparse_attention(p.query, p.key, p.value, idx, p.scale)
    assert_close(out, dense.double(), p.query.dtype)


def test_float_mask_matches_bool_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 10, 8, generator=gen), torch.randn(2, 2, 10, 8, generator=gen)
    allowed = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    allowed[0, ..., :3] = False
    allowed[1, ..., 7:] = False
    additive = torch.zeros(2, 1, 1, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (additive, additive.masked_fill(~allowed, float("-inf"))):
        out_f, idx_f = tidal.selection_attention(q, k, v, mask, 0.3, 5, "kv_head", 0, 0, [])
        out_b, idx_b = tidal.selection_attention(q, k, v, allowed, 0.3, 5, "kv_head", 0, 0, [])
        torch.testing.assert_close(out_f, out_b)
        assert torch.equal(idx_f, idx_b)


@pytest.mark.parametrize("op_args", [
    ("selection_attention", (0.5, 4, "query_head", 0, 0), (0, 0)),
    ("selection_attention", (0.5, 3, "kv_head", 1, 1), (1, 1)),
    ("dense_attention", (0.5,), None),
    ("dense_attention", (0.5,), (0, 0)),
])
def test_opcheck_registration(op_args):
    """torch.library.opcheck: schema, fake kernel and autograd registration are consistent, with
    and without a mask summary (`tidal::mask_summary` of these windows)."""
    name, extra, window = op_args
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    summary = [] if window is None else list(tidal.mask_summary(q, k, mask, *window))
    torch.library.opcheck(getattr(tidal, name).default, (q, k, v, mask, *extra, summary),
                          test_utils=("test_schema", "test_faketensor"))
    if window is not None:
        torch.library.opcheck(tidal.mask_summary.default, (q, k, mask, *window),
                              test_utils=("test_schema", "test_faketensor"))


def test_opcheck_sparse():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    idx = torch.tensor([[[0, 3, 8, -1]], [[1, 2, 8, -1]]], dtype=torch.int32)
    torch.library.opcheck(tidal.sparse_attention.default, (q, k, v, idx, 0.5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mask", [torch.ones(1, 1, 1, 9, dtype=torch.bool).expand(2, 1, 1, 9),
                                  torch.zeros(2, 1, 1, 9, dtype=torch.bfloat16).masked_fill_(
                                      torch.arange(9) < 3, torch.finfo(torch.bfloat16).min)])
def test_materialized_mask_is_a_contiguous_copy(mask):
    copy = tidal.materialized_mask(mask)
    assert torch.equal(copy, mask) and copy.is_contiguous() and copy.data_ptr() != mask.data_ptr()
    torch.library.opcheck(tidal.materialized_mask.default, (mask,), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad, message", [
    (dict(query=torch.randn(1, 4, 2, 8)), "one query token"),
    (dict(query=torch.randn(1, 3, 1, 8)), "multiple of KV heads"),
    (dict(budget=0), "budget must be positive"),
    (dict(granularity="token"), "granularity must be one of"),
    (dict(query=torch.randint(0, 3, (1, 4, 1, 8)), key=torch.randint(0, 3, (1, 2, 6, 8)),
          value=torch.randint(0, 3, (1, 2, 6, 8))), "floating-point"),
])
def test_bad_inputs_raise_clear_errors(bad, message):
    args = dict(query=torch.randn(1, 4, 1, 8), key=torch.randn(1, 2, 6, 8), value=torch.randn(1, 2, 6, 8),
                budget=4, granularity="query_head")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        tidal.selection_attention(args["query"], args["key"], args["value"], None, 0.5, args["budget"],
                                  args["granularity"], 0, 0, [])


def test_sparse_rejects_wrong_index_dtype():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="int32"):
        tidal.sparse_attention(q, k, v, torch.zeros(1, 4, 3, dtype=torch.int64), 0.5)


@settings(max_examples=40, deadline=None)
@given(p=decode_problems(max_len=40), sink=st.integers(0, 4), recent=st.integers(0, 4))
def test_mask_summary_describes_each_sequence(p, sink, recent):
    b, length = p.query.shape[0], p.key.shape[2]
    summary = tidal.mask_summary(p.query, p.key, p.mask, sink, recent)
    assert all(t.dtype == torch.int32 and t.shape == (b,) for t in summary)
    for row in range(b):
        valid = oracle.valid_positions(p.mask, row, length)
        kv_len, first, count, sink_end, recent_start = (int(t[row]) for t in summary)
        assert (kv_len, first, count) == ((valid[-1] + 1, valid[0], len(valid)) if valid else (0, length, 0))
        assert {j for j in valid if j < sink_end} == set(valid[:sink])
        assert {j for j in valid if j >= recent_start} == set(valid[-max(recent, 1):])
