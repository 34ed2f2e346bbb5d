"""TidalCache: a static KV cache that also holds tidal's per-sequence state.

transformers builds every KV-cache variant as a `Cache` subclass; tidal's is a `StaticCache`
whose state travels with it through `generate`, so a new cache (or `reset()`) is a new
sequence, with nothing to tell the compiled model:

- Quest's page metadata (`page_size` given): each full-attention layer keeps, beside its keys,
  the channel-wise key min / max of every page (`page_min`, `page_max`: [B, Hkv, P, D]) and how
  far they are up to date (`filled`, int32 [B]). Every write into the layer lowers `filled` to
  the first position written (op `tidal::quest_cache_write`), so a prefill, a correction chunk
  or a decode step makes the next Quest attention re-summarise exactly the pages that changed.
  The tensors are attributes of the cache, so they enter the compiled graph as ordinary inputs,
  with fixed addresses under CUDA graphs.
- The sequence bookkeeping of `tidal_compile.hf` (host side, never in a graph): how many tokens
  the sequence holds, and the decode steps waiting for KV-cache correction.

    cache = TidalCache(model.config, max_cache_len=4096, page_size=16)
    model.generate(input_ids, cache=cache, max_new_tokens=256)   # `past_key_values=` before 5.24
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

import tidal_compile.ops  # noqa: F401  (registers torch.ops.tidal)
from tidal_compile import hf_compat


class QuestPagesLayer(StaticLayer):
    """A full-attention static layer that also keeps Quest's page metadata of its keys."""

    def __init__(self, max_cache_len: int, page_size: int, **kwargs: Any):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.page_size = page_size

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, head_dim = self.keys.shape
        pages = -(-self.max_cache_len // self.page_size)
        shape = (batch, heads, pages, head_dim)
        self.page_min = torch.zeros(shape, dtype=self.keys.dtype, device=self.device)
        self.page_max = torch.zeros(shape, dtype=self.keys.dtype, device=self.device)
        self.filled = torch.zeros(batch, dtype=torch.int32, device=self.device)
        if not torch.compiler.is_compiling():  # fixed addresses, as transformers does for the keys
            for t in (self.page_min, self.page_max, self.filled):
                torch._dynamo.mark_static_address(t)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        written_from = hf_compat.written_end(self) - key_states.shape[-2]
        torch.ops.tidal.quest_cache_write(keys, self.page_min, self.page_max, self.filled, written_from)
        return keys, values

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.filled.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.is_initialized:
            at = beam_idx.to(self.device)
            self.page_min, self.page_max, self.filled = (
                t.index_select(0, at) for t in (self.page_min, self.page_max, self.filled))


@dataclass
class SequenceState:
    """Host-side bookkeeping of the sequence in a TidalCache (kept by `hf.TidalForward`)."""

    length: int = 0
    """Tokens written into the cache through tidal's forward."""
    pending_input_ids: list[Tensor] = field(default_factory=list)
    """The exact token before the decode steps not yet corrected (the anchor), then their inputs."""
    pending_position_ids: list[Tensor] = field(default_factory=list)
    corrections: int = 0
    """KV-cache corrections run on this sequence."""

    def anchor(self, input_ids: Optional[Tensor], position_ids: Optional[Tensor]) -> None:
        """Forget the pending steps; the last column of these inputs becomes the anchor."""
        self.pending_input_ids = [] if input_ids is None else [input_ids[:, -1:]]
        self.pending_position_ids = [] if position_ids is None else [position_ids[:, -1:]]

    def add(self, input_ids: Tensor, position_ids: Optional[Tensor]) -> None:
        self.pending_input_ids.append(input_ids)
        if position_ids is not None:
            self.pending_position_ids.append(position_ids)

    @property
    def pending_steps(self) -> int:
        """Decode steps waiting for correction (the anchor not counted)."""
        return max(len(self.pending_input_ids) - 1, 0)


class TidalCache(StaticCache):
    """A `StaticCache` holding tidal's per-sequence state (see the module docstring).

    `page_size` (mode quest) gives every full-attention layer Quest's page metadata; sliding-
    window layers stay transformers' own. Other arguments are `StaticCache`'s."""

    def __init__(self, config: Any, max_cache_len: int, *, page_size: Optional[int] = None, **kwargs: Any):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.page_size = page_size
        if page_size is not None:
            self.layers = [QuestPagesLayer(max_cache_len=layer.max_cache_len, page_size=page_size)
                           if type(layer) is StaticLayer else layer for layer in self.layers]
        self.capacity = hf_compat.max_length(self)
        """Positions the cache holds (fixed when it is built; read before every decode step)."""
        self.sequence = SequenceState()

    def reset(self) -> None:
        """Empty the cache: a new sequence starts."""
        super().reset()
        self.sequence = SequenceState()
