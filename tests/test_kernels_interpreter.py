"""Triton kernels against the reference, on the CPU under TRITON_INTERPRET=1: small shapes,
launchers called directly (torch.compile cannot trace interpreted launches on CPU)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

import oracle
from strategies import TOLERANCE, decode_problems, granularities

kernels = pytest.importorskip("tidal_compile.ops.kernels")
from tidal_compile.ops import index_sets, reference  # noqa: E402



pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernels run on the CPU only in Triton's interpreter (set by conftest)")


def kernel_selection(p, budget, granularity, sink=0, recent=0, chunk=32, block=16, group=4, **select):
    """Selection through the kernels as the op runs them (the attention loop bounded by the valid
    length, logits past it poisoned here); small top-k chunks so that rows span several programs.
    `group`: the grouped top-k with groups of that many positions (1: one selection over the
    positions), or None: the chunked top-k; `select`: the grouped plan's select steps (TopkPlan)."""
    b, h = p.query.shape[:2]
    summary = kernels.summarize_mask(p.mask, b, p.key.shape[2], p.query.device, sink, recent)
    out, lse, logits = kernels.flash_decode(p.query, p.key, p.value, p.mask, p.scale, emit_logits=True,
                                            summary=summary)
    for row, valid_length in enumerate(summary.kv_len.tolist()):  # unwritten: the top-k must not read it
        logits[row, :, valid_length:] = float("inf")
    sets = index_sets(granularity, h, p.num_kv_heads)
    plan = kernels.plan_topk(b * sets, p.key.shape[2], budget, p.query.device, grouped=group is not None,
                             chunk=chunk, block=block, group=group, **select)
    return out, kernels.select_topk(logits, lse, summary, budget, sets, granularity != "query_head", plan)


small = dict(dtypes=(torch.float32, torch.float16), max_len=70)
groups = st.sampled_from([None, 1, 2, 4, 16])  # top-k plans: chunked, or grouped by that many positions
gather_programs = st.sampled_from([1, 2, 3, 8])  # the grouped plan's candidate gather: in radix_select, or split
digit_bits = st.sampled_from([4, 8])  # the grouped plan's radix digits
# the grouped plan's selections: every digit, or stopping at the first bin that leaves nothing (or, for the top
# groups, at most 5 groups) over
exits = st.sampled_from([{"early_exit": False}, {"early_exit": True}, {"early_exit": True, "group_slack": 5}])


@settings(max_examples=12, deadline=None)
@given(p=decode_problems(**small))
def test_flash_decode_equals_reference(p):
    out, lse, _ = kernels.flash_decode(p.query, p.key, p.value, p.mask, p.scale)
    expected = oracle.dense(p.query, p.key, p.value, p.mask, p.scale)
    assert out.dtype == p.query.dtype and oracle.relative_error(out, expected) < TOLERANCE[p.query.dtype]
    logits, _ = reference.attention_logits(p.query, p.key, p.mask, p.scale)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-3, atol=1e-3)


def test_flash_decode_with_many_sequence_heads_takes_the_predicated_path():
    """B x Hkv > FEW_SEQUENCE_HEADS: dense-only launches predicate loads instead of branching."""
    gen = torch.Generator().manual_seed(0)
    b, hkv = 3, kernels.FEW_SEQUENCE_HEADS // 3 + 1
    q, k, v = (torch.randn(s, generator=gen) for s in ((b, 2 * hkv, 1, 8), (b, hkv, 50, 8), (b, hkv, 50, 8)))
    mask = torch.zeros(b, 1, 1, 50, dtype=torch.bool)
    mask[0, ..., :30], mask[1, ..., 7:50], mask[2, ..., :1] = True, True, True
    out, _, _ = kernels.flash_decode(q, k, v, mask, 0.3)
    assert oracle.relative_error(out, oracle.dense(q, k, v, mask, 0.3)) < 1e-5


@pytest.mark.parametrize("candidate", kernels.TUNE_CANDIDATES)
def test_flash_decode_through_the_autotuner_equals_reference(monkeypatch, candidate):
    """The autotuned launch (tiles from the config, split lengths aligned to SPLIT_ALIGN), one
    candidate at a time (one config: Triton launches it without timing, so it runs here)."""
    monkeypatch.setattr(kernels, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(kernels, "TUNE_CANDIDATES", (candidate,))
    kernels._autotuned.cache_clear()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, generator=gen) for s in ((2, 4, 1, 16), (2, 2, 300, 16), (2, 2, 300, 16)))
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool)
    mask[1, ..., 270:] = False
    try:
        for emit_logits in (False, True):
            out, _, _ = kernels.flash_decode(q, k, v, mask, 0.3, emit_logits=emit_logits)
            assert oracle.relative_error(out, oracle.dense(q, k, v, mask, 0.3)) < 1e-5
    finally:
        kernels._autotuned.cache_clear()


def test_autotune_candidates_keep_tile_bytes_and_fit_the_split_alignment():
    from tidal_compile import codegen

    kernel = codegen.load("flash_decode.py.jinja").flash_decode_split
    for head_dim, blocks in ((64, {64, 128}), (128, {64, 128}), (256, {32, 64})):
        configs = kernels._autotuned(kernel, head_dim).configs
        assert {c.kwargs["BLOCK_N"] for c in configs} == blocks
        assert all(kernels.SPLIT_ALIGN % c.kwargs["BLOCK_N"] == 0 for c in configs)
    assert not kernels.autotune_enabled(torch.device("cpu"))


