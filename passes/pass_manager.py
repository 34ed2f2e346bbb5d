"""Run the tidal passes over one graph, in their one fixed order: find -> plan -> rewrite.

Set `TIDAL_DUMP_GRAPHS=<folder>` to write each graph's code before and after the rewrite.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.fx as fx

from tidal_compile.config import ConfigError, ResolvedPlanConfig, TidalConfig
from tidal_compile.passes.find_attention import AttentionSite, cache_overflow, eager_attention_layers, find_attention
from tidal_compile.passes.plan import LayerDecision, LayerKind, plan_attention
from tidal_compile.passes.rewrite_attention import guard_cpu_cache_writes, rewrite_attention
from tidal_compile.passes.sharding import TensorParallel, check_granularity, tensor_parallel

_graph_ids = itertools.count()


@dataclass
class PassResult:
    """What the passes saw and did to one graph."""

    graph_id: int
    plan: Optional[ResolvedPlanConfig]
    decisions: list[LayerDecision]
    counts: Counter
    eager_attention: list[int] = field(default_factory=list)
    """Layers computing attention without SDPA (nothing the tidal ops can take over)."""
    sharding: Optional[TensorParallel] = None
    """The rank of a tensor-parallel model this graph is (None: not sharded)."""


def model_depth(sites: list[AttentionSite]) -> Optional[int]:
    """Number of layers implied by the graph: highest layer index seen + 1."""
    layers = [s.layer for s in sites if s.layer is not None]
    return max(layers) + 1 if layers else None


def run_tidal_passes(gm: fx.GraphModule, config: TidalConfig, num_layers: Optional[int] = None) -> PassResult:
    """Find, plan and rewrite the attention of `gm` in place, and recompile it."""
    graph_id = next(_graph_ids)
    overflow = cache_overflow(gm.graph)
    if overflow:
        raise ConfigError(f"tidal: {overflow}")
    sites = find_attention(gm.graph)
    with_sdpa = {s.layer for s in sites}
    eager = [layer for layer in eager_attention_layers(gm.graph) if layer not in with_sdpa]
    depth = num_layers or model_depth(sites)
    sharding = tensor_parallel(gm)
    if depth is None or not sites:  # no attention, or none with a layer index: nothing to rewrite
        decisions = [LayerDecision(s, LayerKind.UNCHANGED, f"stays SDPA: {s.unsupported}") for s in sites]
        return PassResult(graph_id, None, decisions, Counter(), eager, sharding)
    plan = config.resolve(depth)
    if sharding and any(s.is_decode for s in sites):
        check_granularity(config, sharding)
    decisions = plan_attention(sites, plan)
    _dump(gm, graph_id, "before")
    counts = rewrite_attention(gm, decisions, config)
    guard_cpu_cache_writes(gm.graph)
    gm.graph.lint()
    gm.recompile()
    _dump(gm, graph_id, "after")
    return PassResult(graph_id, plan, decisions, counts, eager, sharding)


def _dump(gm: fx.GraphModule, graph_id: int, stage: str) -> None:
    folder = os.environ.get("TIDAL_DUMP_GRAPHS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"graph_{graph_id}_{stage}.py").write_text(gm.code)
