"""passes/rewrite_attention (through the pass manager): graph shape after the rewrite, and the
rewritten toy decoder equals eager (k >= L) or a per-layer oracle (k < L)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
import tidal_compile
from tidal_compile.config import TidalConfig
from tidal_compile.passes import fx_utils, run_tidal_passes
from toy_decoder import ToyDecoder, capture_graph

tidal = torch.ops.tidal


def rewritten(model, config: TidalConfig, **input_kwargs):
    args = model.inputs(**input_kwargs)
    gm = capture_graph(model, *args)
    return gm, run_tidal_passes(gm, config), args


def calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_decode_graph_after_rewrite():
    model = ToyDecoder(num_layers=6)
    gm, result, _ = rewritten(model, TidalConfig(budget=4, selection_layers=(2, 4)))
    assert dict(result.counts) == {"dense": 2, "selection": 2, "sparse": 2}
    assert not any(fx_utils.is_sdpa(n) for n in gm.graph.nodes)
    assert len(calls(gm, tidal.dense_attention.default)) == 2
    selections = calls(gm, tidal.selection_attention.default)
    sparse = calls(gm, tidal.sparse_attention.default)
    assert len(selections) == 2 and len(sparse) == 2
    # Layer 3 reads layer 2's indices, layer 5 reads layer 4's: index tensors are graph edges.
    for sparse_node, selection_node in zip(sparse, selections):
        index_edge = sparse_node.args[3]
        assert index_edge.target.__name__ == "getitem" and index_edge.args == (selection_node, 1)
    # Kernels read the un-expanded cache: no repeat_kv views are left.
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"]
    assert all(n.args[1].op == "placeholder" for n in selections + sparse)


def _summary_node(summary_outputs):
    """The `tidal::mask_summary` node whose five outputs an op takes."""
    nodes = {n.args[0] for n in summary_outputs}
    assert len(summary_outputs) == 5 and len(nodes) == 1
    return nodes.pop()


@pytest.mark.parametrize("sink, recent, expected", [(0, 0, 1), (0, 1, 1), (0, 4, 2), (2, 0, 2)])
def test_one_mask_summary_per_mask_and_window(sink, recent, expected):
    """Every tidal op on a mask takes the graph's one summary of it (per window: the selection
    layers' sink / recent need their own); none is made without a mask or a window."""
    model = ToyDecoder(num_layers=6)
    gm, _, _ = rewritten(model, TidalConfig(budget=4, selection_layers=(2, 4), sink=sink, recent=recent))
    summaries = calls(gm, tidal.mask_summary.default)
    assert len(summaries) == expected
    dense = calls(gm, tidal.dense_attention.default)
    selections = calls(gm, tidal.selection_attention.default)
    assert {_summary_node(n.args[5]) for n in dense} == {summaries[0]}
    assert {_summary_node(n.args[9]) for n in selections} == {summaries[-1]}
    assert summaries[-1].args[3:] == (sink, recent if recent > 1 else 0)
    gm, _, _ = rewritten(model, TidalConfig(budget=4, selection_layers=(2, 4)), masked=False)
    assert not calls(gm, tidal.mask_summary.default)
    assert all(n.args[5] == [] for n in calls(gm, tidal.dense_attention.default))


def test_sliding_window_layers_get_the_summary_of_their_own_mask():
    model = ToyDecoder(num_layers=6, sliding=(1, 3, 5), window=4)
    gm, _, _ = rewritten(model, TidalConfig(mode="full"))
    summaries = calls(gm, tidal.mask_summary.default)
    dense = calls(gm, tidal.dense_attention.default)
    assert len(summaries) == 2 and len(dense) == 6
    for node in dense:
        assert _summary_node(node.args[5]).args[2] is node.args[3], "the summary is of the mask it attends under"


def test_a_computed_mask_is_copied_once_and_every_op_reads_the_copy():
    """The sliding layers' mask is computed in the graph (the input mask and a window): one
    `tidal::materialized_mask` of it feeds its summary and its three ops; the input mask is read
    as it is."""
    model = ToyDecoder(num_layers=6, sliding=(1, 3, 5), window=4)
    gm, _, _ = rewritten(model, TidalConfig(mode="full"))
    (copy,) = calls(gm, tidal.materialized_mask.default)
    assert copy.args[0].op != "placeholder"
    masks = [n.args[3] for n in calls(gm, tidal.dense_attention.default)]
    assert masks[1] is masks[3] is masks[5] is copy
    assert masks[0] is masks[2] is masks[4] and masks[0].op == "placeholder"
    assert {s.args[2] for s in calls(gm, tidal.mask_summary.default)} == {masks[0], copy}