@settings(max_examples=20, deadline=None)
@given(p=decode_problems(dtypes=small["dtypes"], max_len=150), given_summary=st.booleans(),
       min_split=st.sampled_from([kernels.MIN_SPLIT, 8]), emit_logits=st.booleans(), hole=st.booleans())
def test_flash_decode_with_splits_over_the_valid_length_equals_reference(p, given_summary, min_split, emit_logits,
                                                                          hole):
    """Bounded launches spread their splits over each sequence's valid length (several splits
    with a small MIN_SPLIT) and read a single run of valid positions without the mask (a hole
    in the run keeps the mask); outputs, lse and the logits up to the valid length are exact,
    and masked cache rows (here inf / nan) never weigh."""
    b, length = p.query.shape[0], p.key.shape[2]
    mask = p.mask if p.mask is None else p.mask.clone()
    for row in range(b if hole and mask is not None else 0):
        valid = mask[row, 0, 0].nonzero().flatten()
        if len(valid) >= 3:
            mask[row, 0, 0, valid[1]] = False
    expected = oracle.dense(p.query, p.key, p.value, mask, p.scale)
    key, value = p.key.clone(), p.value.clone()
    if mask is not None:
        masked = ~mask[:, 0, 0, :]
        key.masked_fill_(masked[:, None, :, None], float("nan"))
        value.masked_fill_(masked[:, None, :, None], float("inf"))
    summary = kernels.summarize_mask(mask, b, length, p.query.device)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "MIN_SPLIT", min_split)
        out, lse, logits = kernels.flash_decode(p.query, key, value, mask, p.scale, emit_logits=emit_logits,
                                                bound_loop=True, summary=summary if given_summary else None)
    assert oracle.relative_error(out, expected) < TOLERANCE[p.query.dtype]
    expected_logits, _ = reference.attention_logits(p.query, p.key, mask, p.scale)
    torch.testing.assert_close(lse, torch.logsumexp(expected_logits, -1), rtol=1e-3, atol=1e-3)
    for row, valid_length in enumerate(summary.kv_len.tolist() if emit_logits else []):
        torch.testing.assert_close(logits[row, :, :valid_length], expected_logits[row, :, :valid_length].float(),
                                   rtol=1e-3, atol=1e-3)


def test_flash_decode_bounds_large_masked_launches_only(monkeypatch):
    """By default a masked launch without logits of at least BOUND_MIN_WORK sequence-head
    positions bounds the loop (computing the mask summary); smaller ones, unmasked ones and
    logit-writing ones without a given summary do not."""
    monkeypatch.setattr(kernels, "BOUND_MIN_WORK", 100)
    gen = torch.Generator().manual_seed(2)
    b, hkv, length = 2, 2, 40
    q, k, v = (torch.randn(s, generator=gen) for s in ((b, 2 * hkv, 1, 8), (b, hkv, length, 8), (b, hkv, length, 8)))
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., 5:30], mask[1, ..., 12:33] = True, True
    summaries = []
    summarize = kernels.summarize_mask
    monkeypatch.setattr(kernels, "summarize_mask", lambda *a, **kw: summaries.append(a) or summarize(*a, **kw))
    out, _, _ = kernels.flash_decode(q, k, v, mask, 0.3)
    assert oracle.relative_error(out, oracle.dense(q, k, v, mask, 0.3)) < 1e-5
    assert len(summaries) == 1, "2 x 2 x 40 >= 100 positions: the loop is bounded by the valid lengths"
    kernels.flash_decode(q[:1, :2], k[:1, :1], v[:1, :1], mask[:1], 0.3)
    kernels.flash_decode(q, k, v, None, 0.3)
    kernels.flash_decode(q, k, v, mask, 0.3, emit_logits=True)
    assert len(summaries) == 1, "small, unmasked and logit-writing launches are not bounded by default"


@settings(max_examples=8, deadline=None)
@given(p=decode_problems(integer_valued=True, max_len=70), budget=st.integers(1, 24),
       sink=st.integers(0, 2), recent=st.integers(0, 2), group=groups, parts=gather_programs, bits=digit_bits,
       exit=exits)
def test_radix_topk_returns_exactly_the_reference_set(p, budget, sink, recent, group, parts, bits, exit):
    """Integer inputs make logits exact, so ties are real: the kernel must break them like the
    reference (lower position first) and return the same sorted indices, its candidate gather in
    radix_select or split over `parts` programs per row, its digits of 4 or 8 bits, its selections
    stopping early or not."""
    budget = max(budget, sink + max(recent, 1))
    _, idx = kernel_selection(p, budget, "query_head", sink, recent, group=group, gather_programs=parts,
                              digit_bits=bits, **exit)
    expected = oracle.selection_indices(p.query, p.key, p.mask, p.scale, budget, "query_head", sink, recent)
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)


@settings(max_examples=12, deadline=None)
@given(p=decode_problems(max_len=70), budget=st.integers(1, 24), granularity=granularities,
       sink=st.integers(0, 2), recent=st.integers(0, 2), group=groups, parts=gather_programs, bits=digit_bits)
def test_radix_topk_is_a_topk_of_float_scores(p, budget, granularity, sink, recent, group, parts, bits):
    budget = max(budget, sink + max(recent, 1))
    _, idx = kernel_selection(p, budget, granularity, sink, recent, group=group, gather_programs=parts,
                              digit_bits=bits)
    oracle.assert_is_topk(idx, p.query, p.key, p.mask, p.scale, budget, granularity, sink, recent, rel_tol=1e-4)


