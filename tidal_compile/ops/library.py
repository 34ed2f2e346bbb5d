"""The `tidal::` custom ops that the attention pass emits.

Each op is a `torch.library.triton_op`: on CUDA tensors its body launches the Triton kernels
of :mod:`tidal_compile.ops.kernels` (through `wrap_triton`, so Inductor compiles them inside
the graph); on other devices, and for inputs the kernels do not take (float64, per-head
masks), it runs the plain-PyTorch reference of :mod:`tidal_compile.ops.reference`. The body is
traced with fake tensors, which gives the ops their shapes under torch.compile.

    tidal::mask_summary(q, k, mask, sink, recent) -> summary
    tidal::dense_attention(q, k, v, mask, scale, summary) -> out
    tidal::selection_attention(q, k, v, mask, scale, budget, granularity, sink, recent, summary)
        -> (out, indices)
    tidal::sparse_attention(q, k, v, indices, scale) -> out
    tidal::quest_cache_write(k, page_min, page_max, filled!, written_from)
    tidal::quest_attention(q, k, v, mask, page_min!, page_max!, filled!, scale, budget, page_size, summary) -> out

q is `[B, H, 1, D]`, k/v the un-expanded KV cache `[B, Hkv, L, D]`, indices `int32 [B, S, k]`.
`summary` is what the kernels need to know of `mask` per sequence: the five int32 [B] tensors of
`tidal::mask_summary` (separate tensors, never views of one, as kernel arguments), or `[]` (a
list argument: custom ops take no default for it). The pass
computes it once per distinct mask and window of a graph and hands it to every op on that mask,
a graph edge like the indices; an op without one summarises the mask itself when it needs to.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from tidal_compile.config import GRANULARITIES
from tidal_compile.ops import reference

try:
    import triton  # noqa: F401
except ImportError:  # no Triton on this platform: the reference runs everywhere
    kernels = None
else:
    from tidal_compile.ops import kernels


def kernel_fallback(query: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None) -> Optional[str]:
    """Why the ops would run the plain-PyTorch reference instead of the Triton kernels on these
    (CUDA) inputs, or None when they run the kernels."""
    if kernels is None:
        return "Triton is not installed"
    return kernels.unsupported(query, value, attn_mask)


def _use_kernels(query: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None) -> bool:
    return query.is_cuda and kernel_fallback(query, value, attn_mask) is None


def index_sets(granularity: str, num_heads: int, num_kv_heads: int) -> int:
    """How many index sets (S) a selection layer emits per sequence."""
    return {"query_head": num_heads, "kv_head": num_kv_heads, "layer": 1}[granularity]


def check_decode_inputs(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Raise a clear error unless q/k/v have decode-step shapes the tidal ops accept."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"tidal attention expects 4-D q/k/v, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[2] != 1:
        raise ValueError(f"tidal attention handles one query token per sequence, got query length {query.shape[2]}")
    b, h, _, d = query.shape
    if key.shape[0] != b or value.shape[0] != b or key.shape[3] != d:
        raise ValueError(f"q {tuple(query.shape)} does not match k {tuple(key.shape)}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"k {tuple(key.shape)} and v {tuple(value.shape)} differ in batch, heads or length")
    if h % key.shape[1] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({key.shape[1]})")
    if not query.dtype.is_floating_point:
        raise ValueError(f"tidal attention needs floating-point q/k/v, got {query.dtype}")


def _check_selection_args(budget: int, granularity: str, sink: int, recent: int) -> None:
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if sink < 0 or recent < 0 or sink + max(recent, 1) > budget:
        raise ValueError(f"need sink, recent >= 0 and sink + max(recent, 1) <= budget, got "
                         f"sink={sink}, recent={recent}, budget={budget}")


def _check_indices(indices: Tensor, query: Tensor, key: Tensor) -> None:
    if indices.dtype != torch.int32 or indices.dim() != 3 or indices.shape[0] != query.shape[0]:
        raise ValueError(f"indices must be int32 [B, S, k], got {indices.dtype} {tuple(indices.shape)}")
    if indices.shape[1] not in (1, key.shape[1], query.shape[1]):
        raise ValueError(f"indices hold {indices.shape[1]} sets; expected 1, {key.shape[1]} (KV heads) "
                         f"or {query.shape[1]} (query heads)")


@torch.library.triton_op("tidal::mask_summary", mutates_args=())
def mask_summary(query: Tensor, key: Tensor, attn_mask: Optional[Tensor], sink: int, recent: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What the attention ops need to know of a decode mask shared by heads, per sequence of
    `query`'s batch over `key`'s length (`reference.mask_summary`)."""
    if _use_kernels(query, key, attn_mask):
        return kernels.summarize_mask(attn_mask, query.shape[0], key.shape[2], query.device, sink,
                                      recent).as_tensors()
    return reference.mask_summary(attn_mask, query.shape[0], key.shape[2], query.device, sink, recent)


@torch.library.triton_op("tidal::dense_attention", mutates_args=())
def dense_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                    scale: float, summary: Sequence[Tensor]) -> Tensor:
    """Exact decode attention over the un-expanded KV cache."""
    check_decode_inputs(query, key, value)
    if _use_kernels(query, value, attn_mask):
        return kernels.flash_decode(query, key, value, attn_mask, scale,
                                    summary=kernels.MaskSummary.of(summary))[0]
    return reference.dense_attention(query, key, value, attn_mask, scale)


