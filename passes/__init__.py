"""FX passes of the tidal backend: find attention, plan layer kinds, rewrite (installed as
`tidal_compile.passes`)."""

from tidal_compile.passes.find_attention import AttentionSite, find_attention
from tidal_compile.passes.pass_manager import PassResult, run_tidal_passes
from tidal_compile.passes.plan import LayerDecision, LayerKind, plan_attention
from tidal_compile.passes.rewrite_attention import rewrite_attention

__all__ = ["AttentionSite", "LayerDecision", "LayerKind", "PassResult", "find_attention", "plan_attention",
           "rewrite_attention", "run_tidal_passes"]