def test_prefill_graph_is_untouched():
    model = ToyDecoder()
    gm, result, _ = rewritten(model, TidalConfig(budget=4), q_len=3)
    assert not result.counts and sum(fx_utils.is_sdpa(n) for n in gm.graph.nodes) == 4
    assert all(d.kind == "unchanged" and "prefill" in d.reason for d in result.decisions)


def compile_toy(model, **options):
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    return torch.compile(model, backend="tidal", fullgraph=False,
                         options={"inner_backend": "eager", **options})


@settings(max_examples=25, deadline=None)
@given(heads_kv=st.sampled_from([(4, 2), (4, 4), (6, 3), (4, 1)]), layers=st.integers(4, 6),
       length=st.integers(1, 20), batch=st.integers(1, 3), masked=st.booleans(),
       granularity=st.sampled_from(["query_head", "kv_head", "layer"]))
def test_budget_covering_context_equals_eager(heads_kv, layers, length, batch, masked, granularity):
    model = ToyDecoder(num_layers=layers, heads=heads_kv[0], kv_heads=heads_kv[1])
    args = model.inputs(batch=batch, length=length, masked=masked)
    compiled = compile_toy(model, budget=length, granularity=granularity)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    (report,) = tidal_compile.explain(model)
    assert report.count("selection") >= 1 and report.count("sparse") >= 1 and report.count("dense") == 2


def toy_oracle(model: ToyDecoder, x, caches, mask, dense, selection, budget, granularity):
    """Per-layer TidalDecode on the toy decoder, from the oracle (no FX involved)."""
    indices = {}
    with torch.no_grad():
        for i, (layer, (k, v)) in enumerate(zip(model.layers, caches)):
            attn = layer.self_attn
            b = x.shape[0]
            q = attn.q_proj(x).view(b, 1, attn.heads, attn.head_dim).transpose(1, 2)
            scale = attn.head_dim ** -0.5
            if i in selection:
                indices[i] = oracle.selection_indices(q, k, mask, scale, budget, granularity)
            if i in dense or i in selection:
                out = oracle.dense(q, k, v, mask, scale)
            else:
                out = oracle.sparse(q, k, v, indices[max(s for s in selection if s < i)], scale)
            x = x + out.float().transpose(1, 2).reshape(b, 1, -1)
    return x


@settings(max_examples=15, deadline=None)
@given(layers=st.integers(4, 7), budget=st.integers(1, 8), batch=st.integers(1, 3), masked=st.booleans(),
       granularity=st.sampled_from(["query_head", "kv_head", "layer"]))
def test_sparse_toy_decoder_equals_per_layer_oracle(layers, budget, batch, masked, granularity):
    model = ToyDecoder(num_layers=layers)
    args = model.inputs(batch=batch, length=16, masked=masked)
    selection = (2, layers - 1)
    compiled = compile_toy(model, budget=budget, granularity=granularity, selection_layers=list(selection))
    with torch.no_grad():
        out = compiled(*args)
    expected = toy_oracle(model, *args, dense=(0, 1), selection=selection, budget=budget, granularity=granularity)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


class BrokenToyDecoder(ToyDecoder):
    """A graph break after layer 2 puts the selection layer and its sparse layers in two graphs."""

    def forward(self, x, caches, mask=None):
        x = self.run_layers(x, caches, mask, 0, 3)
        torch._dynamo.graph_break()
        return self.run_layers(x, caches, mask, 3, len(self.layers))

    def run_layers(self, x, caches, mask, start, stop):
        for i in range(start, stop):
            x = x + self.layers[i].self_attn(x, *caches[i], mask)
        return x


def test_sparse_layer_across_graph_break_stays_dense_with_warning():
    model = BrokenToyDecoder(num_layers=5)
    args = model.inputs(length=16)
    compiled = compile_toy(model, budget=3, selection_layers=[2], num_layers=5)
    with pytest.warns(tidal_compile.TidalFallbackWarning, match="layer 3 stays dense"):
        with torch.no_grad():
            out = compiled(*args)
    layers = tidal_compile.explain(model).layers
    assert [(r.layer, r.kind) for r in layers] == [(0, "dense"), (1, "dense"), (2, "dense"),
                                                   (3, "dense"), (4, "dense")]
    assert "no sparse layer of this graph reads its indices" in layers[2].reason
    assert "not a rewritten decode layer earlier in this graph" in layers[3].reason
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args), rtol=1e-5, atol=1e-5)


def test_full_mode_routes_every_decode_layer_through_dense_op():
    model = ToyDecoder(num_layers=4)
    gm, result, _ = rewritten(model, TidalConfig(mode="full"))
    assert dict(result.counts) == {"dense": 4}
    args = model.inputs()
    with torch.no_grad():
        torch.testing.assert_close(compile_toy(model, mode="full")(*args), model(*args), rtol=1e-5, atol=1e-5)
