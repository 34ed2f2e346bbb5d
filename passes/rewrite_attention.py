"""Replace decode-step SDPA nodes by the tidal ops the plan chose.

Before (layers 2 and 3 of a decode graph; `key_2` is `repeat_kv` of the layer's cache)::

    attn_output_10 = torch._C._nn.scaled_dot_product_attention(q_embed_2, key_2, value_2,
        attn_mask=attention_mask_1, dropout_p=0.0, scale=0.25, is_causal=False)
    ...
    attn_output_15 = torch._C._nn.scaled_dot_product_attention(q_embed_3, key_3, value_3, ...)

After (selection at layer 2, sparse at layer 3; the index tensor is a graph edge, and the
kernels read the un-expanded cache, so the repeat_kv views are gone; a mask the graph computes is
copied once, before its first use, and summarised once, and every op on it takes the copy and
the summary)::

    materialized_mask = torch.ops.tidal.materialized_mask.default(attention_mask_1)
    mask_summary = torch.ops.tidal.mask_summary.default(q_embed,
        l_kwargs_past_key_values_layers_0_keys, materialized_mask, 0, 0)
    getitem = mask_summary[0] ... getitem_4 = mask_summary[4]
    ...
    selection_attention = torch.ops.tidal.selection_attention.default(q_embed_2,
        l_kwargs_past_key_values_layers_2_keys, l_kwargs_past_key_values_layers_2_values,
        materialized_mask, 0.25, 256, 'query_head', 0, 0, [getitem, ..., getitem_4])
    tidal_out_2 = selection_attention[0]
    tidal_indices_2 = selection_attention[1]
    ...
    tidal_out_3 = torch.ops.tidal.sparse_attention.default(q_embed_3,
        l_kwargs_past_key_values_layers_3_keys, l_kwargs_past_key_values_layers_3_values,
        tidal_indices_2, 0.25)

Mode quest: each Quest layer's page metadata comes with its KV cache (a `TidalCache`: graph
inputs, found on the cache's `tidal::quest_cache_write` node); the layer's op brings it up to
date after the cache write, then attends over its chosen pages::

    quest_cache_write = torch.ops.tidal.quest_cache_write.default(keys_2, page_min_2, page_max_2,
        filled_2, sub_2)                                  # in the cache update: filled <= written from
    ...
    tidal_out_2 = torch.ops.tidal.quest_attention.default(q_embed_2, keys_2, values_2,
        materialized_mask, page_min_2, page_max_2, filled_2, 0.25, 256, 16, [getitem, ..., getitem_4])

Fused ATen SDPA variants return tuples; only their element 0 (the output) may be used.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

import tidal_compile.ops  # noqa: F401  (registers torch.ops.tidal)
from tidal_compile.config import TidalConfig
from tidal_compile.passes import fx_utils
from tidal_compile.passes.find_attention import AttentionSite, cache_writes
from tidal_compile.passes.plan import LayerDecision, LayerKind

log = logging.getLogger(__name__)
tidal = torch.ops.tidal


def rewrite_attention(gm: fx.GraphModule, decisions: list[LayerDecision], config: TidalConfig) -> Counter:
    """Rewrite `gm`'s graph in place; return how many nodes became each kind."""
    graph = gm.graph
    indices_of_layer: dict[int, fx.Node] = {}
    masks = SharedMasks(graph)
    replaced: dict[fx.Node, fx.Node] = {}  # an erased attention output -> what replaced it
    counts: Counter = Counter()
    for decision in decisions:
        if decision.kind == LayerKind.UNCHANGED:
            continue
        site = decision.site = _with_current_inputs(decision.site, replaced)
        with graph.inserting_before(site.node):
            base = (site.query, site.key, site.value)
            match decision.kind:
                case LayerKind.DENSE:
                    out = graph.call_function(tidal.dense_attention.default, (
                        *base, masks.mask(site), site.scale, masks.summary(site)))
                case LayerKind.QUEST:
                    out = _quest_attention(graph, decision, config, masks.mask(site), masks.summary(site))
                case LayerKind.SPARSE:
                    indices = indices_of_layer[decision.source_layer]
                    out = graph.call_function(tidal.sparse_attention.default, (*base, indices, site.scale))
                case LayerKind.SELECTION | LayerKind.ORACLE:
                    selected = graph.call_function(tidal.selection_attention.default, (
                        *base, masks.mask(site), site.scale, config.budget, config.granularity,
                        config.sink, config.recent, masks.summary(site, config.sink, config.recent)))
                    out = graph.call_function(operator.getitem, (selected, 0))
                    indices = graph.call_function(operator.getitem, (selected, 1))
                    if decision.kind == LayerKind.ORACLE:
                        out = graph.call_function(tidal.sparse_attention.default, (*base, indices, site.scale))
                    indices_of_layer[site.layer] = indices
                case _:
                    raise AssertionError(f"rewrite_attention has no case for layer kind {decision.kind!r}")
        out.meta["nn_module_stack"] = site.node.meta.get("nn_module_stack", {})
        replaced.update(dict.fromkeys(_replace_output(site.node, out), out))
        counts[decision.kind] += 1
    log.debug("tidal rewrite: %s", dict(counts))
    return counts