@settings(max_examples=6, deadline=None)
@given(p=decode_problems(integer_valued=True, max_len=70), granularity=granularities, group=groups,
       parts=gather_programs, bits=digit_bits, exit=exits)
def test_radix_topk_breaks_exact_ties_by_lowest_position(p, granularity, group, parts, bits, exit):
    """Identical keys tie every position in every head (and in the summed kv_head / layer
    scores): the kernels pick the lowest valid positions plus the current token."""
    key = p.key[:, :, :1].expand_as(p.key).contiguous()
    tied = type("P", (), dict(query=p.query, key=key, value=p.value, mask=p.mask, scale=p.scale,
                              num_kv_heads=p.num_kv_heads))
    _, idx = kernel_selection(tied, 3, granularity, group=group, gather_programs=parts, digit_bits=bits, **exit)
    for b in range(idx.shape[0]):
        valid = oracle.valid_positions(p.mask, b, key.shape[2])
        expected = sorted(set(valid[:2]) | {valid[-1]})
        assert all(row == expected + [-1] * (3 - len(expected)) for row in idx[b].tolist())


def test_grouped_topk_breaks_ties_at_the_candidate_threshold_across_groups_by_position():
    """Groups of 4, budget 3 (the candidate threshold: 5): the first group holds two 5s, the second
    one 5 and its runner-up below the threshold, the last the current token. Of the three 5s the two
    lowest positions win (a gather that lists candidates out of position order, as a group whose
    largest key comes from the first pass would, must still rank the ties by position)."""
    logits = torch.tensor([[[5.0, 5, -1, -1, 5, 1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]]])
    summary = kernels.summarize_mask(None, 1, 16, logits.device)
    for parts, bits in itertools.product((1, 2, 3), (4, 8)):
        plan = kernels.plan_topk(1, 16, 3, logits.device, grouped=True, chunk=4, block=4, group=4,
                                 gather_programs=parts, digit_bits=bits)
        assert kernels.select_topk(logits, logits[..., 0], summary, 3, 1, False, plan).tolist() == [[[0, 1, 15]]]


threshold_of = kernels.codegen.load("radix_topk.py.jinja")._threshold


@triton.jit
def _threshold_kernel(Keys, Out, count, budget, slack, BLOCK: tl.constexpr, BITS: tl.constexpr,
                      EARLY_EXIT: tl.constexpr):
    threshold, need = threshold_of(Keys, count, budget, slack, BLOCK, BITS, BLOCK, False, EARLY_EXIT)
    tl.store(Out, threshold)
    tl.store(Out + 1, need.to(tl.int64))


def test_early_exit_stops_at_the_first_bin_that_leaves_at_most_the_slack_over():
    """`_threshold` over keys whose leading byte splits them 2 / 1 / 1: for a budget of 2 the
    leading byte's bin 0x05 holds exactly that, so with EARLY_EXIT the passes stop there (T its
    least key, both taken); for a budget of 1 only with a slack of 1; with none, every digit is
    read. Keys fewer than budget + slack are all taken (T 1)."""
    keys = torch.tensor([0x05000002, 0x04000003, 0x05000001, 0x03000000], dtype=torch.int64)

    def threshold(budget: int, slack: int, early_exit: bool, bits: int = 8, count: int = 4) -> list[int]:
        out = torch.zeros(2, dtype=torch.int64)
        _threshold_kernel[(1,)](keys, out, count, budget, slack, BLOCK=4, BITS=bits, EARLY_EXIT=early_exit)
        return out.tolist()

    assert threshold(2, 0, False) == [0x05000001, 1]
    assert threshold(2, 0, True) == [0x05000000, 2]
    assert threshold(2, 0, True, bits=4) == [0x05000000, 2]
    assert threshold(1, 0, True) == [0x05000002, 1]
    assert threshold(1, 1, True) == [0x05000000, 2]
    assert threshold(3, 0, True) == [0x04000000, 1]
    assert threshold(3, 1, True) == [1, 4]
    assert threshold(3, 1, False) == [0x04000003, 1]


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 5000), budget=st.integers(1, 300), group=st.sampled_from([1, 2, 4, 16]),
       parts=gather_programs, slack=st.integers(0, 64), group_block=st.sampled_from([16, 64, 256]))
