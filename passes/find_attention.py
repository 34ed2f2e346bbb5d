"""Find every scaled-dot-product-attention node of a graph and describe it.

For each SDPA node (the torch function, its ATen op, or a fused ATen variant) this pass reads
the layer index from `nn_module_stack`, the q/k/v/mask/scale arguments, looks through the
`repeat_kv` expansion of Hugging Face GQA models to the un-expanded KV cache, and decides
decode (query length statically 1) versus prefill. A decode-step node from a Llama model,
as Dynamo hands it over::

    getitem_9 = l_kwargs_past_key_values_layers_0_keys[(slice(None), slice(None), None, ...)]
    hidden_states_3 = getitem_9.expand(1, 2, 2, 32, 16)
    key = hidden_states_3.reshape(1, 4, 32, 16)
    ...  # value likewise
    attn_output = torch._C._nn.scaled_dot_product_attention(q_embed, key, value,
        attn_mask=attention_mask_1, dropout_p=0.0, scale=0.25, is_causal=False)

is described as `AttentionSite(layer=0, key=l_kwargs_past_key_values_layers_0_keys,
num_heads=4, num_kv_heads=2, is_decode=True, ...)`. A `TidalCache` with Quest pages writes each
layer through `tidal::quest_cache_write(keys, page_min, page_max, filled, ...)`; a site whose
cache tensor appears there gets those three graph inputs as `quest_pages`. Nothing in the graph
changes here.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

from tidal_compile.ops.library import kernel_fallback
from tidal_compile.passes import fx_utils
from tidal_compile.passes.fx_utils import aten


@dataclass
class AttentionSite:
    """One attention call of the graph and whether the tidal ops can take it over."""

    node: fx.Node
    layer: Optional[int]
    module_path: Optional[str]
    family: Optional[str]
    query: Any
    key: Any  # the un-expanded KV cache [B, Hkv, L, D] where repeat_kv was seen through
    value: Any
    attn_mask: Any
    scale: Optional[float]
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    is_decode: bool = False
    unsupported: Optional[str] = None
    """Why the tidal ops cannot compute this call (None when they can)."""
    quest_pages: Optional[tuple[fx.Node, fx.Node, fx.Node]] = None
    """(page_min, page_max, filled) of the cache layer `key`, when a TidalCache keeps them."""
    reference_reason: Optional[str] = None
    """Why the tidal ops would run their PyTorch reference on this CUDA call (None: the kernels)."""


def find_attention(graph: fx.Graph) -> list[AttentionSite]:
    """Every SDPA node of `graph`, in graph order, described as an :class:`AttentionSite`."""
    pages = {node.args[0]: tuple(node.args[1:4]) for node in graph.nodes
             if fx_utils.is_call(node, torch.ops.tidal.quest_cache_write.default, torch.ops.tidal.quest_cache_write)}
    sites = [_describe(node) for node in graph.nodes if fx_utils.is_sdpa(node)]
    for site in sites:
        site.quest_pages = pages.get(site.key)
    return sites


_INDEX_COPY = ("index_copy_", "index_copy", torch.index_copy, torch.ops.aten.index_copy.default,
               torch.ops.aten.index_copy_.default)


def cache_writes(graph: fx.Graph) -> Iterator[tuple[fx.Node, fx.Node, int]]:
    """Each KV-cache write (`cache.index_copy_(dim, positions, new)`) with a static cache size:
    (the write, the positions node, the cache's size along dim)."""
    for node in graph.nodes:
        if not fx_utils.is_call(node, *_INDEX_COPY) or len(node.args) < 3:
            continue
        cache, dim, index = node.args[:3]
        cache_value, index_value = fx_utils.fake_value(cache), fx_utils.fake_value(index)
        if cache_value is None or index_value is None or not isinstance(dim, int) or index_value.dim() != 1:
            continue
        if isinstance(cache_value.shape[dim], int):
            yield node, index, cache_value.shape[dim]


def cache_overflow(graph: fx.Graph) -> Optional[str]:
    """Why a KV-cache write of this graph cannot fit (more positions written than the cache
    holds: a prompt longer than a static cache), or None. Found before anything runs, where the
    write would otherwise fail inside a compiled kernel."""
    for _, index, capacity in cache_writes(graph):
        rows = fx_utils.fake_value(index).shape[0]
        if isinstance(rows, int) and rows > capacity:
            return (f"a KV-cache write of {rows} positions into a cache of {capacity} (a prompt longer than the "
                    f"static cache): build the cache with max_cache_len >= prompt length + new tokens")
    return None


_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int,
            "softmax")


def eager_attention_layers(graph: fx.Graph) -> list[int]:
    """Layers that compute attention without SDPA (a softmax inside an attention module, as
    `attn_implementation="eager"` does): the tidal ops cannot take those over."""
    layers = set()
    for node in graph.nodes:
        located = fx_utils.module_path(node) if fx_utils.is_call(node, *_SOFTMAX) else None
        if located and "att" in located[0].lower():
            layer = fx_utils.layer_index(located[0])
            if layer is not None:
                layers.add(layer)
    return sorted(layers)


def _describe(node: fx.Node) -> AttentionSite:
    args = fx_utils.sdpa_arguments(node)
    located = fx_utils.module_path(node)
    path, cls = located if located else (None, None)
    site = AttentionSite(
        node=node,
        layer=fx_utils.layer_index(path) if path else None,
        module_path=path,
        family=fx_utils.model_family(cls),
        query=args["query"], key=args["key"], value=args["value"],
        attn_mask=args["attn_mask"], scale=args["scale"])
    site.unsupported = _check(site, node, args)
    return site


