"""Boolean-mask writes become `where` (passes/masked_fill.py): the same values, no `index_put`
with a boolean index left (Inductor would not capture the graph in CUDA graphs), and untouched
where the rewrite would not be exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from torch._inductor.custom_graph_pass import CustomGraphPass

from tidal_compile.passes.masked_fill import MaskedFillAsWhere, rewrite_masked_index_put

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.complex64]


def traced(fn, *inputs) -> torch.fx.GraphModule:
    """`fn` as a functional ATen graph, as Inductor's post-grad passes see it."""
    return make_fx(torch.func.functionalize(fn), tracing_mode="fake")(*inputs)


def index_puts_in(graph: torch.fx.Graph) -> int:
    return sum(n.op == "call_function" and "index_put" in str(n.target) for n in graph.nodes)


def index_puts(gm: torch.fx.GraphModule) -> int:
    return index_puts_in(gm.graph)


def random_tensor(shape, dtype, gen) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype if dtype.is_complex else torch.float32).to(dtype)
    return torch.randint(-50, 50, shape, generator=gen, dtype=dtype)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(),
       dtype=st.sampled_from(DTYPES), constant=st.sampled_from([0, 1, -3, 0.5]),
       value_dtype=st.sampled_from(DTYPES[:-1]), seed=st.integers(0, 2**16))
def test_masked_writes_become_where_with_the_same_values(shape, data, dtype, constant, value_dtype, seed):
    mask_dims = data.draw(st.integers(1, len(shape)))
    gen = torch.Generator().manual_seed(seed)
    x = random_tensor(shape, dtype, gen)
    mask = torch.rand(shape[:mask_dims], generator=gen) > 0.5
    value = random_tensor([], value_dtype, gen)

    def writes(x, mask, value):
        by_constant, by_tensor = x.clone(), x.clone()
        by_constant[mask] = constant
        by_tensor[mask] = value
        return by_constant, by_tensor

    gm = traced(writes, x, mask, value)
    assert index_puts(gm) == 2
    assert rewrite_masked_index_put(gm.graph) == 2
    gm.recompile()
    assert index_puts(gm) == 0
    for ours, eager in zip(gm(x, mask, value), writes(x, mask, value)):
        assert ours.dtype == eager.dtype
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def test_symbolic_shapes_are_rewritten_too():
    def writes(x, mask):
        y = x.clone()
        y[mask] = 0.0
        return y

    x, mask = torch.randn(3, 5, 4), torch.rand(3, 5) > 0.5
    gm = make_fx(torch.func.functionalize(writes), tracing_mode="symbolic")(x, mask)
    assert rewrite_masked_index_put(gm.graph) == 1
    gm.recompile()
    assert index_puts(gm) == 0
    x, mask = torch.randn(2, 7, 4), torch.rand(2, 7) > 0.5  # other sizes through the same graph
    torch.testing.assert_close(gm(x, mask), writes(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("write", [
    lambda y, m, i: y.index_put_((i,), torch.tensor(1.0)),  # integer index: no host sync, nothing to do
    lambda y, m, i: y.index_put_((m,), torch.tensor(1.0), accumulate=True),  # accumulates
    lambda y, m, i: y.__setitem__(m, torch.ones(2, 3)),  # a row per masked row
], ids=["integer-index", "accumulate", "many-values"])
def test_writes_that_are_not_one_value_under_a_mask_stay(write):
    def fn(x, mask, index):
        y = x.clone()
        write(y, mask, index)
        return y

    x, mask, index = torch.randn(4, 3), torch.tensor([True, False, True, False]), torch.tensor([0, 2])
    gm = make_fx(torch.func.functionalize(fn))(x, mask, index)  # real tracing: the mask's count is data
    before = index_puts(gm)
    assert rewrite_masked_index_put(gm.graph) == 0
    assert index_puts(gm) == before


def test_the_backend_runs_the_rewrite_under_inductor():
    def embed(ids, table):  # what a vocabulary-sharded embedding does: mask the ids outside the shard
        outside = (ids < 4) | (ids >= 8)
        local = ids - 4
        local[outside] = 0
        rows = table[local]
        rows[outside] = 0.0
        return rows

    ids, table = torch.randint(0, 12, (3, 5)), torch.randn(4, 6)
    counters.clear()
    compiled = torch.compile(embed, backend="tidal", options={"mode": "full"}, fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        torch.testing.assert_close(compiled(ids, table), embed(ids, table), rtol=0, atol=0)  # compiled now, not cached
    assert counters["tidal"]["masked_index_put_to_where"] == 2


def test_a_pre_pass_already_configured_runs_after_ours_and_keys_the_cache():
    seen = []

    class Counting(CustomGraphPass):
        def __call__(self, graph):
            seen.append(index_puts_in(graph))

        def uuid(self):
            return "counting"

    def writes(x, mask):
        y = x.clone()
        y[mask] = 1.0
        return y

    gm = traced(writes, torch.randn(4), torch.rand(4) > 0.5)
    chained = MaskedFillAsWhere(then=Counting())
    chained(gm.graph)
    assert seen == [0], "the configured pass sees the graph after the rewrite"
    assert chained.uuid() != MaskedFillAsWhere().uuid() and chained.uuid()[1] == "counting"
    assert MaskedFillAsWhere(then=lambda graph: None).uuid() is None, "a plain callable: no caching"