def test_topk_scratch_holds_each_gather_share_of_the_budget_and_slack_then_the_taken_tail(
        length, budget, group, parts, slack, group_block):
    """radix_gather's part p writes from p x cdiv(budget + slack, parts) groups on and the last
    part appends the taken tail after its share: all of it inside a row's scratch, which holds at
    least every group the first selection may take."""
    plan = kernels.plan_topk(1, length, budget, torch.device("cpu"), grouped=True, chunk=16, block=16, group=group,
                             gather_programs=parts, group_block=group_block, early_exit=slack > 0, group_slack=slack)
    share = -(-(budget + slack) // plan.gather_parts)
    tail = plan.taken_tail(length, budget)
    held = plan.scratch_groups(length, budget)
    assert plan.gather_parts * share + tail <= held and budget + slack + tail <= held
    assert plan.gather_parts == (parts if plan.group > 1 else 1)


def _topk_by_sorting(row: list[float], forced: set[int], budget: int) -> list[int]:
    """The top-`budget` positions of one row of logits (forced first, then larger, then lower position), ascending."""
    order = sorted(range(len(row)), key=lambda n: (0, 0, n) if n in forced else (1, -row[n], n))
    return sorted(order[:budget])


@settings(max_examples=25, deadline=None)
@given(base=st.sampled_from([2.0, 2.0 ** 127, -3.0, 1e-30]), length=st.integers(8, 70),
       offsets=st.data(), budget=st.integers(1, 20), sink=st.integers(0, 3), recent=st.integers(0, 3),
       group=st.sampled_from([2, 4, 8]), parts=gather_programs, bits=digit_bits, exit=exits)
def test_grouped_topk_of_keys_in_a_narrow_band(base, length, offsets, budget, sink, recent, group, parts, bits,
                                               exit):
    """Logits within a few percent of `base` (keys sharing their leading digits: the radix
    selections decide in the low digits; at 2 ** 127 the leading byte is all ones, as a forced
    key's), ties among them, sink and recent positions forced (more of them than the budget too):
    the grouped top-k equals a sort."""
    steps = offsets.draw(st.lists(st.integers(0, 7), min_size=length, max_size=length))
    row = [base * (1 + step / 64) for step in steps]
    logits = torch.tensor([[row]], dtype=torch.float32)
    summary = kernels.summarize_mask(None, 1, length, logits.device, sink, recent)
    forced = {n for n in range(length) if n < summary.sink_end.item() or n >= summary.recent_start.item()}
    plan = kernels.plan_topk(1, length, budget, logits.device, grouped=True, chunk=16, block=16, group=group,
                             gather_programs=parts, digit_bits=bits, **exit)
    expected = _topk_by_sorting(row, forced, budget)
    expected += [-1] * (budget - len(expected))
    assert kernels.select_topk(logits, logits[..., 0], summary, budget, 1, False, plan).tolist() == [[expected]]


@settings(max_examples=20, deadline=None)
@given(length=st.integers(24, 160), data=st.data(), budget=st.integers(1, 12), recent=st.integers(0, 2),
       group=st.sampled_from([1, 2, 4]), group_block=st.sampled_from([4, 8, 16]), parts=gather_programs,
       bits=digit_bits, hold_tail=st.booleans(), exit=exits)
def test_grouped_topk_over_group_keys_past_the_first_step(length, data, budget, recent, group, group_block, parts,
                                                          bits, hold_tail, exit):
    """More group keys than a selection's first step holds, as a cache a few positions past a
    power of two has (a short tail past it, held) or several steps past it (streamed, or with
    `hold_tail` a step and a tail held and the rest streamed), rows shorter than the cache, ties
    everywhere: the grouped top-k equals a sort."""
    plan = kernels.plan_topk(1, length, budget, torch.device("cpu"), grouped=True, chunk=16, block=16, group=group,
                             gather_programs=parts, digit_bits=bits, group_block=group_block,
                             hold_tail=hold_tail, **exit)
    assert plan.group_tail(length) <= group_block
    _assert_topk_of_a_shorter_row_is_a_sort(data, length, budget, recent, plan)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), group=st.sampled_from([2, 4]), past=st.integers(1, 4), budget=st.integers(4, 20),
       recent=st.integers(0, 2), bits=digit_bits, exit=exits)
def test_grouped_topk_takes_a_short_tail_of_groups_whole(data, group, past, budget, recent, bits, exit):
    """A cache a few groups past a selection's step ranks the step's groups and takes every tail
    group whole (`TopkPlan.taken_tail`; ranked where a gather part's share is shorter), at every
    valid length up to the cache's, with the gather in radix_select or split over parts that divide
    the budget or not (the last part appends the tail's candidates), and budgets above the step's
    groups: still a sort."""
    length = (16 + past) * group - data.draw(st.integers(0, group - 1))
    for parts in (1, 3, 8):
        plan = kernels.plan_topk(1, length, budget, torch.device("cpu"), grouped=True, chunk=16, block=16,
                                 group=group, gather_programs=parts, digit_bits=bits, group_block=16, **exit)
        assert plan.taken_tail(length, budget) > 0 or parts > 1
        _assert_topk_of_a_shorter_row_is_a_sort(data, length, budget, recent, plan)


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_a_taken_tail_and_the_last_gather_share_both_hold_top_positions(parts):
    """Logits rising with position: the top-k is the row's last `budget` positions, so the taken
    tail's candidates and the last gather share's (whose slots the tail's follow) must all be kept."""
    group, budget, length = 2, 8, 2 * (16 + 1)
    plan = kernels.plan_topk(1, length, budget, torch.device("cpu"), grouped=True, chunk=16, block=16, group=group,
                             gather_programs=parts, group_block=16)
    assert plan.taken_tail(length, budget) == 1
    logits = torch.arange(length, dtype=torch.float32).view(1, 1, length)
    summary = kernels.summarize_mask(None, 1, length, logits.device)
    top = kernels.select_topk(logits, logits[..., 0], summary, budget, 1, False, plan)
    assert top.tolist() == [[list(range(length - budget, length))]]


