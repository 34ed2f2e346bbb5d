"""Slow, obviously-correct decode attention used as the independent check of the ops and pass.

Everything runs per (sequence, head) in float64 with Python loops over positions; nothing here
shares code with `tidal_compile`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-12))


def valid_positions(mask: Optional[torch.Tensor], b: int, length: int) -> list[int]:
    if mask is None:
        return list(range(length))
    return [j for j in range(length) if bool(mask[b, 0, 0, j])]


def head_logits(q, k, mask, scale, b: int, h: int) -> dict[int, float]:
    """{position: q_h . k_j * scale} over the valid positions of sequence b, head h."""
    group = q.shape[1] // k.shape[1]
    qh = q[b, h, 0].double()
    kh = k[b, h // group].double()
    return {j: float(qh @ kh[j]) * scale for j in valid_positions(mask, b, k.shape[2])}


def softmax(logits: dict[int, float]) -> dict[int, float]:
    top = max(logits.values())
    exp = {j: math.exp(x - top) for j, x in logits.items()}
    total = sum(exp.values())
    return {j: e / total for j, e in exp.items()}


def attend(q, k, v, scale, b: int, h: int, positions: Sequence[int]) -> torch.Tensor:
    """softmax(q K_P^T s) V_P for one head over `positions`, in float64."""
    group = q.shape[1] // k.shape[1]
    logits = {j: float(q[b, h, 0].double() @ k[b, h // group, j].double()) * scale for j in positions}
    probs = softmax(logits)
    out = torch.zeros(v.shape[-1], dtype=torch.float64, device=v.device)
    for j, p in probs.items():
        out += p * v[b, h // group, j].double()
    return out


def ranking(q, k, mask, scale, b: int, granularity: str) -> list[dict[int, float]]:
    """Per index set of sequence b: {position: the score it is ranked by}."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if granularity == "query_head":
        return [head_logits(q, k, mask, scale, b, h) for h in range(heads)]
    members = ([list(range(g * heads // kv_heads, (g + 1) * heads // kv_heads)) for g in range(kv_heads)]
               if granularity == "kv_head" else [list(range(heads))])
    sets = []
    for heads_of_set in members:
        total: dict[int, float] = {}
        for h in heads_of_set:
            for j, p in softmax(head_logits(q, k, mask, scale, b, h)).items():
                total[j] = total.get(j, 0.0) + p
        sets.append(total)
    return sets


def select(rank: dict[int, float], budget: int, sink: int = 0, recent: int = 0) -> list[int]:
    """Top-`budget` positions: forced current/sink/recent first, then highest rank, lower
    position on ties; ascending, padded with -1."""
    valid = sorted(rank)
    forced = set(valid[:sink]) | set(valid[-max(recent, 1):])
    rest = sorted((j for j in valid if j not in forced), key=lambda j: (-rank[j], j))
    chosen = sorted(forced | set(rest[:budget - len(forced)]))
    return chosen + [-1] * (budget - len(chosen))


def selection_indices(q, k, mask, scale, budget, granularity, sink=0, recent=0) -> torch.Tensor:
    rows = [[select(r, budget, sink, recent) for r in ranking(q, k, mask, scale, b, granularity)]
            for b in range(q.shape[0])]
    return torch.tensor(rows, dtype=torch.int32, device=q.device)


def dense(q, k, v, mask, scale) -> torch.Tensor:
    out = torch.zeros(q.shape[0], q.shape[1], 1, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h, 0] = attend(q, k, v, scale, b, h, valid_positions(mask, b, k.shape[2]))
    return out


def sparse(q, k, v, indices, scale) -> torch.Tensor:
    heads, sets = q.shape[1], indices.shape[1]
    out = torch.zeros(q.shape[0], heads, 1, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(heads):
            row = indices[b, h * sets // heads].tolist()
            out[b, h, 0] = attend(q, k, v, scale, b, h, [j for j in row if j >= 0])
    return out


def assert_is_topk(indices: torch.Tensor, q, k, mask, scale, budget: int, granularity: str,
                   sink: int = 0, recent: int = 0, rel_tol: float = 1e-5) -> None:
    """`indices` is a valid top-`budget` choice for every index set: layout (valid positions
    ascending, then -1), only valid positions, the forced ones (current, sink, recent) kept,
    and no unchosen position ranked above a chosen one by more than rounding (`rel_tol`)."""
    for b in range(indices.shape[0]):
        for s, rank in enumerate(ranking(q, k, mask, scale, b, granularity)):
            row = indices[b, s].tolist()
            chosen = [j for j in row if j >= 0]
            assert row == chosen + [-1] * (budget - len(chosen)), "valid indices first, then -1"
            assert chosen == sorted(set(chosen)), "ascending and unique"
            assert set(chosen) <= set(rank), "only valid positions"
            assert len(chosen) == min(budget, len(rank))
            valid = sorted(rank)
            forced = set(valid[:sink]) | set(valid[-max(recent, 1):])
            assert forced <= set(chosen), "current token, sink and recent are always kept"
            others_in = [rank[j] for j in chosen if j not in forced]
            others_out = [rank[j] for j in rank if j not in chosen]
            if others_in and others_out:
                top_out = max(others_out)
                assert min(others_in) >= top_out - rel_tol * max(1.0, abs(top_out))


def quest_pages(q, k, mask, b: int, h: int, budget: int, page_size: int) -> list[int]:
    """Quest's chosen pages for sequence b, head h: the page of the last valid position, then
    the highest sum_d max(q_d min_d, q_d max_d) over pages with a valid position (lower page
    on ties); ascending, padded with -1."""
    group = q.shape[1] // k.shape[1]
    valid = valid_positions(mask, b, k.shape[2])
    rows: dict[int, list[int]] = {}
    for j in valid:
        rows.setdefault(j // page_size, []).append(j)
    scores = {}
    for page, members in rows.items():
        score = 0.0
        for d in range(q.shape[-1]):
            column = [float(k[b, h // group, j, d]) for j in members]
            qd = float(q[b, h, 0, d])
            score += max(qd * min(column), qd * max(column))
        scores[page] = score
    current = valid[-1] // page_size
    slots = budget // page_size
    rest = sorted((p for p in scores if p != current), key=lambda p: (-scores[p], p))
    chosen = sorted({current, *rest[:slots - 1]})
    return chosen + [-1] * (slots - len(chosen))


def quest(q, k, v, mask, scale, budget: int, page_size: int) -> torch.Tensor:
    """Quest decode attention: each head attends to the valid positions of its chosen pages."""
    out = torch.zeros(q.shape[0], q.shape[1], 1, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        valid = set(valid_positions(mask, b, k.shape[2]))
        for h in range(q.shape[1]):
            pages = [p for p in quest_pages(q, k, mask, b, h, budget, page_size) if p >= 0]
            positions = [j for p in pages for j in range(p * page_size, (p + 1) * page_size) if j in valid]
            out[b, h, 0] = attend(q, k, v, scale, b, h, positions)
    return out