class SharedMasks:
    """What the tidal ops of a graph read of its masks, made once per distinct mask before the
    first attention that needs it: the mask (`mask`) and one `tidal::mask_summary` per window
    (`summary`)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.copies: dict[fx.Node, fx.Node] = {}
        self.summaries: dict[tuple, list[fx.Node]] = {}

    def mask(self, site: AttentionSite) -> Any:
        """The mask `site`'s op reads: a graph input as it is, a mask the graph computes through
        its one `tidal::materialized_mask` copy (else Inductor recomputes it for every reader)."""
        mask = site.attn_mask
        if not isinstance(mask, fx.Node) or mask.op == "placeholder":
            return mask
        if mask not in self.copies:
            self.copies[mask] = self.graph.call_function(tidal.materialized_mask.default, (mask,))
        return self.copies[mask]

    def summary(self, site: AttentionSite, sink: int = 0, recent: int = 0) -> list[fx.Node]:
        """The summary outputs for `site`'s mask and these windows; none when there is nothing to
        summarise (no mask and no window)."""
        recent = recent if recent > 1 else 0  # recent <= 1 keeps only the current token: the same summary
        if site.attn_mask is None and sink == 0 and recent == 0:
            return []
        key = (site.attn_mask, sink, recent)
        if key not in self.summaries:
            node = self.graph.call_function(tidal.mask_summary.default, (
                site.query, site.key, self.mask(site), sink, recent))
            self.summaries[key] = [self.graph.call_function(operator.getitem, (node, i)) for i in range(5)]
        return self.summaries[key]


def _quest_attention(graph: fx.Graph, decision: LayerDecision, config: TidalConfig, mask: Any,
                     summary: list[fx.Node]) -> fx.Node:
    site = decision.site
    return graph.call_function(tidal.quest_attention.default, (
        site.query, site.key, site.value, mask, *site.quest_pages, site.scale, config.budget, config.page_size,
        summary))


def _with_current_inputs(site: AttentionSite, replaced: dict[fx.Node, fx.Node]) -> AttentionSite:
    """`site` with inputs that an earlier rewrite erased (an attention output feeding this call)
    pointing at their replacements."""
    inputs = {name: getattr(site, name) for name in ("query", "key", "value", "attn_mask")}
    return dataclasses.replace(site, **{name: replaced.get(x, x) if isinstance(x, fx.Node) else x
                                        for name, x in inputs.items()})


def _replace_output(node: fx.Node, out: fx.Node) -> list[fx.Node]:
    """Route the uses of attention node `node` to `out` and erase it; returns the nodes erased
    that held its output (the node, or a fused variant's getitem users)."""
    if node.target in fx_utils.PUBLIC_SDPA_TARGETS:
        node.replace_all_uses_with(out)
        outputs = [node]
    else:
        outputs = list(node.users)
        for user in outputs:
            user.replace_all_uses_with(out)
            node.graph.erase_node(user)
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    fx_utils.erase_if_unused(*inputs)
    return outputs


def guard_cpu_cache_writes(graph: fx.Graph) -> int:
    """Before each KV-cache write on the CPU, check that its positions fit the cache, so that
    decoding past the end of a static cache raises a clear error instead of failing inside a
    compiled kernel (on CUDA the check would be a device assert: `TidalForward` checks on the
    host instead). Returns how many writes were guarded."""
    guarded = 0
    for write, positions, capacity in list(cache_writes(graph)):
        if fx_utils.fake_value(positions).is_cuda:
            continue
        with graph.inserting_before(write):
            checked = graph.call_function(tidal.checked_cache_positions.default, (positions, capacity))
        write.replace_input_with(positions, checked)  # the write now waits for the check
        guarded += 1
    return guarded
