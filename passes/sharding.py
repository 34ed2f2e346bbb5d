"""Tensor parallelism seen from one traced graph.

A model sharded with DTensor (transformers' `from_pretrained(..., tp_plan="auto")` under
`torchrun`) gives each rank a slice of every attention layer's heads: its decode graph holds
DTensor parameters (or turns local tensors into DTensors around the collectives), and its SDPA
calls see only the rank's heads. Attention is per head, so dense, selection per query or KV
head, sparse and Quest layers need no communication; one selection for a whole layer
(granularity `layer`) would need every rank's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from tidal_compile.config import ConfigError, TidalConfig


@dataclass(frozen=True)
class TensorParallel:
    """This graph is rank `rank` of `world_size` ranks that shard the model's heads."""

    rank: int
    world_size: int

    def heads(self, local: int) -> str:
        """Which of the model's heads this rank holds when it holds `local` of them (transformers
        shards the projections' output rows in contiguous blocks, one per rank): "heads 4-7 of 32"."""
        first = self.rank * local
        span = f"head {first}" if local == 1 else f"heads {first}-{first + local - 1}"
        return f"{span} of {local * self.world_size}"


def _of(value: object) -> Optional[TensorParallel]:
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return None
    mesh = value.device_mesh
    return TensorParallel(rank=mesh.get_local_rank(), world_size=mesh.size())


def model_tensor_parallel(model: torch.nn.Module) -> Optional[TensorParallel]:
    """The rank and world size when `model`'s parameters are DTensor shards, else None."""
    return next(filter(None, map(_of, model.parameters())), None)


def tensor_parallel(gm: fx.GraphModule) -> Optional[TensorParallel]:
    """The rank and world size when `gm` is one rank's graph of a DTensor-sharded model, else None."""
    from torch.distributed.tensor import DTensor

    for node in gm.graph.nodes:
        found = _of(node.meta.get("example_value"))
        if found:
            return found
        if node.op == "call_function" and node.target is DTensor.from_local:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            return TensorParallel(rank=torch.distributed.get_rank() if distributed else 0,
                                  world_size=torch.distributed.get_world_size() if distributed else 1)
    return None


def check_granularity(config: TidalConfig, tp: TensorParallel) -> None:
    """Reject a config that selects one index set per layer on a tensor-parallel rank."""
    if config.granularity == "layer" and config.mode in ("tidal", "topk_oracle"):
        raise ConfigError(
            f"tidal: granularity 'layer' picks one index set from the scores of all heads, but rank {tp.rank} of "
            f"{tp.world_size} of a tensor-parallel model holds only its share of the heads; use granularity "
            "query_head or kv_head, which select per head with no communication")
