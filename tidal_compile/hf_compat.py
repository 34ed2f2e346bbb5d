"""Every detail of transformers that tidal relies on and that is not the same in every release.

The rest of the package goes through these functions, and `tests/test_hf_compat.py` checks each
of them against the installed transformers, so a release that moves one fails there, loudly,
instead of silently changing what tidal does.

- The model forward's cache argument is `cache` from transformers 5.24 on and `past_key_values`
  before (5.24 still takes the old name, with a deprecation warning): calls are bound by the
  forward's signature and both names are accepted.
- A static cache writes new K/V at its own length (`get_seq_length()`, a tensor once the cache
  is allocated), not at a `cache_position` argument, and builds the decode mask up to it.
  Rewinding it (to rewrite entries, as KV-cache correction does) is `crop(-n)` where static
  layers support it (5.24) and a move of the layers' `cumulative_length` before (5.17).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from transformers.cache_utils import Cache, StaticLayer

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names a model forward takes its KV cache under: the current one first."""


def positional_names(signature: inspect.Signature) -> tuple[str, ...]:
    """The names a forward's positional arguments bind to (`self` left out)."""
    return tuple(p.name for p in signature.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self")


def call_arguments(names: tuple[str, ...], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A forward call's arguments by name (positional ones named by `names`, from
    `positional_names`), so that the call can be read and re-issued with keywords only."""
    if len(args) > len(names):
        raise TypeError(f"forward takes {len(names)} positional arguments, got {len(args)}")
    named = dict(zip(names, args))
    clash = sorted(set(named) & set(kwargs))
    if clash:
        raise TypeError(f"forward got several values for argument {clash[0]!r}")
    named.update(kwargs)
    return named


def cache_argument(arguments: Mapping[str, Any]) -> Optional[str]:
    """The name under which a call passes its KV cache (None: no cache)."""
    return next((name for name in CACHE_ARGUMENTS if arguments.get(name) is not None), None)


def forward_cache_name(forward: Callable) -> str:
    """The cache argument `forward` declares (what generate must pass a cache as)."""
    parameters = inspect.signature(forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[-1])


def is_allocated(cache: Cache) -> bool:
    """Whether a lazily allocated cache holds its tensors (it allocates on its first write)."""
    return bool(cache.is_initialized)


def max_length(cache: Cache) -> int:
    """How many positions the cache holds (-1: no limit)."""
    return int(cache.get_max_length())


def rewind(cache: Cache, steps: int) -> None:
    """Move a static cache's write position back by `steps`, so that the next forward rewrites
    the last `steps` entries (their mask positions stay valid)."""
    if "crop" in vars(StaticLayer):  # transformers >= 5.24: static layers crop by a negative count
        cache.crop(-steps)
        return
    for layer in cache.layers:  # older releases: the write position is the layers' cumulative length
        layer.cumulative_length.sub_(steps)


def attention_implementation(model_config: Any) -> Optional[str]:
    """The attention implementation a Hugging Face config selects ("sdpa", "eager", ...), if any
    (the private `_attn_implementation`: transformers has no public reader for it)."""
    value = getattr(model_config, "_attn_implementation", None)
    return value if isinstance(value, str) else None


@contextlib.contextmanager
def attention_routed_through(model: Any, name: str, attention: Callable) -> Iterator[None]:
    """Inside the block, `model`'s attention layers call `attention` (an `AttentionInterface`
    function, registered as `name`, with SDPA's mask) instead of their implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = attention_implementation(model.config)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def written_end(layer: StaticLayer) -> torch.Tensor:
    """The position after the last one written into an allocated static layer (int64, 0-d)."""
    return torch.as_tensor(layer.get_seq_length())
