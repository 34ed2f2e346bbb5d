"""What the tidal backend did to each compiled graph, for `tidal_compile.explain(...)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from tidal_compile.config import TidalConfig
from tidal_compile.passes import PassResult
from tidal_compile.passes.plan import LayerKind


@dataclass(frozen=True)
class LayerReport:
    """One attention call: its layer, what it became and why."""

    layer: Optional[int]
    module_path: Optional[str]
    phase: str  # "decode" or "prefill"
    kind: LayerKind
    reason: str
    source_layer: Optional[int] = None
    fallback: bool = False
    reference_reason: Optional[str] = None
    """Set when the layer's tidal ops run the PyTorch reference on CUDA instead of the kernels."""

    def __str__(self) -> str:
        layer = "  ?" if self.layer is None else f"{self.layer:3d}"
        slow = f" [PyTorch reference, not the kernels: {self.reference_reason}]" if self.reference_reason else ""
        return f"  layer {layer}  {self.phase:<7}  {self.kind:<9}  {self.reason}{slow}"


@dataclass(frozen=True)
class GraphReport:
    """The decisions for one graph handed to the backend."""

    graph_id: int
    config: TidalConfig
    num_layers: Optional[int]
    family: Optional[str]
    layers: tuple[LayerReport, ...]
    parameter_ids: frozenset[int]
    eager_attention: tuple[int, ...] = ()
    """Layers computing attention without scaled_dot_product_attention (not rewritable)."""
    sharding: Optional[str] = None
    """Which rank of a tensor-parallel model this graph is and which heads its layers hold."""
    projections: Optional[str] = None
    """Which linear projections the graph computes as one matrix product (passes/merge_projections)."""

    @property
    def phase(self) -> str:
        phases = {r.phase for r in self.layers}
        return phases.pop() if len(phases) == 1 else ("mixed" if phases else "no attention")

    def count(self, kind: str) -> int:
        return sum(r.kind == kind for r in self.layers)

    def summary(self) -> str:
        kinds = ", ".join(f"{self.count(k)} {k}" for k in LayerKind if self.count(k))
        cfg = self.config
        detail = f"page_size={cfg.page_size}" if cfg.mode == "quest" else f"granularity={cfg.granularity}"
        return (f"tidal graph {self.graph_id} ({self.phase}, {self.family or 'unknown family'}, "
                f"{self.num_layers} layers, mode={cfg.mode}, budget={cfg.budget}, "
                f"{detail}): {kinds or 'no attention layers'}")

    def __str__(self) -> str:
        notes = [f"  {note}" for note in (self.sharding, self.projections) if note]
        lines = [self.summary(), *notes, *map(str, self.layers)]
        if self.eager_attention:
            lines.append(f"  layers {list(self.eager_attention)}: {EAGER_ATTENTION}")
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What the user must hear about this graph: layers kept dense against the config,
        decode calls left as SDPA, eager attention, and CUDA calls on the PyTorch reference."""
        messages = []
        kept = [f"tidal: layer {r.layer} stays dense: {r.reason}" for r in self.layers if r.fallback]
        kept += [f"tidal: layer {r.layer} decodes with the model's own SDPA: {r.reason}" for r in self.layers
                 if r.kind == LayerKind.UNCHANGED and r.phase == "decode" and not r.fallback]
        if kept:
            messages.append("\n".join(kept))
        if self.eager_attention:
            messages.append(f"tidal: layers {list(self.eager_attention)}: {EAGER_ATTENTION}")
        slow = [r.layer for r in self.layers if r.reference_reason]
        if slow:
            reason = next(r.reference_reason for r in self.layers if r.reference_reason)
            messages.append(f"tidal: on CUDA, layers {slow} run the plain-PyTorch reference, not the Triton "
                            f"kernels: {reason}")
        return messages


EAGER_ATTENTION = ("attention computed without scaled_dot_product_attention (eager attention), which tidal "
                   "cannot rewrite, so nothing was: load the model with attn_implementation=\"sdpa\" (or call "
                   "model.set_attn_implementation(\"sdpa\")) where the model supports it")


class Explanation(list):
    """The graph reports that `explain` found; prints as one table per graph, after the model's
    calibration summary when its config was calibrated and how its decode steps are launched
    when `compile_for_generation` set it up with `step_graphs=True`."""

    calibration: Optional[str] = None
    step_graphs: Optional[str] = None

    def __str__(self) -> str:
        parts = [part for part in (self.calibration, self.step_graphs) if part]
        if not self:
            parts.append("tidal: no graph compiled yet (reports appear after the first call of the compiled model)")
        return "\n\n".join(parts + [str(report) for report in self])

    @property
    def layers(self) -> list[LayerReport]:
        return [layer for graph in self for layer in graph.layers]


_REPORTS: list[GraphReport] = []


def build_report(result: PassResult, config: TidalConfig, example_inputs: Iterable[Any],
                 projections: Optional[str] = None) -> GraphReport:
    """Turn a pass result into a report, remembering which parameters the graph uses."""
    layers = tuple(
        LayerReport(layer=d.site.layer, module_path=d.site.module_path,
                    phase="decode" if d.site.is_decode else "prefill", kind=d.kind, reason=d.reason,
                    source_layer=d.source_layer, fallback=d.fallback,
                    reference_reason=d.site.reference_reason if d.kind != LayerKind.UNCHANGED else None)
        for d in result.decisions)
    family = next((d.site.family for d in result.decisions if d.site.family), None)
    params = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
    num_layers = result.plan.num_layers if result.plan else None
    return GraphReport(result.graph_id, config, num_layers, family, layers, params, tuple(result.eager_attention),
                       _sharding(result), projections)


def _sharding(result: PassResult) -> Optional[str]:
    tp = result.sharding
    if tp is None:
        return None
    rank = f"tensor parallel: rank {tp.rank} of {tp.world_size}"
    site = next((d.site for d in result.decisions if d.site.num_heads), None)
    if site is None:  # prefill calls are not looked into
        return rank
    kv_heads = site.num_kv_heads or site.num_heads
    return f"{rank}; every layer here holds query {tp.heads(site.num_heads)} and KV {tp.heads(kv_heads)}"


def record(report: GraphReport) -> None:
    _REPORTS.append(report)


def clear_reports() -> None:
    """Forget all recorded reports (e.g. after `torch._dynamo.reset()`)."""
    _REPORTS.clear()


def explain(target: Any = None) -> Explanation:
    """Reports of the graphs the tidal backend compiled.

    `target` may be a model (or the module `torch.compile` returned): only graphs that use its
    parameters are listed, after its calibration summary and, for a model set up with
    `compile_for_generation(..., step_graphs=True)`, how its decode steps were launched (replayed
    from one CUDA graph, or why not). With no target, or a compiled function, every graph is listed.
    """
    from tidal_compile.calibration import calibration_summary

    module = getattr(target, "_orig_mod", target)
    if isinstance(module, torch.nn.Module):
        ids = {id(p) for p in module.parameters()}
        explanation = Explanation(r for r in _REPORTS if r.parameter_ids & ids)
        explanation.calibration = calibration_summary(module)
        step_graph = getattr(module.__dict__.get("forward"), "step_graph", None)
        explanation.step_graphs = step_graph.describe() if step_graph else None
        return explanation
    return Explanation(_REPORTS)