def test_a_taken_tail_is_a_few_groups_no_more_than_a_gather_share(monkeypatch):
    """A cache a group past a power of two (128K + 16) ranks the power's groups and takes that one
    whole; a tail longer than a gather program's share of the top groups (k=256 on 8 programs: 32
    groups) is ranked, in a step that holds it (the held tail's plan)."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)

    def steps_and_tail(length: int, budget: int) -> tuple[int, int]:
        plan = kernels.plan_topk(32, length, budget, torch.device("cuda"))
        return plan.group_block, plan.taken_tail(length, budget)

    assert steps_and_tail(131072, 256) == (2048, 0)
    assert steps_and_tail(131072 + 16, 256) == (2048, 1)
    assert steps_and_tail(131072 + 16, 2048) == (4096, 1)
    assert steps_and_tail(131072 + 64 * 33, 256) == (4096, 0)


def _assert_topk_of_a_shorter_row_is_a_sort(data: st.DataObject, length: int, budget: int, recent: int,
                                             plan: kernels.TopkPlan) -> None:
    """A drawn row of `length` logits with many ties, valid for a drawn length (inf past it: never
    read), `recent` positions forced: `select_topk` by `plan` equals a sort."""
    valid = data.draw(st.integers(1, length))
    row = [float(v) for v in data.draw(st.lists(st.integers(-4, 4), min_size=length, max_size=length))]
    logits = torch.tensor([[row]], dtype=torch.float32)
    logits[..., valid:] = float("inf")
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool)
    mask[..., :valid] = True
    summary = kernels.summarize_mask(mask, 1, length, logits.device, 0, recent)
    forced = set(range(summary.recent_start.item(), valid))
    expected = _topk_by_sorting(row[:valid], forced, budget)
    expected += [-1] * (budget - len(expected))
    assert kernels.select_topk(logits, logits[..., 0], summary, budget, 1, False, plan).tolist() == [[expected]]


def test_group_tail_covers_the_group_keys_past_the_first_step_in_one_short_step_where_it_can():
    plan = kernels.TopkPlan(grouped=True, chunk=4096, group=32, group_block=4096)
    assert [plan.group_tail(n) for n in (131072, 131072 + 16, 131072 + 32 * 300, 131072 * 2, 131072 * 4)] == [
        kernels.GROUP_TAIL_MIN, kernels.GROUP_TAIL_MIN, 512, 4096, 4096]


def test_logits_rows_are_aligned_for_any_cache_length():
    """flash_decode's logits rows start 16-element aligned (Triton's stride specialization) for a
    cache length that is not a multiple of 16, and the top-k over them equals the reference."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 2, 70, 16, generator=gen)
    _, _, logits = kernels.flash_decode(q, k, k, None, 1.0, emit_logits=True)
    assert logits.shape == (1, 4, 70) and logits.stride(1) % kernels.ROW_ALIGN == 0
    torch.testing.assert_close(logits, torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(2, 1)))
    p = type("P", (), dict(query=q, key=k, value=k, mask=None, scale=1.0, num_kv_heads=2))
    _, idx = kernel_selection(p, 9, "query_head")
    torch.testing.assert_close(idx, oracle.selection_indices(q, k, None, 1.0, 9, "query_head"), rtol=0, atol=0)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 1 << 20))
def test_scratch_rows_are_aligned_and_never_a_power_of_two_apart(length):
    stride = kernels.scratch_row_stride(length)
    assert length <= stride < length + 2 * kernels.ROW_ALIGN
    assert stride % kernels.ROW_ALIGN == 0 and (stride // kernels.ROW_ALIGN) % 2 == 1


def test_radix_topk_on_a_row_longer_than_a_block():
    """Production chunk sizes, both top-k plans (the default group; the grouped one also with a
    candidate gather in longer steps than its selections): several blocks per chunk, all radix
    levels (kv_len > budget)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-3, 4, (1, 4, 1, 16), generator=gen).float()
    k = torch.randint(-3, 4, (1, 2, 700, 16), generator=gen).float()
    p = type("P", (), dict(query=q, key=k, value=k, mask=None, scale=1.0, num_kv_heads=2))
    plans = ({"group": None}, {"group": kernels.topk_group(700, 37)},
             {"group": kernels.topk_group(700, 37), "select_block": 64, "gather_block": 256},
             {"group": kernels.topk_group(700, 37), "select_block": 16, "gather_block": 16, "gather_programs": 4})
    for plan in plans:
        _, idx = kernel_selection(p, 37, "query_head", chunk=kernels.TOPK_CHUNK, block=kernels.TOPK_BLOCK, **plan)
        torch.testing.assert_close(idx, oracle.selection_indices(q, k, None, 1.0, 37, "query_head"), rtol=0, atol=0)
        for granularity in ("kv_head", "layer"):
            _, idx = kernel_selection(p, 37, granularity, chunk=kernels.TOPK_CHUNK, block=kernels.TOPK_BLOCK, **plan)
            oracle.assert_is_topk(idx, q, k, None, 1.0, 37, granularity, rel_tol=1e-4)


@pytest.mark.parametrize("length, budget", [(131072, 256), (131072, 2048), (32768, 256), (8192, 16), (70, 24), (5, 9)])
def test_topk_group_balances_groups_and_candidates(length, budget):
    """radix_select makes RADIX_LEVELS passes over length / group group keys, then one gather over
    budget x group positions: the group is the power of two (at most TOPK_MAX_GROUP) that keeps
    their sum within 1.5x of the least."""
    group = kernels.topk_group(length, budget)
    powers = [1 << i for i in range(kernels.TOPK_MAX_GROUP.bit_length())]

    def cost(g: int) -> float:
        return kernels.RADIX_LEVELS * length / g + budget * g

    assert group in powers and cost(group) <= 1.5 * min(map(cost, powers))


def test_topk_plan_picks_the_faster_of_the_h200_sweep(monkeypatch):
    """At the shapes benchmarks/tune_topk.py swept on an H200 (132 SMs) where one plan was
    clearly faster, the default plan is that one (docs/results/tune-topk-h200-2026-11-30-candidate-threshold.log)."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    grouped_faster = {(32, 131072, 256): True, (32, 131072, 2048): True, (8, 131072, 2048): False,
                      (32, 32768, 256): True, (256, 32768, 256): True, (64, 32768, 256): True,
                      (256, 32768, 2048): True, (64, 32768, 2048): True, (32, 32768, 2048): False,
                      (8, 32768, 2048): False, (32, 102400, 256): True}
    assert {shape: kernels.plan_topk(*shape, cuda).grouped for shape in grouped_faster} == grouped_faster