@torch.library.triton_op("tidal::selection_attention", mutates_args=())
def selection_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                        scale: float, budget: int, granularity: str, sink: int, recent: int,
                        summary: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact decode attention and the top-`budget` positions (int32 [B, S, budget]); a given
    `summary` must be of this `sink` and `recent`."""
    check_decode_inputs(query, key, value)
    _check_selection_args(budget, granularity, sink, recent)
    if _use_kernels(query, value, attn_mask):
        summary = kernels.MaskSummary.of(summary) or kernels.summarize_mask(
            attn_mask, query.shape[0], key.shape[2], query.device, sink, recent)
        out, lse, logits = kernels.flash_decode(query, key, value, attn_mask, scale, emit_logits=True,
                                                summary=summary)
        sets = index_sets(granularity, query.shape[1], key.shape[1])
        indices = kernels.select_topk(logits, lse, summary, budget, sets, granularity != "query_head")
        return out, indices
    return reference.selection_attention(query, key, value, attn_mask, scale, budget, granularity,
                                         sink, recent)


@torch.library.triton_op("tidal::sparse_attention", mutates_args=())
def sparse_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float) -> Tensor:
    """Decode attention over exactly the cache positions in `indices` (-1 slots ignored)."""
    check_decode_inputs(query, key, value)
    _check_indices(indices, query, key)
    if _use_kernels(query, value):
        return kernels.sparse_decode(query, key, value, indices, scale)
    return reference.sparse_attention(query, key, value, indices, scale)


def _check_page_metadata(key: Tensor, page_min: Tensor, page_max: Tensor, filled: Tensor, page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    b, hkv, length, d = key.shape
    expected = (b, hkv, -(-length // page_size), d)
    for name, t in (("page_min", page_min), ("page_max", page_max)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be [B, Hkv, ceil(L / page_size), D] = {list(expected)}, got "
                             f"{list(t.shape)}")
    if tuple(filled.shape) != (b,) or filled.dtype != torch.int32:
        raise ValueError(f"filled must be int32 [B] = [{b}], got {filled.dtype} {list(filled.shape)}")


@torch.library.custom_op("tidal::checked_cache_positions", mutates_args=())
def checked_cache_positions(positions: Tensor, capacity: int) -> Tensor:
    """`positions` (a copy), after checking that a KV-cache write there fits a static cache of
    `capacity` positions: a clear error instead of an index error inside a compiled kernel."""
    if positions.numel() and int(positions.max()) >= capacity:
        raise ValueError(f"tidal: a KV-cache write past the end of the static cache ({capacity} positions) at "
                         f"position {int(positions.max())}: decoding past its end; build the cache with "
                         "max_cache_len >= prompt length + new tokens")
    return positions.clone()


@checked_cache_positions.register_fake
def _(positions, capacity):
    return torch.empty_like(positions)


@torch.library.custom_op("tidal::materialized_mask", mutates_args=())
def materialized_mask(attn_mask: Tensor) -> Tensor:
    """A copy of an attention mask that the graph computes, made once for every tidal op that
    reads it: an op of its own, so that Inductor cannot fuse the mask's computation (Hugging
    Face's decode mask: `arange` against the cache positions) into each reader, a launch per
    layer."""
    return attn_mask.clone(memory_format=torch.contiguous_format)


@materialized_mask.register_fake
def _(attn_mask):
    return torch.empty_like(attn_mask, memory_format=torch.contiguous_format)


@torch.library.triton_op("tidal::quest_cache_write", mutates_args=("filled",))
def quest_cache_write(key: Tensor, page_min: Tensor, page_max: Tensor, filled: Tensor, written_from: Tensor) -> None:
    """A KV-cache layer `key` was written from position `written_from` on: the page metadata of
    those pages is stale, so `filled` (int32 [B], positions summarised) drops to at most it.
    Called by `TidalCache` layers on every write; the tidal pass finds a layer's page metadata
    (`page_min`, `page_max`, `filled`) on this node, by the cache tensor `key`. Torch ops only:
    Inductor fuses them into a neighbouring kernel (as an opaque op: two launches a layer)."""
    filled.copy_(torch.minimum(filled, written_from.to(filled.dtype)))


@torch.library.custom_op("tidal::quest_update_metadata_reference", mutates_args=("page_min", "page_max", "filled"))
def quest_update_metadata_reference(key: Tensor, attn_mask: Optional[Tensor], page_min: Tensor, page_max: Tensor,
                                    filled: Tensor, page_size: int) -> None:
    """The reference update, an opaque op: it reads lengths on the host, which tracing cannot."""
    reference.quest_update_metadata(key, attn_mask, page_min, page_max, filled, page_size)


@quest_update_metadata_reference.register_fake
def _(key, attn_mask, page_min, page_max, filled, page_size) -> None:
    return None


@torch.library.triton_op("tidal::quest_attention", mutates_args=("page_min", "page_max", "filled"))
def quest_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], page_min: Tensor,
                    page_max: Tensor, filled: Tensor, scale: float, budget: int, page_size: int,
                    summary: Sequence[Tensor]) -> Tensor:
    """Quest decode attention over the `budget // page_size` most critical pages per query head
    (the current token's page always among them). First brings the layer's page metadata
    (`page_min`/`page_max` [B, Hkv, P, D], kept with its KV cache) up to date in place: the pages
    from the one holding position `filled` (int32 [B]: summarised up to there; every cache write
    lowers it to where it wrote) to the valid length, which `filled` then becomes."""
    check_decode_inputs(query, key, value)
    _check_page_metadata(key, page_min, page_max, filled, page_size)
    if budget < page_size:
        raise ValueError(f"budget ({budget}) must hold at least one page of {page_size} positions")
    if _use_kernels(query, value, attn_mask):
        return kernels.quest_attention(query, key, value, attn_mask, page_min, page_max, filled, scale, budget,
                                       page_size, kernels.MaskSummary.of(summary))
    quest_update_metadata_reference(key, attn_mask, page_min, page_max, filled, page_size)
    return reference.quest_attention(query, key, value, attn_mask, page_min, page_max, scale, budget, page_size)
