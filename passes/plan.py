"""Decide what each attention site of a graph becomes, and why.

Kinds (design section 1): `dense` (exact attention through `tidal::dense_attention`),
`selection` (exact attention plus top-k indices), `sparse` (attention over the indices of the
nearest earlier selection layer), `oracle` (mode topk_oracle: a layer that selects its own
top-k and attends to it), `quest` (mode quest: attention over the layer's own top pages by
page criticality, from page metadata kept beside the cache), and `unchanged` (the original
SDPA node stays: prefill, or a call the tidal ops cannot compute). Every decision carries a
one-line reason for the report.

Indices are reused only between layers that attend under the same mask over caches of the same
length (the same graph value as attention mask: in a model with sliding-window layers, the
sliding and the full-attention layers each have their own): a sparse layer whose selection
layer attends otherwise stays dense, so it never attends outside its own mask.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from tidal_compile.config import ResolvedPlanConfig
from tidal_compile.passes import fx_utils
from tidal_compile.passes.find_attention import AttentionSite


class LayerKind(str, enum.Enum):
    """What an attention call becomes (compares equal to its name: `LayerKind.DENSE == "dense"`)."""

    DENSE = "dense"
    SELECTION = "selection"
    SPARSE = "sparse"
    ORACLE = "oracle"
    QUEST = "quest"
    UNCHANGED = "unchanged"

    __str__ = str.__str__  # prints as its name, in f-strings too


@dataclass
class LayerDecision:
    """What the rewrite does with one attention site."""

    site: AttentionSite
    kind: LayerKind
    reason: str
    source_layer: Optional[int] = None
    """For sparse layers: the selection layer whose indices they reuse."""
    fallback: bool = False
    """True when the config asked for a sparse layer but it stays dense (the user is warned)."""


def plan_attention(sites: list[AttentionSite], plan: ResolvedPlanConfig) -> list[LayerDecision]:
    """One decision per site, in graph order."""
    decisions: list[LayerDecision] = []
    selection_seen: dict[int, LayerDecision] = {}
    for site in sites:
        decision = _decide(site, plan, selection_seen)
        if decision.kind == LayerKind.SELECTION:
            selection_seen[site.layer] = decision
        decisions.append(decision)
    _demote_unused_selections(decisions)
    return decisions


def _demote_unused_selections(decisions: list[LayerDecision]) -> None:
    """A selection layer whose indices no sparse layer of this graph reads only needs dense attention."""
    used = {d.source_layer for d in decisions if d.kind == LayerKind.SPARSE}
    for d in decisions:
        if d.kind == LayerKind.SELECTION and d.site.layer not in used:
            d.kind = LayerKind.DENSE
            d.reason = f"selection layer, but no sparse layer of this graph reads its indices; {d.reason}"


def _decide(site: AttentionSite, plan: ResolvedPlanConfig,
            selection_seen: dict[int, LayerDecision]) -> LayerDecision:
    cfg = plan.config
    if site.unsupported is not None:
        return LayerDecision(site, LayerKind.UNCHANGED, f"stays SDPA: {site.unsupported}")
    layer = site.layer
    if layer >= plan.num_layers:
        return LayerDecision(site, LayerKind.UNCHANGED,
                             f"stays SDPA: layer {layer} is past num_layers={plan.num_layers}", fallback=True)
    if cfg.mode == "full":
        return LayerDecision(site, LayerKind.DENSE, "mode full: exact attention")
    if layer in plan.dense_layers:
        return LayerDecision(site, LayerKind.DENSE, f"in dense_layers {list(plan.dense_layers)}")
    if cfg.mode == "topk_oracle":
        return LayerDecision(site, LayerKind.ORACLE, f"mode topk_oracle: own top-{cfg.budget} by exact scores")
    if cfg.mode == "quest":
        return _quest(site, plan)
    if layer in plan.selection_layers:
        return LayerDecision(site, LayerKind.SELECTION,
                             f"in selection_layers {list(plan.selection_layers)}: picks top-{cfg.budget} "
                             f"({cfg.granularity})")
    return _sparse(site, plan, selection_seen)


def _sparse(site: AttentionSite, plan: ResolvedPlanConfig,
            selection_seen: dict[int, LayerDecision]) -> LayerDecision:
    earlier = [s for s in plan.selection_layers if s < site.layer]
    source = max(earlier)  # config validation guarantees one exists
    chosen = selection_seen.get(source)
    if chosen is None:
        return LayerDecision(site, LayerKind.DENSE, f"dense fallback: its selection layer {source} is not a "
                             "rewritten decode layer earlier in this graph (graph break or unsupported)",
                             source_layer=source, fallback=True)
    src = chosen.site
    if not _same_mask_and_cache(src, site):
        return LayerDecision(site, LayerKind.DENSE, f"dense fallback: attends under another mask or cache length "
                             f"than its selection layer {source} (sliding-window vs full attention); indices are "
                             "reused only between layers of the same mask", source_layer=source, fallback=True)
    if (src.num_heads, src.num_kv_heads) != (site.num_heads, site.num_kv_heads):
        return LayerDecision(site, LayerKind.DENSE, f"dense fallback: head counts ({site.num_heads}/"
                             f"{site.num_kv_heads}) differ from selection layer {source} "
                             f"({src.num_heads}/{src.num_kv_heads})", source_layer=source, fallback=True)
    return LayerDecision(site, LayerKind.SPARSE, f"indices from layer {source}, k={plan.config.budget}",
                         source_layer=source)


def _quest(site: AttentionSite, plan: ResolvedPlanConfig) -> LayerDecision:
    cfg = plan.config
    if site.quest_pages is None:
        return LayerDecision(site, LayerKind.DENSE, "dense fallback: mode quest keeps its page metadata in the KV cache; "
                             "this cache has none (pass cache=tidal_compile.TidalCache(model.config, max_cache_len, "
                             f"page_size={cfg.page_size}); compile_for_generation does)", fallback=True)
    key, page_min = (fx_utils.static_shape(node) for node in (site.key, site.quest_pages[0]))
    # With a symbolic cache length (a graph for several cache sizes) the op checks the page count.
    if key is not None and page_min is not None and page_min[2] != -(-key[2] // cfg.page_size):
        return LayerDecision(site, LayerKind.DENSE, f"dense fallback: the TidalCache keeps pages of another size than "
                             f"page_size={cfg.page_size} (metadata {page_min}, cache {key})", fallback=True)
    return LayerDecision(site, LayerKind.QUEST, f"mode quest: top {cfg.budget // cfg.page_size} pages of {cfg.page_size} "
                         "by page criticality, current page included")


def _same_mask_and_cache(a: AttentionSite, b: AttentionSite) -> bool:
    """Whether two calls attend under the same mask (the same graph value) over caches of equal length."""
    ka, kb = fx_utils.fake_value(a.key), fx_utils.fake_value(b.key)
    return a.attn_mask is b.attn_mask and ka is not None and kb is not None and fx_utils.known_equal(
        ka.shape[2], kb.shape[2])
