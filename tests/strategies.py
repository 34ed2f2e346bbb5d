"""Hypothesis strategies shared by the tests: decode-step attention problems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

GRANULARITIES = ("query_head", "kv_head", "layer")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class DecodeProblem:
    """One decode step: q `[B, H, 1, D]`, the un-expanded cache k/v `[B, Hkv, L, D]`, a mask."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: Optional[torch.Tensor]  # bool [B, 1, 1, L] (True = attend) or None
    scale: float

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[1]


@st.composite
def decode_problems(draw, dtypes=(torch.float32,), integer_valued: bool = False, max_len: int = 40,
                    masks: bool = True) -> DecodeProblem:
    """Random decode problems: GQA groups 1..4, lengths 1..max_len, left padding and unfilled
    static-cache slots. `integer_valued` draws small integers with scale 1, so that logits are
    exact in every precision and ties are common."""
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    length = draw(st.integers(1, max_len))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups

    def tensor(*shape):
        if integer_valued:
            return torch.randint(-2, 3, shape, generator=gen).to(dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    mask = None
    if masks and draw(st.booleans()):
        # Per sequence: left padding, then filled positions, then unfilled cache slots.
        rows = []
        for _ in range(batch):
            filled_end = draw(st.integers(1, length))  # current token at filled_end - 1
            pad = draw(st.integers(0, filled_end - 1))
            row = torch.zeros(length, dtype=torch.bool)
            row[pad:filled_end] = True
            rows.append(row)
        mask = torch.stack(rows)[:, None, None, :]
    scale = 1.0 if integer_valued else head_dim ** -0.5
    return DecodeProblem(tensor(batch, heads, 1, head_dim), tensor(batch, kv_heads, length, head_dim),
                         tensor(batch, kv_heads, length, head_dim), mask, scale)


granularities = st.sampled_from(GRANULARITIES)
budgets = st.integers(1, 48)

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