def test_select_topk_refuses_group_keys_it_cannot_use():
    """Group keys written beforehand (Quest's page scores) serve the grouped plan ranked by logit
    only: with ranks by probability or the chunked plan, a ValueError names them."""
    logits = torch.zeros(1, 2, 40)
    summary = kernels.summarize_mask(None, 1, 40, logits.device)
    grouped = kernels.plan_topk(2, 40, 4, logits.device, grouped=True)
    keys = kernels.topk_group_keys(2, 40, grouped, logits.device)
    with pytest.raises(ValueError, match="group_keys"):
        kernels.select_topk(logits, logits[..., 0], summary, 4, 1, True, grouped, group_keys=keys)
    chunked = kernels.plan_topk(2, 40, 4, logits.device, grouped=False)
    with pytest.raises(ValueError, match="group_keys"):
        kernels.select_topk(logits, logits[..., 0], summary, 4, 2, False, chunked, group_keys=keys)


def test_select_topk_by_probability_without_lse_is_refused():
    """Ranks by probability need the logits' log-sum-exps; `lse` may be None only when ranking by
    logit (Quest's page scores), and a missing one is named, not read as None inside a kernel."""
    logits = torch.zeros(1, 2, 40)
    summary = kernels.summarize_mask(None, 1, 40, logits.device)
    with pytest.raises(ValueError, match="lse is required"):
        kernels.select_topk(logits, None, summary, 4, 1, True)


def test_topk_select_steps_pick_the_h200_sweeps_best(monkeypatch):
    """(rows, length, budget, group) -> radix_select's (group, select, gather) steps, warps and
    gather programs: the group keys in one step up to GROUP_BLOCK_MAX (2048 with many rows) if
    they fill three quarters of it, the candidate and gather steps as measured best on an H200
    (132 SMs; benchmarks/tune_topk.py, docs/results/tune-topk-h200-2026-11-30-*.log), short steps
    for small budgets (Quest's page rows), all scaled down with the group-max block; with at most
    66 rows a gather of 8192 positions or more split over up to 8 programs a row (about 1024
    positions each, at most 2 per SM; docs/results/tune-topk-h200-2026-12-02-gather-programs-*.log)
    and 16 warps where a program still gathers 4096 positions; a split plan's group keys in one step
    and its candidates in steps of 1024 (docs/results/tune-topk-h200-2026-12-02-split-sweep-*-b419b79.log);
    radix digits of 4 bits with at most 66 rows, else 8 (tune-topk-h200-2026-12-02-digit-bits-55b92fc.log);
    candidates in steps of 1024 at every budget, longer rows held with at most 66 rows (the many rows'
    large-budget gather in steps of 2048; tune-topk-h200-2026-12-03-hold-tail-dcdf4a9.log); a row a
    few group keys past a power of two (128K + 16) in steps of that power, its tail's groups taken
    whole (tune-topk-h200-2026-12-03-taken-tail-*.log); selections that stop early, the top groups
    with a slack of budget / 16 only with many rows and a budget of 1024 on
    (tune-topk-h200-2026-12-03-early-exit-*.log)."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    expected = {(32, 131072, 256, 64): (2048, 1024, 2048, 8, 8, 4, True, True, 0),
                (8, 131072, 256, 64): (2048, 1024, 2048, 8, 8, 4, True, True, 0),
                (32, 131072 + 16, 256, 64): (2048, 1024, 2048, 8, 8, 4, True, True, 0),
                (32, 131072 * 7 // 4, 256, 64): (4096, 1024, 2048, 8, 8, 4, True, True, 0),
                (64, 32768, 256, 16): (2048, 1024, 4096, 16, 1, 4, True, True, 0),
                (64, 32768, 2048, 8): (4096, 1024, 4096, 16, 4, 4, True, True, 0),
                (256, 32768, 256, 16): (2048, 1024, 1024, 8, 1, 8, False, True, 0),
                (256, 32768, 2048, 8): (2048, 1024, 2048, 8, 1, 8, False, True, 128),
                (32, 131072, 2048, 8): (4096, 1024, 2048, 8, 8, 4, True, True, 0),
                (32, 131072, 2048, 32): (4096, 1024, 4096, 16, 8, 4, True, True, 0),
                (32, 8192, 16, 64): (128, 128, 1024, 8, 1, 4, True, True, 0),
                (32, 8192 + 1, 16, 64): (256, 128, 1024, 8, 1, 4, True, True, 0)}
    assert {shape: tuple(kernels.topk_select_steps(*shape, cuda).values()) for shape in expected} == expected
    scaled_down = kernels.topk_select_steps(32, 131072, 256, 64, cuda, block=16)
    assert tuple(scaled_down.values()) == (64, 16, 64, 16, 8, 4, True, True, 0)
    fused = kernels.topk_select_steps(32, 131072, 256, 64, cuda, gather_programs=1)
    assert (fused["gather_block"], fused["select_warps"], fused["gather_programs"]) == (4096, 16, 1)
    every_digit = kernels.plan_topk(256, 32768, 2048, cuda, grouped=True, early_exit=False)
    assert (every_digit.early_exit, every_digit.group_slack) == (False, 0)


def test_split_plans_take_the_h200_sweeps_group(monkeypatch):
    """Where the candidate gather is split over programs the group grows until the group keys fit
    one step (B1 128K k=2048: 16 -> 32, 93.1 -> 71.6 us on an H200), and a plan that keeps its
    gather in radix_select keeps `topk_group`'s group."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    groups = {(32, 131072, 256): (64, 8), (32, 131072 + 16, 256): (64, 8), (32, 131072, 2048): (32, 8),
              (32, 131072 + 16, 2048): (32, 8), (256, 32768, 2048): (8, 1), (64, 32768, 256): (16, 1)}
    assert {shape: (plan.group, plan.gather_programs) for shape in groups
            for plan in [kernels.plan_topk(*shape, cuda)]} == groups
    assert kernels.plan_topk(32, 131072, 2048, cuda, gather_programs=1).group == kernels.topk_group(131072, 2048)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 1 << 20), budget=st.integers(1, 4096), group_log2=st.integers(0, 7))
