"""Plain-PyTorch references for the decode-step attention ops (design section 1).

Shapes: query `[B, H, 1, D]`; key/value the un-expanded cache `[B, Hkv, L, D]` with
`H % Hkv == 0`; `attn_mask` broadcastable to `[B, H, 1, L]`, bool (True = attend) or additive
float (a value of -inf or the dtype's minimum masks the position, as Hugging Face builds it).
Indices are `int32 [B, S, k]` with `S` = 1, `Hkv` or `H`: the valid positions ascending, then
`-1` for unused slots. Arithmetic is float32 (float64 for float64 inputs); outputs take the
query dtype. These functions define the semantics; the Triton kernels must match them.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

INVALID_INDEX = -1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv(x: Tensor, num_heads: int) -> Tensor:
    """`[B, Hkv, L, D]` -> `[B, H, L, D]`: query head h reads KV head h // (H // Hkv)."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def mask_to_bias(attn_mask: Optional[Tensor], shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """Split a mask into (valid `[B, H, L]` bool, additive bias `[B, H, L]` or None)."""
    b, h, length = shape
    if attn_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device), None
    m = attn_mask.expand(b, h, 1, length)[:, :, 0, :]
    if m.dtype == torch.bool:
        return m, None
    valid = m > torch.finfo(m.dtype).min
    return valid, m.to(dtype)


def attention_logits(query: Tensor, key: Tensor, attn_mask: Optional[Tensor], scale: float
                     ) -> tuple[Tensor, Tensor]:
    """Pre-softmax logits `[B, H, L]` (-inf where masked) and the valid positions `[B, H, L]`."""
    b, h, _, _ = query.shape
    length = key.shape[2]
    dtype = compute_dtype(query.dtype)
    k = expand_kv(key, h).to(dtype)
    logits = torch.einsum("bhd,bhld->bhl", query[:, :, 0, :].to(dtype), k) * scale
    valid, bias = mask_to_bias(attn_mask, (b, h, length), dtype, query.device)
    if bias is not None:
        logits = logits + bias
    return logits.masked_fill(~valid, float("-inf")), valid


def _softmax_weighted_sum(logits: Tensor, values: Tensor, out_dtype: torch.dtype) -> Tensor:
    """softmax(logits) @ values for logits `[B, H, N]`, values `[B, H, N, Dv]` -> `[B, H, 1, Dv]`."""
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", probs, values.to(probs.dtype))[:, :, None, :].to(out_dtype)


def dense_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                    scale: float) -> Tensor:
    """Exact attention of one query token over all valid cache positions."""
    logits, _ = attention_logits(query, key, attn_mask, scale)
    return _softmax_weighted_sum(logits, expand_kv(value, query.shape[1]), query.dtype)


