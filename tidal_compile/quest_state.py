"""Quest's page metadata buffers, shared by the graphs of one `torch.compile` call.

The decode graph keeps, per Quest layer, the channel-wise key min / max of every page
(`[B, Hkv, P, D]`), the valid length already summarised (`filled`, int32 [B]) and the epoch it
was summarised in (`seen_epoch`). Every prefill graph (a new sequence, or a KV-cache
correction chunk) bumps the shared `epoch`, so the next decode step summarises the whole
cache once; the steps after it summarise only the page they write. The tensors are graph
constants (buffers of the compiled GraphModule), so they keep fixed addresses under CUDA graphs.
A prefill run outside the compiled model (as CUDA-graph decoding needs) must call
:meth:`QuestState.new_sequence` instead; `hf.compile_for_generation` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class QuestBuffers:
    """Page metadata of one layer for one cache shape."""

    page_min: Tensor
    page_max: Tensor
    filled: Tensor
    seen_epoch: Tensor


class QuestState:
    """Buffers per (layer, cache shape, dtype, device), and one prefill epoch counter per device."""

    def __init__(self) -> None:
        self._epochs: dict[torch.device, Tensor] = {}
        self._buffers: dict[tuple, QuestBuffers] = {}

    def epoch(self, device: torch.device) -> Tensor:
        """int32 [1]: how many prefills ran on `device` (graphs add 1 in place)."""
        if device not in self._epochs:
            self._epochs[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return self._epochs[device]

    def new_sequence(self) -> None:
        """A new sequence was prefilled outside the compiled graphs: the next decode step must
        summarise the whole cache (what a compiled prefill graph does by itself)."""
        for epoch in self._epochs.values():
            epoch.add_(1)

    def buffers(self, layer: int, key_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                page_size: int) -> QuestBuffers:
        b, hkv, length, d = key_shape
        key = (layer, tuple(key_shape), dtype, device, page_size)
        if key not in self._buffers:
            pages = -(-length // page_size)
            self._buffers[key] = QuestBuffers(
                page_min=torch.zeros(b, hkv, pages, d, dtype=dtype, device=device),
                page_max=torch.zeros(b, hkv, pages, d, dtype=dtype, device=device),
                filled=torch.zeros(b, dtype=torch.int32, device=device),
                # != epoch, so the first decode step summarises the whole cache
                seen_epoch=torch.full((1,), -1, dtype=torch.int32, device=device))
        return self._buffers[key]
