"""passes/find_attention: SDPA nodes, layer indices, repeat_kv look-through, decode vs prefill."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tidal_compile.passes import find_attention
from toy_decoder import ToyDecoder, capture_graph


def sites_of(model, **input_kwargs):
    return find_attention(capture_graph(model, *model.inputs(**input_kwargs)).graph)


def test_finds_every_layer_in_order_with_unexpanded_cache():
    model = ToyDecoder(num_layers=5, heads=6, kv_heads=2)
    sites = sites_of(model)
    assert [s.layer for s in sites] == [0, 1, 2, 3, 4]
    assert all(s.module_path == f"layers.{s.layer}.self_attn" for s in sites)
    for s in sites:
        assert s.unsupported is None and s.is_decode
        assert (s.num_heads, s.num_kv_heads) == (6, 2)
        assert s.key.op == "placeholder" and s.value.op == "placeholder", "looked through repeat_kv"
        assert s.scale == pytest.approx(8 ** -0.5)


def test_enable_gqa_keeps_cache_as_is():
    sites = sites_of(ToyDecoder(expand="none"))
    assert all(s.key.op == "placeholder" and (s.num_heads, s.num_kv_heads) == (4, 2) for s in sites)


def test_tiled_kv_is_not_mistaken_for_repeat_kv():
    """`k.repeat(1, G, 1, 1)` makes head h read KV head h % Hkv: the expanded tensor is kept."""
    sites = sites_of(ToyDecoder(expand="tile"))
    assert all(s.key.op != "placeholder" and s.num_kv_heads == 4 for s in sites)


def test_prefill_is_not_decode():
    sites = sites_of(ToyDecoder(), q_len=5)
    assert all(not s.is_decode and s.unsupported == "prefill (query length 5)" for s in sites)


def test_symbolic_query_length_is_not_decode():
    model = ToyDecoder()
    x, caches, _ = model.inputs(q_len=3, masked=False)
    torch._dynamo.mark_dynamic(x, 1)
    sites = find_attention(capture_graph(model, x, caches).graph)
    assert all(not s.is_decode and "symbolic" in s.unsupported for s in sites)


@pytest.mark.parametrize("sdpa_kwargs, reason", [
    ({"dropout_p": 0.1}, "dropout_p=0.1"),
    ({"is_causal": True}, "is_causal=True"),
])
def test_unsupported_calls_say_why(sdpa_kwargs, reason):
    model = ToyDecoder(**sdpa_kwargs)
    x, caches, _ = model.inputs()
    sites = find_attention(capture_graph(model, x, caches).graph)
    assert all(reason in s.unsupported for s in sites)


def test_lower_rank_mask_broadcasts():
    model = ToyDecoder()
    x, caches, mask = model.inputs()
    sites = find_attention(capture_graph(model, x, caches, mask[0, 0]).graph)
    assert all(s.unsupported is None for s in sites)


def test_graph_without_module_stack_has_no_layer():
    """symbolic_trace of a bare function: no nn_module_stack, so no layer index."""
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    gm = fx.symbolic_trace(attend)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    FakeTensorProp(gm).propagate(q, k, k)
    (site,) = find_attention(gm.graph)
    assert site.layer is None and "no layer index" in site.unsupported


def _fused_graph(use_lse: bool) -> fx.GraphModule:
    """Hand-built ATen graph: _scaled_dot_product_flash_attention_for_cpu, as AOT produces it."""
    graph = fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    sdpa = graph.call_function(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v))
    sdpa.meta["nn_module_stack"] = {"m": ("model.layers.3.self_attn", torch.nn.Module)}
    out = graph.call_function(operator.getitem, (sdpa, 0))
    outputs = [out]
    if use_lse:
        outputs.append(graph.call_function(operator.getitem, (sdpa, 1)))
    graph.output(tuple(outputs))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm).propagate(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    return gm


def test_fused_aten_variant_is_found():
    (site,) = find_attention(_fused_graph(use_lse=False).graph)
    assert site.layer == 3 and site.is_decode and site.unsupported is None


def test_fused_aten_variant_with_used_logsumexp_stays():
    (site,) = find_attention(_fused_graph(use_lse=True).graph)
    assert "outputs besides the attention output" in site.unsupported