def selection_ranking(logits: Tensor, valid: Tensor, num_kv_heads: int, granularity: str
                      ) -> tuple[Tensor, Tensor]:
    """The score each index set ranks positions by, and which positions it may pick.

    query_head: each head's logits. kv_head: the sum of softmax probabilities over the G query
    heads sharing a KV head. layer: the sum of probabilities over all heads. A position is
    valid for a set if it is valid for any head of the set.
    """
    if granularity == "query_head":
        return logits, valid
    b, h, length = logits.shape
    groups = num_kv_heads if granularity == "kv_head" else 1
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    # Head by head, elementwise: every position's sum is added in the same order, so equal
    # probabilities give exactly equal ranks (ties go to the lower position). A reduction over
    # the head dim (`.sum(2)`) adds vectorised positions and the tail in different orders.
    rank = functools.reduce(torch.add, probs.view(b, groups, h // groups, length).unbind(2))
    return rank, valid.view(b, groups, h // groups, length).any(2)


def top_positions(rank: Tensor, valid: Tensor, budget: int, sink: int = 0, recent: int = 0) -> Tensor:
    """The `budget` positions of each row with the highest rank, as sorted int32 indices.

    Always kept (inside the budget): the last valid position (the current token), the first
    `sink` and the last `recent` valid positions. Invalid positions are never chosen; ties go to
    the lower position. Rows with fewer than `budget` valid positions end in -1.
    """
    length = rank.shape[-1]
    count_from_start = valid.cumsum(-1)
    count_from_end = valid.sum(-1, keepdim=True) - count_from_start + 1
    forced = valid & ((count_from_start <= sink) | (count_from_end <= max(recent, 1)))
    lowest = torch.finfo(rank.dtype).min
    key = torch.where(valid, rank.clamp(min=lowest), torch.full_like(rank, float("-inf")))
    key = key.masked_fill(forced, float("inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :budget]
    picked = torch.gather(valid, -1, order)
    # Sort ascending with the unused slots last: park them past the end, sort, then mark -1.
    parked = torch.where(picked, order, torch.full_like(order, length)).sort(dim=-1).values
    indices = torch.where(parked < length, parked, torch.full_like(parked, INVALID_INDEX))
    if indices.shape[-1] < budget:
        pad = indices.new_full((*indices.shape[:-1], budget - indices.shape[-1]), INVALID_INDEX)
        indices = torch.cat([indices, pad], dim=-1)
    return indices.to(torch.int32)


def selection_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                        scale: float, budget: int, granularity: str, sink: int = 0, recent: int = 0
                        ) -> tuple[Tensor, Tensor]:
    """Exact attention output plus the top-`budget` positions by attention score."""
    logits, valid = attention_logits(query, key, attn_mask, scale)
    out = _softmax_weighted_sum(logits, expand_kv(value, query.shape[1]), query.dtype)
    rank, rank_valid = selection_ranking(logits, valid, key.shape[1], granularity)
    return out, top_positions(rank, rank_valid, budget, sink, recent)


def indices_per_query_head(indices: Tensor, num_heads: int) -> Tensor:
    """`[B, S, k]` index sets -> `[B, H, k]`, one row per query head (S = 1, Hkv or H)."""
    sets = indices.shape[1]
    if sets == num_heads:
        return indices
    return indices.repeat_interleave(num_heads // sets, dim=1)


def sparse_attention(query: Tensor, key: Tensor, value: Tensor, indices: Tensor, scale: float) -> Tensor:
    """softmax(q K_I^T s) V_I over exactly the positions I of each head's index set (-1 ignored)."""
    b, h, _, d = query.shape
    dtype = compute_dtype(query.dtype)
    idx = indices_per_query_head(indices, h).long()
    used = idx >= 0
    gather_at = idx.clamp(min=0)[..., None]
    k_sel = torch.gather(expand_kv(key, h), 2, gather_at.expand(-1, -1, -1, d)).to(dtype)
    v_sel = torch.gather(expand_kv(value, h), 2, gather_at.expand(-1, -1, -1, value.shape[-1]))
    logits = torch.einsum("bhd,bhkd->bhk", query[:, :, 0, :].to(dtype), k_sel) * scale
    logits = logits.masked_fill(~used, float("-inf"))
    return _softmax_weighted_sum(logits, v_sel, query.dtype)


# ---------------------------------------------------------------------------- Quest
# Pages of `page_size` cache positions; per page and KV head the channel-wise min and max of the
# keys of its valid positions (design section 1, "Baseline modes").


def valid_positions(attn_mask: Optional[Tensor], batch: int, length: int, device: torch.device) -> Tensor:
    """Which cache positions each sequence may attend to, `[B, L]` bool (a mask shared by heads)."""
    return mask_to_bias(attn_mask, (batch, 1, length), torch.float32, device)[0][:, 0, :]


def mask_summary(attn_mask: Optional[Tensor], batch: int, length: int, device: torch.device, sink: int = 0,
                 recent: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per sequence, int32 [B] each: valid length (last valid position + 1), first valid position
    (`length` when none), valid count, SinkEnd and RecentStart: the valid positions before SinkEnd
    are the first `sink` valid ones, those from RecentStart on the last max(recent, 1) (the
    kernels may place SinkEnd anywhere that holds true)."""
    valid = valid_positions(attn_mask, batch, length, device)
    positions = torch.arange(length, device=device)
    count = valid.sum(-1)
    first = torch.where(valid, positions, length).amin(-1) if length else count.new_full((batch,), length)
    seen = valid.cumsum(-1)  # valid positions up to and including each position
    sink_end = (seen <= sink).sum(-1)
    recent_start = (seen <= count[:, None] - max(recent, 1)).sum(-1)
    return tuple(t.to(torch.int32) for t in (valid_length(valid), first, count, sink_end, recent_start))


def valid_length(valid: Tensor) -> Tensor:
    """Last valid position + 1 per sequence, `[B]` int64 (0 when none is valid)."""
    positions = torch.arange(1, valid.shape[-1] + 1, device=valid.device)
    return torch.where(valid, positions, 0).amax(-1)


def quest_page_metadata(key: Tensor, attn_mask: Optional[Tensor], page_size: int) -> tuple[Tensor, Tensor]:
    """Channel-wise key (min, max) per page, recomputed from the whole cache: `[B, Hkv, P, D]`,
    P = ceil(L / page_size), in the key dtype; 0 for pages with no valid position."""
    b, hkv, length, d = key.shape
    pages = -(-length // page_size)
    valid = valid_positions(attn_mask, b, length, key.device)
    pad = pages * page_size - length
    k = torch.nn.functional.pad(key, (0, 0, 0, pad)).view(b, hkv, pages, page_size, d)
    ok = torch.nn.functional.pad(valid, (0, pad)).view(b, 1, pages, page_size, 1)
    any_ok = ok.any(3)
    low = torch.where(ok, k, float("inf")).amin(3)
    high = torch.where(ok, k, float("-inf")).amax(3)
    return torch.where(any_ok, low, 0).to(key.dtype), torch.where(any_ok, high, 0).to(key.dtype)


def quest_update_metadata(key: Tensor, attn_mask: Optional[Tensor], page_min: Tensor, page_max: Tensor,
                          filled: Tensor, page_size: int) -> None:
    """Bring the page metadata up to date in place after cache writes, touching only the pages
    that changed: from the page holding position `filled[b]` (the first position not
    summarised since it was written) to the page of the last valid position; everything when
    the valid length shrank. Sets `filled` to the valid length."""
    b = key.shape[0]
    length = valid_length(valid_positions(attn_mask, b, key.shape[2], key.device))
    for row in range(b):
        end, done = int(length[row]), int(filled[row])
        start = 0 if done > end else done // page_size
        stop = -(-end // page_size)
        if stop <= start:
            continue
        lo, hi = start * page_size, min(stop * page_size, key.shape[2])
        row_mask = None if attn_mask is None else attn_mask.expand(b, 1, 1, key.shape[2])[row:row + 1, ..., lo:hi]
        low, high = quest_page_metadata(key[row:row + 1, :, lo:hi], row_mask, page_size)
        page_min[row, :, start:stop] = low[0]
        page_max[row, :, start:stop] = high[0]
    filled.copy_(length.to(filled.dtype))


def quest_page_scores(query: Tensor, page_min: Tensor, page_max: Tensor, page_valid: Tensor) -> Tensor:
    """Page criticality per query head, `[B, H, P]`: sum_d max(q_d * min_d, q_d * max_d); -inf
    for pages without a valid position. page_valid is `[B, P]`."""
    h = query.shape[1]
    dtype = compute_dtype(query.dtype)
    q = query[:, :, 0, None, :].to(dtype)  # [B, H, 1, D]
    low, high = expand_kv(page_min, h).to(dtype), expand_kv(page_max, h).to(dtype)
    scores = torch.maximum(q * low, q * high).sum(-1)
    return scores.masked_fill(~page_valid[:, None, :], float("-inf"))


def pages_valid(valid: Tensor, page_size: int, pages: int) -> Tensor:
    """`[B, P]`: pages holding at least one valid position."""
    pad = pages * page_size - valid.shape[-1]
    return torch.nn.functional.pad(valid, (0, pad)).view(valid.shape[0], pages, page_size).any(-1)


def quest_select_pages(query: Tensor, page_min: Tensor, page_max: Tensor, attn_mask: Optional[Tensor],
                       length: int, budget: int, page_size: int) -> Tensor:
    """Per query head, the page of the current token plus the `budget // page_size - 1` other
    pages of highest criticality (ties to the lower page): sorted int32 `[B, H, budget // page_size]`,
    -1 in unused slots."""
    valid = valid_positions(attn_mask, query.shape[0], length, query.device)
    return _top_pages(query, page_min, page_max, valid, budget, page_size)


def _top_pages(query: Tensor, page_min: Tensor, page_max: Tensor, valid: Tensor, budget: int, page_size: int
               ) -> Tensor:
    page_ok = pages_valid(valid, page_size, page_min.shape[2])
    scores = quest_page_scores(query, page_min, page_max, page_ok)
    return top_positions(scores, page_ok[:, None, :].expand_as(scores), budget // page_size)


def quest_positions(query: Tensor, page_min: Tensor, page_max: Tensor, attn_mask: Optional[Tensor], length: int,
                    budget: int, page_size: int) -> Tensor:
    """The valid cache positions of each query head's chosen pages, int32 `[B, H, budget // page_size
    * page_size]` (-1 in unused slots)."""
    valid = valid_positions(attn_mask, query.shape[0], length, query.device)
    pages = _top_pages(query, page_min, page_max, valid, budget, page_size)
    return pages_to_positions(pages, page_size, valid)


def pages_to_positions(pages: Tensor, page_size: int, valid: Tensor) -> Tensor:
    """Page indices `[B, H, n]` -> the valid cache positions they cover, `int32 [B, H, n * page_size]`
    (-1 for unused pages and invalid positions)."""
    offsets = torch.arange(page_size, device=pages.device, dtype=torch.long)
    pos = (pages.long()[..., None] * page_size + offsets).flatten(-2)
    used = (pages[..., None] >= 0).expand(*pages.shape, page_size).flatten(-2)
    length = valid.shape[-1]
    in_range = used & (pos < length)
    ok = in_range & torch.gather(valid[:, None, :].expand(-1, pages.shape[1], -1), 2,
                                 torch.where(in_range, pos, 0))
    return torch.where(ok, pos, INVALID_INDEX).to(torch.int32)


def quest_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], page_min: Tensor,
                    page_max: Tensor, scale: float, budget: int, page_size: int) -> Tensor:
    """Quest decode attention: each query head attends to the valid positions of its chosen pages."""
    positions = quest_positions(query, page_min, page_max, attn_mask, key.shape[2], budget, page_size)
    return sparse_attention(query, key, value, positions, scale)
