"""Test-side TidalDecode: patches each Hugging Face attention layer by its own `layer_idx`.

This is the independent check of the whole pass (property d): it never looks at FX graphs, so
a wrong layer mapping, a wrong index edge or a wrong kind in the pass shows up as different
logits. Decode steps use the float64 loops of `oracle`; prefill uses the stock SDPA path.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import oracle

NAME = "tidal_test_oracle"


class LayerPlan:
    """Which layers are dense / selection / sparse, and the current step's index sets."""

    def __init__(self, num_layers: int, dense: tuple[int, ...], selection: tuple[int, ...], budget: int,
                 granularity: str, mode: str = "tidal", page_size: int = 16):
        self.num_layers, self.dense, self.selection = num_layers, set(dense), set(selection)
        self.budget, self.granularity, self.mode, self.page_size = budget, granularity, mode, page_size
        self.indices: dict[int, torch.Tensor] = {}

    def kind(self, layer: int) -> str:
        if self.mode == "full" or layer in self.dense:
            return "dense"
        if self.mode in ("topk_oracle", "quest"):
            return "oracle" if self.mode == "topk_oracle" else "quest"
        return "selection" if layer in self.selection else "sparse"


def _attention(plan: LayerPlan):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        layer, scale = module.layer_idx, scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask if attention_mask is not None else None
        kind = plan.kind(layer)
        if kind in ("selection", "oracle"):
            plan.indices[layer] = oracle.selection_indices(query, key, mask, scale, plan.budget, plan.granularity)
        if kind == "quest":
            out = oracle.quest(query, key, value, mask, scale, plan.budget, plan.page_size)
        elif kind == "dense" or kind == "selection":
            out = oracle.dense(query, key, value, mask, scale)
        else:
            source = layer if kind == "oracle" else max(s for s in plan.selection if s < layer)
            out = oracle.sparse(query, key, value, plan.indices[source], scale)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@contextlib.contextmanager
def patched(model: torch.nn.Module, plan: LayerPlan) -> Iterator[torch.nn.Module]:
    """Run `model` with the test-side TidalDecode attention; restore SDPA afterwards."""
    AttentionInterface.register(NAME, _attention(plan))
    AttentionMaskInterface.register(NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
