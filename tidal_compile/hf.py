"""Hugging Face generation with tidal: one call sets up static cache, compiled decode steps,
dense prefill and KV-cache correction.

    model = tidal_compile.hf.compile_for_generation(model, "tidal.yaml")
    out = model.generate(input_ids, max_new_tokens=256)

KV-cache correction (design section 1): the K/V a decode step writes were computed while
sparse layers were active. With `correction: {interval: N}`, after every N decode steps the
N tokens those steps consumed, preceded by the token before them (already exact: the last
prompt token or the end of the previous correction), are run again in one forward at their
positions and their cache entries are overwritten. The chunk has N + 1 >= 2 queries, so the
pass leaves it dense, and one compiled graph serves every correction. Later steps attend to
the corrected K/V.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tidal_compile.backend import BackendOptions, TidalFallbackWarning
from tidal_compile.quest_state import QuestState


@dataclass
class _Pending:
    """Inputs of the decode steps since the last correction, after the exact token before them."""

    input_ids: list[Tensor] = field(default_factory=list)
    position_ids: list[Tensor] = field(default_factory=list)

    def restart(self, input_ids: Optional[Tensor], position_ids: Optional[Tensor]) -> None:
        """Forget the pending steps; the last column of these inputs becomes the anchor."""
        self.input_ids = [] if input_ids is None else [input_ids[:, -1:]]
        self.position_ids = [] if position_ids is None else [position_ids[:, -1:]]

    def add(self, input_ids: Tensor, position_ids: Optional[Tensor]) -> None:
        self.input_ids.append(input_ids)
        if position_ids is not None:
            self.position_ids.append(position_ids)

    @property
    def steps(self) -> int:
        """Decode steps waiting for correction (the anchor not counted)."""
        return max(len(self.input_ids) - 1, 0)


def _cache_layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def _cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def _rewind(cache: Any, steps: int) -> Optional[Tensor]:
    """Move the cache's write position back by `steps`; returns explicit cache positions for
    caches that take them instead (older transformers)."""
    layers = [layer for layer in _cache_layers(cache) if hasattr(layer, "cumulative_length")]
    if layers:
        for layer in layers:
            layer.cumulative_length.sub_(steps)
        return None
    end = _cache_length(cache)
    return torch.arange(end - steps, end, device=cache.layers[0].keys.device if _cache_layers(cache) else None)


def _chunk_mask(mask: Optional[Tensor], start: int, steps: int) -> Optional[Tensor]:
    """The attention mask for re-running positions [start, start + steps) from the mask of the
    decode step at position start + steps."""
    if mask is None:
        return None
    if mask.dim() == 2:  # padding mask over keys: growing with the sequence, or cache-sized
        return mask[:, : start + steps] if mask.shape[1] == start + steps + 1 else mask
    positions = torch.arange(mask.shape[-1], device=mask.device)
    causal = positions[None, :] <= (start + torch.arange(steps, device=mask.device))[:, None]  # [steps, L]
    row = mask[:, :, -1:, :]
    if mask.dtype == torch.bool:
        return row & causal
    return torch.where(causal, row, torch.finfo(mask.dtype).min)


def _cache_allocated(cache: Any) -> bool:
    """Whether every layer of a lazily allocated cache (transformers >= 4.56) holds its tensors."""
    return all(getattr(layer, "is_initialized", True) for layer in _cache_layers(cache))


class TidalForward:
    """`model.forward` replacement: compiled tidal forward plus KV-cache correction.

    `prefill` runs calls that start a sequence (the compiled forward, or the uncompiled one when
    decode graphs are captured in CUDA graphs: the static cache must be allocated outside them)."""

    def __init__(self, compiled: Callable, interval: int, prefill: Optional[Callable] = None):
        self.compiled = compiled
        self.prefill = prefill or compiled
        self.interval = interval
        self.pending = _Pending()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        # A new sequence: a prefill (or embeddings), or a one-token prompt into an empty cache
        # (checked only with correction on: reading the cache length syncs with the GPU).
        if (input_ids is None or input_ids.shape[1] != 1 or cache is None or not _cache_allocated(cache)
                or (self.interval and _cache_length(cache) == 0)):
            self.pending.restart(input_ids, kwargs.get("position_ids"))
            return self.prefill(*args, **kwargs)
        if self.interval and self.pending.input_ids and self.pending.steps == self.interval:
            self.correct(kwargs)
        out = self.compiled(*args, **kwargs)
        if self.interval and self.pending.input_ids:
            self.pending.add(input_ids, kwargs.get("position_ids"))
        return out

    def correct(self, step_kwargs: dict[str, Any]) -> None:
        """Re-run the anchor and the pending tokens densely at their positions, overwriting their K/V."""
        cache = step_kwargs["past_key_values"]
        length = len(self.pending.input_ids)  # pending steps + the anchor
        start = _cache_length(cache) - length
        cache_position = _rewind(cache, length)
        kwargs = dict(step_kwargs)
        kwargs["input_ids"] = torch.cat(self.pending.input_ids, dim=1)
        kwargs["attention_mask"] = _chunk_mask(step_kwargs.get("attention_mask"), start, length)
        if self.pending.position_ids:
            kwargs["position_ids"] = torch.cat(self.pending.position_ids, dim=1)
        if cache_position is not None:
            kwargs["cache_position"] = cache_position
        kwargs.pop("inputs_embeds", None)
        kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            self.compiled(**kwargs)
        self.pending.restart(kwargs["input_ids"], kwargs.get("position_ids"))


def compile_for_generation(model: torch.nn.Module, config: Any = None, **options: Any) -> torch.nn.Module:
    """Set `model` up for `model.generate` with tidal decoding, in place; returns it.

    Static cache; `model.forward` compiled with backend="tidal" (depth from the model config);
    prefill stays dense (uncompiled with `cudagraphs=True`, which captures the decode steps in
    CUDA graphs); transformers' own generate-time compile is turned off so the forward
    is not compiled twice; KV-cache correction every `correction.interval` tokens. Not yet
    supported, each with a warning and dense attention: encoder-decoder models (left as they
    are), sliding-window layers (kept dense), generate calls without a static cache (run
    uncompiled); beam search runs without correction.
    """
    if config is not None:
        options = {"config": config, **options}
    model_config = getattr(model, "config", None)
    if getattr(model_config, "num_hidden_layers", None) is not None:
        options.setdefault("num_layers", model_config.num_hidden_layers)
    parsed = BackendOptions.parse(options).config
    if "num_layers" in options:
        parsed.resolve(options["num_layers"])  # layer sets that do not fit the model fail here, not in generate
    if getattr(model_config, "is_encoder_decoder", False):
        warnings.warn("tidal: encoder-decoder models are not supported yet; generation stays dense",
                      TidalFallbackWarning, stacklevel=2)
        return model
    sliding = sliding_window_layers(model_config)
    if sliding:
        warnings.warn(f"tidal: layers {sliding} use sliding-window attention, which tidal does not support "
                      "yet; they stay dense", TidalFallbackWarning, stacklevel=2)
        options["dense_layers"] = sorted(set(parsed.dense_layers) | set(sliding))
        if parsed.selection_layers != "auto":
            options["selection_layers"] = [i for i in parsed.selection_layers if i not in sliding]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.cache_implementation = "static"
        generation_config.disable_compile = True
    if parsed.mode == "quest":
        options.setdefault("quest_state", QuestState())  # shared with the prefill path below
    # Correction happens here, around the compiled forward; the backend itself never corrects.
    compiled = torch.compile(model.forward, backend="tidal", options={**options, "correction": {"interval": 0}})
    dense_forward = model.forward
    prefill = _uncompiled_prefill(dense_forward, options.get("quest_state")) if options.get("cudagraphs") else None
    forward = TidalForward(compiled, parsed.correction.interval, prefill=prefill)
    _install(model, dense_forward, forward)
    return model


def _uncompiled_prefill(forward: Callable, quest_state: Optional[QuestState]) -> Callable:
    """`forward` for sequence starts; under mode quest it also starts a new Quest epoch (the
    compiled prefill graph that would have done it does not run)."""
    if quest_state is None:
        return forward

    def prefill(*args: Any, **kwargs: Any) -> Any:
        quest_state.new_sequence()
        return forward(*args, **kwargs)

    return prefill


def _install(model: torch.nn.Module, dense_forward: Callable, forward: TidalForward) -> None:
    """Route model.forward through `forward`, and model.generate through the support checks."""
    generate = model.generate
    model.forward = forward

    def tidal_generate(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if cache is not None:  # the caller's cache replaces the configured cache_implementation
            static = type(cache).__name__ == "StaticCache"
            kwargs.setdefault("cache_implementation", None)
        else:
            static = kwargs.get("cache_implementation", "static") == "static"
        if not static:
            warnings.warn("tidal: decoding needs a static cache (cache_implementation='static'); this "
                          "generate call runs dense, without the tidal compile", TidalFallbackWarning, stacklevel=2)
            model.forward = dense_forward
            try:
                return generate(*args, **kwargs)
            finally:
                model.forward = forward
        beams = kwargs.get("num_beams") or getattr(model.generation_config, "num_beams", 1) or 1
        interval = forward.interval
        if beams > 1 and interval:
            warnings.warn("tidal: KV-cache correction does not support beam search yet; this generate call "
                          "runs without correction", TidalFallbackWarning, stacklevel=2)
            forward.interval = 0
        try:
            return generate(*args, **kwargs)
        finally:
            forward.interval = interval

    model.generate = tidal_generate


def sliding_window_layers(model_config: Any) -> list[int]:
    """Layers a Hugging Face config marks as sliding-window attention."""
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types:
        return [i for i, kind in enumerate(layer_types) if "sliding" in str(kind)]
    if getattr(model_config, "sliding_window", None) and getattr(model_config, "use_sliding_window", True):
        return list(range(getattr(model_config, "num_hidden_layers", 0)))
    return []