def test_split_group_never_covers_most_of_the_row(length, budget, group_log2):
    """A split plan's group: a power of two, at least `topk_group`'s or as long as the group keys'
    one step needs, but never so long that the top `budget` groups hold more than half the row
    (B1 128K k=2048 with groups of 64: every position a candidate, 1 ms on an H200)."""
    group = kernels.topk_split_group(length, budget, 1 << group_log2)
    assert group & (group - 1) == 0 and group <= kernels.TOPK_MAX_GROUP
    assert group == 1 or 2 * budget * group <= length
    fit = kernels.triton.next_power_of_2(kernels.triton.cdiv(length, kernels.GROUP_BLOCK_MAX))
    assert group >= min(max(1 << group_log2, fit), kernels.TOPK_MAX_GROUP) or 4 * budget * group > length


def test_topk_chunk_picks_the_swept_best_on_an_h100(monkeypatch):
    """rows x length -> chunk as benchmarks/tune_topk.py measured best (132 SMs), within bounds."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    swept_best = {(32, 32768): 1024, (8, 32768): 1024, (32, 131072): 4096, (8, 131072): 1024}
    assert {shape: kernels.topk_chunk(*shape, cuda) for shape in swept_best} == swept_best
    assert kernels.topk_chunk(256, 131072, cuda) == kernels.TOPK_CHUNK
    assert kernels.topk_chunk(1, 100, cuda) == kernels.TOPK_BLOCK


@settings(max_examples=12, deadline=None)
@given(p=decode_problems(**small), budget=st.integers(1, 24), granularity=granularities)
def test_sparse_decode_equals_reference(p, budget, granularity):
    _, idx = reference.selection_attention(p.query, p.key, p.value, p.mask, p.scale, budget, granularity)
    out = kernels.sparse_decode(p.query, p.key, p.value, idx, p.scale)
    assert oracle.relative_error(out, oracle.sparse(p.query, p.key, p.value, idx, p.scale)) < TOLERANCE[p.query.dtype]


@settings(max_examples=3, deadline=None)
@given(p=decode_problems(max_len=260), budget=st.integers(129, 256), granularity=granularities)
def test_sparse_decode_of_few_programs_takes_a_budget_past_the_tile_in_one_tile(p, budget, granularity):
    """With few programs a budget of 129-256 slots is one tile of 256 (`sparse_blocks`), its
    unused rows masked, and equals the reference."""
    _, idx = reference.selection_attention(p.query, p.key, p.value, p.mask, p.scale, budget, granularity)
    b, h, _, d = p.query.shape
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_sm_count", lambda device: 132)
        plan = kernels.plan_sparse_decode(b, h, p.num_kv_heads, idx.shape[1], budget, d, p.query.device, False,
                                          "none")
        out = kernels.sparse_decode(p.query, p.key, p.value, idx, p.scale)
    assert (plan.blocks.block_n, plan.splits) == (256, 1)
    assert oracle.relative_error(out, oracle.sparse(p.query, p.key, p.value, idx, p.scale)) < TOLERANCE[p.query.dtype]


@settings(max_examples=200, deadline=None)
@given(head_dim=st.sampled_from([32, 64, 128, 256]), programs=st.integers(1, 1024), slots=st.integers(1, 8192))
@example(head_dim=128, programs=66, slots=256).via("the last one-tile budget and program count")
@example(head_dim=128, programs=67, slots=256).via("one program too many")
@example(head_dim=128, programs=66, slots=257).via("one slot too many")
@example(head_dim=256, programs=32, slots=128).via("the last one-tile budget at head dim 256")
def test_sparse_blocks_take_few_programs_short_budgets_in_one_tile(head_dim, programs, slots):
    """sparse_decode's tile on 132 SMs: with at most 66 programs and a budget of at most
    SPARSE_ONE_TILE_MAX slots (scaled with the head dim) one tile holds them all; else
    SPARSE_BLOCKS' tile, as many tile bytes at every head dim."""
    cuda = torch.device("cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_sm_count", lambda device: 132)
        blocks = kernels.sparse_blocks(head_dim, programs, slots, cuda)
        splits, _ = kernels.split_work(programs, slots, blocks.block_n, cuda)
    tile = kernels.SPARSE_BLOCKS.block_n * 128 // max(head_dim, 128)
    one_tile = programs <= 66 and slots <= kernels.SPARSE_ONE_TILE_MAX * 128 // max(head_dim, 128)
    assert blocks.block_n == (max(tile, triton.next_power_of_2(slots)) if one_tile else tile)
    assert (blocks.num_warps, blocks.num_stages) == (kernels.SPARSE_BLOCKS.num_warps, kernels.SPARSE_BLOCKS.num_stages)
    assert splits == 1 or not one_tile