def _check(site: AttentionSite, node: fx.Node, args: dict[str, Any]) -> Optional[str]:
    """Fill in head counts and decode-ness; return why the call can't be rewritten, or None."""
    if node.target not in fx_utils.PUBLIC_SDPA_TARGETS and not all(
            fx_utils.is_getitem(u) and u.args[1] == 0 for u in node.users):
        return f"{node.target} outputs besides the attention output (e.g. log-sum-exp) are used"
    q, k, v = (fx_utils.fake_value(args[name]) for name in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "q/k/v have no recorded shapes"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q/k/v are not 4-D [B, H, L, D] (got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D)"
    query_len = q.shape[2]
    if not isinstance(query_len, int):
        return f"query length is symbolic ({query_len}): the graph serves several lengths (prefill)"
    if query_len != 1:
        return f"prefill (query length {query_len})"
    site.is_decode = True
    if site.layer is None:
        return "no layer index: the node has no nn_module_stack with a layer number"
    if not args["enable_gqa"]:
        key, value = _look_through_repeat_kv(args["key"]), _look_through_repeat_kv(args["value"])
        if key is not None and value is not None:
            site.key, site.value = key, value
            k, v = fx_utils.fake_value(key), fx_utils.fake_value(value)
    site.num_heads, site.num_kv_heads = fx_utils.specialized(q.shape[1]), fx_utils.specialized(k.shape[1])
    if args["dropout_p"] not in (0, 0.0):
        return f"dropout_p={args['dropout_p']} (training-time attention)"
    if args["is_causal"] and not fx_utils.known_equal(k.shape[2], 1):
        return "is_causal=True with one query token attends only to position 0; not a decode step"
    if not (q.dtype.is_floating_point and q.dtype == k.dtype == v.dtype):
        return f"q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype} are not one floating-point dtype"
    if site.num_heads % site.num_kv_heads != 0:
        return f"{site.num_heads} query heads are not a multiple of {site.num_kv_heads} KV heads"
    mask_problem = _check_mask(args["attn_mask"], q, k)
    if mask_problem:
        return mask_problem
    if site.scale is None:
        site.scale = 1.0 / math.sqrt(fx_utils.specialized(q.shape[-1]))
    else:
        site.scale = fx_utils.specialized(site.scale)
        if site.scale is None:
            return "scale is not a number"
    if q.is_cuda:
        site.reference_reason = kernel_fallback(q, v, fx_utils.fake_value(args["attn_mask"]))
    return None


def _check_mask(mask: Any, q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    if mask is None:
        return None
    m = fx_utils.fake_value(mask)
    if m is None:
        return "attention mask is not a tensor"
    if m.dtype != torch.bool and not m.dtype.is_floating_point:
        return f"attention mask dtype {m.dtype} is neither bool nor floating point"
    target = (q.shape[0], q.shape[1], 1, k.shape[2])
    shape = (1,) * (4 - m.dim()) + tuple(m.shape)  # broadcasting aligns from the right
    if m.dim() > 4 or not all(fx_utils.known_equal(a, 1) or fx_utils.known_equal(a, b)
                              for a, b in zip(shape, target)):
        return f"attention mask shape {tuple(m.shape)} does not broadcast to [B, H, 1, L] = {target}"
    return None


# ------------------------------------------------------------------ repeat_kv


_UNSQUEEZE_LIKE = (operator.getitem, aten.unsqueeze.default, torch.unsqueeze, "unsqueeze")
_EXPAND = (aten.expand.default, "expand")
_SAME_SHAPE = (aten.clone.default, "contiguous", "clone")
_MERGE = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape,
          "reshape", "view")


def _look_through_repeat_kv(node: Any) -> Optional[fx.Node]:
    """The `[B, Hkv, L, D]` tensor that `repeat_kv` expanded into `node`, if it is one.

    repeat_kv is `x[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)`: query head
    h reads KV head h // G. Each step is checked by shape, so a repeat in the other order
    (head h reading KV head h % Hkv) is not mistaken for it.
    """
    chain = _view_chain(node)
    if chain is None:
        return None
    source, unsqueezed, expanded, merged = chain
    x = fx_utils.fake_value(source)
    final = fx_utils.fake_value(node)
    if x is None or final is None or x.dim() != 4:
        return None
    b, hkv, length, d = x.shape
    e = fx_utils.fake_value(expanded)
    if e is None or e.dim() != 5:
        return None
    groups = e.shape[2]
    ok = (fx_utils.same_shape(fx_utils.fake_value(unsqueezed).shape, (b, hkv, 1, length, d))
          and fx_utils.same_shape(e.shape, (b, hkv, groups, length, d))
          and fx_utils.same_shape(final.shape, (b, hkv * groups, length, d))
          and _is_plain_unsqueeze(unsqueezed))
    return source if ok else None


def _view_chain(node: Any) -> Optional[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """Match `merge(same_shape*(expand(unsqueeze(source))))`; return its four key nodes."""
    merged = node
    while fx_utils.is_call(merged, *_SAME_SHAPE):
        merged = merged.args[0]
    if not fx_utils.is_call(merged, *_MERGE):
        return None
    expanded = merged.args[0]
    while fx_utils.is_call(expanded, *_SAME_SHAPE):
        expanded = expanded.args[0]
    if not fx_utils.is_call(expanded, *_EXPAND):
        return None
    unsqueezed = expanded.args[0]
    if not fx_utils.is_call(unsqueezed, *_UNSQUEEZE_LIKE) or not isinstance(unsqueezed.args[0], fx.Node):
        return None
    return unsqueezed.args[0], unsqueezed, expanded, merged


def _is_plain_unsqueeze(node: fx.Node) -> bool:
    """An unsqueeze, or a getitem made only of full slices and None (no reordering)."""
    if not fx_utils.is_getitem(node):
        return True
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in index)
