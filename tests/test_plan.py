"""passes/plan: layer kinds and reasons from the config, on sites of a captured toy decoder."""

from __future__ import annotations

import pytest

from tidal_compile.config import TidalConfig
from tidal_compile.passes import find_attention, plan_attention
from toy_decoder import ToyDecoder, capture_graph


@pytest.fixture(scope="module")
def sites():
    model = ToyDecoder(num_layers=6)
    return find_attention(capture_graph(model, *model.inputs()).graph)


def kinds(decisions):
    return [(d.site.layer, d.kind, d.source_layer) for d in decisions]


def test_tidal_plan(sites):
    plan = TidalConfig(selection_layers=(2, 4)).resolve(6)
    assert kinds(plan_attention(sites, plan)) == [
        (0, "dense", None), (1, "dense", None), (2, "selection", None), (3, "sparse", 2),
        (4, "selection", None), (5, "sparse", 4)]


def test_reasons_name_the_rule(sites):
    decisions = plan_attention(sites, TidalConfig(budget=64, selection_layers=(2,)).resolve(6))
    assert decisions[0].reason == "in dense_layers [0, 1]"
    assert decisions[2].reason == "in selection_layers [2]: picks top-64 (query_head)"
    assert decisions[5].reason == "indices from layer 2, k=64"


def test_full_mode_is_dense_everywhere(sites):
    assert {d.kind for d in plan_attention(sites, TidalConfig(mode="full").resolve(6))} == {"dense"}


def test_topk_oracle_mode(sites):
    decisions = plan_attention(sites, TidalConfig(mode="topk_oracle").resolve(6))
    assert [d.kind for d in decisions] == ["dense", "dense", "oracle", "oracle", "oracle", "oracle"]


def test_unsupported_selection_layer_makes_its_sparse_layers_dense(sites):
    sites = [s for s in sites]
    broken = sites[2]
    original = broken.unsupported
    broken.unsupported = "pretend"
    try:
        decisions = plan_attention(sites, TidalConfig(selection_layers=(2, 4)).resolve(6))
    finally:
        broken.unsupported = original
    assert kinds(decisions)[2:4] == [(2, "unchanged", None), (3, "dense", 2)]
    assert decisions[3].fallback and kinds(decisions)[5] == (5, "sparse", 4)


def test_head_count_mismatch_falls_back(sites):
    site = sites[3]
    original = site.num_heads
    site.num_heads = 8
    try:
        decisions = plan_attention(sites, TidalConfig(selection_layers=(2,)).resolve(6))
    finally:
        site.num_heads = original
    assert decisions[3].kind == "dense" and decisions[3].fallback and "head counts" in decisions[3].reason


def test_layers_past_num_layers_stay(sites):
    decisions = plan_attention(sites, TidalConfig(selection_layers=(2,)).resolve(4))
    assert [d.kind for d in decisions[4:]] == ["unchanged", "unchanged"]
    assert all("past num_layers=4" in d.reason and d.fallback for d in decisions[4:])


def test_indices_are_reused_only_under_the_same_mask():
    """Layers 3 and 4 attend under a sliding-window mask: layer 3 cannot reuse the full-attention
    selection layer 2 (dense, with the reason), layer 5 can; with sliding selection layer 3,
    sliding layer 4 reuses it."""
    model = ToyDecoder(num_layers=6, sliding=(3, 4))
    sites = find_attention(capture_graph(model, *model.inputs()).graph)
    decisions = plan_attention(sites, TidalConfig(selection_layers=(2,)).resolve(6))
    assert kinds(decisions)[3:] == [(3, "dense", 2), (4, "dense", 2), (5, "sparse", 2)]
    assert decisions[3].fallback and "another mask" in decisions[3].reason
    decisions = plan_attention(sites, TidalConfig(selection_layers=(2, 3)).resolve(6))
    assert kinds(decisions)[2:] == [(2, "dense", None), (3, "selection", None), (4, "sparse", 3), (5, "dense", 3)]