def test_additive_mask_matches_bool_mask():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, generator=gen) for s in ((2, 4, 1, 16), (2, 2, 50, 16), (2, 2, 50, 16)))
    allowed = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    allowed[0, ..., 40:] = False
    allowed[1, ..., :7] = False
    additive = torch.zeros(2, 1, 1, 50).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out_b, _, _ = kernels.flash_decode(q, k, v, allowed, 0.25)
    out_f, _, _ = kernels.flash_decode(q, k, v, additive, 0.25)
    torch.testing.assert_close(out_b, out_f)
    torch.testing.assert_close(out_b, reference.dense_attention(q, k, v, allowed, 0.25), rtol=1e-5, atol=1e-5)


def test_rendered_source_is_kept_with_its_includes_and_keyed_by_its_text(tmp_path, monkeypatch):
    from tidal_compile import codegen

    monkeypatch.setenv("TIDAL_KERNEL_CACHE", str(tmp_path))
    sparse = codegen.rendered_path("sparse_decode.py.jinja")
    assert sparse.parent == tmp_path and sparse == codegen.rendered_path("sparse_decode.py.jinja")
    text = sparse.read_text()
    assert "def online_softmax_step" in text and "def _valid" in text and "{%" not in text
    assert codegen.rendered_path("radix_topk.py.jinja") != codegen.rendered_path("radix_topk_chunked.py.jinja")


@settings(max_examples=15, deadline=None)
@given(p=decode_problems(max_len=70), sink=st.integers(0, 4), recent=st.integers(0, 4),
       additive=st.booleans())
def test_mask_summary_matches_reference_counts(p, sink, recent, additive):
    b, length = p.query.shape[0], p.key.shape[2]
    mask = p.mask
    if mask is not None and additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    summary = kernels.summarize_mask(mask, b, length, p.query.device, sink, recent)
    for row in range(b):
        valid = oracle.valid_positions(p.mask, row, length)
        forced_start = set(valid[:sink])
        forced_end = set(valid[-max(recent, 1):])
        assert summary.kv_len[row] == valid[-1] + 1
        assert (summary.kv_start[row], summary.valid_count[row]) == (valid[0], len(valid))
        assert {j for j in valid if j < summary.sink_end[row]} == forced_start
        assert {j for j in valid if j >= summary.recent_start[row]} == forced_end


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 2 * kernels.SUMMARY_CHUNK + 50), recent=st.integers(0, 1),
       data=st.data())
def test_one_pass_mask_summary_over_several_chunks(batch, length, recent, data):
    """sink = 0, recent <= 1 takes the parallel one-pass kernel: rows of left padding, holes and
    unfilled static-cache tails spanning several programs, at least one valid position each."""
    mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool)
    for row in range(batch):
        first = data.draw(st.integers(0, length - 1))
        end = data.draw(st.integers(first + 1, length))
        mask[row, 0, 0, first:end] = True
        if end - first >= 3:  # holes strictly between the first and the last valid position
            for hole in data.draw(st.lists(st.integers(first + 1, end - 2), max_size=3)):
                mask[row, 0, 0, hole] = False
    summary = kernels.summarize_mask(mask, batch, length, torch.device("cpu"), 0, recent)
    for row in range(batch):
        valid = mask[row, 0, 0].nonzero().flatten().tolist()
        assert summary.kv_len[row] == valid[-1] + 1
        assert (summary.kv_start[row], summary.valid_count[row]) == (valid[0], len(valid))
        assert not any(j < summary.sink_end[row] for j in valid)
        assert [j for j in valid if j >= summary.recent_start[row]] == valid[-1:]


def test_kernels_decline_inputs_they_do_not_take_and_say_why():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    assert kernels.unsupported(q, k, None) is None
    assert "dtype torch.float64" in kernels.unsupported(q.double(), k.double(), None)
    assert "value head dim 32 differs" in kernels.unsupported(q, torch.randn(1, 2, 8, 32), None)
    assert "head dim 320 > 256" in kernels.unsupported(torch.randn(1, 4, 1, 320), torch.randn(1, 2, 8, 320), None)
    assert "per-head attention mask" in kernels.unsupported(q, k, torch.ones(1, 4, 1, 8, dtype=torch.bool))


@settings(max_examples=200, deadline=None)
@given(programs=st.integers(1, 2048), length=st.integers(1, 300_000), block_n=st.sampled_from([16, 64, 128]),
       sms=st.sampled_from([4, 108, 132]), waves=st.integers(1, 8))
def test_split_work_covers_the_length_within_whole_waves(programs, length, block_n, sms, waves):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_sm_count", lambda device: sms)
        splits, split_len = kernels.split_work(programs, length, block_n, torch.device("cuda"), waves)
    assert split_len % block_n == 0 and (splits - 1) * split_len < length <= splits * split_len
    assert splits == 1 or programs * splits <= waves * sms, "a launch never runs past its last whole wave"


def test_split_work_fills_four_waves_at_the_swept_shapes(monkeypatch):
    """benchmarks/tune_decode.py (H200, 132 SMs): 3.88 waves beat 4.12 and 1.94 at B = 1."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    for programs, length, splits in ((8, 32768, 64), (8, 131072, 64), (32, 131072, 16), (256, 8192, 2)):
        assert kernels.split_work(programs, length, kernels.SPLIT_ALIGN, cuda, kernels.DECODE_WAVES)[0] == splits
