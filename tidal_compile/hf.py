"""Hugging Face generation with tidal: one call sets up the compiled decode steps, dense
prefill, a `TidalCache` per generate call and KV-cache correction.

    model = tidal_compile.hf.compile_for_generation(model, "tidal.yaml")
    out = model.generate(input_ids, max_new_tokens=256)

KV-cache correction (design section 1): the K/V a decode step writes were computed while
sparse layers were active. With `correction: {interval: N}`, after every N decode steps the
N tokens those steps consumed, preceded by the token before them (already exact: the last
prompt token or the end of the previous correction), are run again in one forward at their
positions and their cache entries are overwritten. The chunk has N + 1 >= 2 queries, so the
pass leaves it dense, and one compiled graph serves every correction. Later steps attend to
the corrected K/V. The bookkeeping lives in the `TidalCache` (`cache.sequence`), so a new
cache is a new sequence; calls are read by the forward's signature (`cache=` from transformers
5.24 on, `past_key_values=` before: both work).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from transformers import StaticCache

from tidal_compile import hf_compat
from tidal_compile.backend import BackendOptions, TidalFallbackWarning
from tidal_compile.cache import SequenceState, TidalCache
from tidal_compile.config import ConfigError, ResolvedPlanConfig
from tidal_compile.passes.sharding import check_granularity, model_tensor_parallel
from tidal_compile.step_graph import StepGraph


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


def _new_tokens(call: dict[str, Any]) -> int:
    inputs = call.get("input_ids")
    inputs = call.get("inputs_embeds") if inputs is None else inputs
    if inputs is None:
        raise ValueError("tidal: a forward call needs input_ids or inputs_embeds")
    return inputs.shape[1]


class TidalForward:
    """`model.forward` replacement: the compiled tidal forward plus KV-cache correction.

    `prefill` runs the calls that start a sequence or add several tokens (the compiled forward,
    or the uncompiled one when decode graphs are captured in CUDA graphs: the static cache must
    be allocated outside them). `signature` is the model forward's, to read calls by name.
    `step_graph` (a `StepGraph` over `compiled`) runs the decode steps of a TidalCache instead."""

    def __init__(self, compiled: Callable, interval: int, prefill: Optional[Callable] = None,
                 signature: Optional[inspect.Signature] = None, step_graph: Optional[StepGraph] = None):
        self.compiled = compiled
        self.prefill = prefill or compiled
        self.step_graph = step_graph
        self.interval = interval
        self.signature = signature or inspect.signature(compiled)
        self.positional = hf_compat.positional_names(self.signature)
        self._warned_untracked = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = hf_compat.call_arguments(self.positional, args, kwargs)
        name = hf_compat.cache_argument(call)
        cache = call.get(name) if name else None
        tokens = _new_tokens(call)
        if not isinstance(cache, TidalCache):
            return self._untracked(call, cache, tokens)
        state = cache.sequence
        _check_fits(cache, state.length, tokens)
        if state.length == 0 or tokens != 1:  # a sequence starts, or a chunk of several tokens
            out = self.prefill(**call)
            state.anchor(call.get("input_ids"), call.get("position_ids"))
            if self.interval and call.get("input_ids") is None:
                warnings.warn("tidal: KV-cache correction re-runs token ids; this sequence came as inputs_embeds, "
                              "so it decodes without correction", TidalFallbackWarning, stacklevel=2)
        else:
            if self.interval and state.pending_steps >= self.interval:
                self.correct(call, cache, state)
            out = self.step_graph(call, cache) if self.step_graph else self.compiled(**call)
            if self.interval and state.pending_input_ids:
                state.add(call["input_ids"], call.get("position_ids"))
        state.length += tokens
        return out

    def _untracked(self, call: dict[str, Any], cache: Any, tokens: int) -> Any:
        """A call whose cache holds no tidal state (no cache, or transformers' own)."""
        starts = tokens != 1 or cache is None or not hf_compat.is_allocated(cache)
        if self.interval and not starts and not self._warned_untracked:
            self._warned_untracked = True
            warnings.warn(f"tidal: KV-cache correction keeps its bookkeeping in a tidal_compile.TidalCache; this "
                          f"call's cache is a {type(cache).__name__}, so it decodes without correction (let "
                          "generate build the cache, or pass a TidalCache)", TidalFallbackWarning, stacklevel=3)
        return (self.prefill if starts else self.compiled)(**call)

    def correct(self, call: dict[str, Any], cache: TidalCache, state: SequenceState) -> None:
        """Re-run the anchor and the pending tokens densely at their positions, overwriting their K/V."""
        steps = len(state.pending_input_ids)  # pending steps + the anchor
        start = state.length - steps
        hf_compat.rewind(cache, steps)
        chunk = {key: value for key, value in call.items() if key != "inputs_embeds"}
        chunk["input_ids"] = torch.cat(state.pending_input_ids, dim=1)
        chunk["attention_mask"] = _chunk_mask(call.get("attention_mask"), start, steps)
        if len(state.pending_position_ids) == steps:
            chunk["position_ids"] = torch.cat(state.pending_position_ids, dim=1)
        if call.get("cache_position") is not None:  # releases whose models read it
            chunk["cache_position"] = torch.arange(start, start + steps, device=call["cache_position"].device)
        if "logits_to_keep" in self.signature.parameters:
            chunk["logits_to_keep"] = 1
        with torch.no_grad():
            self.compiled(**chunk)
        state.corrections += 1
        state.anchor(chunk["input_ids"], chunk.get("position_ids"))


def _check_fits(cache: TidalCache, length: int, tokens: int) -> None:
    capacity = cache.capacity
    if 0 <= capacity < length + tokens:
        raise ValueError(f"tidal: the sequence needs {length + tokens} cache positions ({length} held + {tokens} "
                         f"new) but the TidalCache holds {capacity}; build it with a larger max_cache_len (or ask "
                         "generate for fewer new tokens)")


class TidalGenerate:
    """`model.generate` replacement: gives each call a `TidalCache` (unless the caller passes a
    cache), and routes calls tidal cannot serve (no static cache) to the dense, uncompiled
    forward with a warning."""

    def __init__(self, model: torch.nn.Module, generate: Callable, dense_forward: Callable, forward: TidalForward,
                 page_size: Optional[int]):
        self.model, self.generate, self.dense_forward, self.forward = model, generate, dense_forward, forward
        self.page_size = page_size
        self.cache_name = hf_compat.forward_cache_name(dense_forward)
        self.max_cache_len = 0  # grows only: the same cache shape across calls keeps the graphs

    def __call__(self, *args: Any, max_cache_len: Optional[int] = None, **kwargs: Any) -> Any:
        """`model.generate(...)`; `max_cache_len` sizes the TidalCache it builds (at least the
        prompt plus the new tokens), so that calls of several lengths share one cache shape."""
        model = self.model
        given = hf_compat.cache_argument(kwargs)
        implementation = kwargs.pop("cache_implementation", model.generation_config.cache_implementation)
        if given is None and implementation in ("static", "tidal"):
            kwargs[self.cache_name] = self.new_cache(args, kwargs, max_cache_len or 0)
        elif given is None or not isinstance(kwargs[given], StaticCache):
            kind = type(kwargs[given]).__name__ if given else f"cache_implementation={implementation!r}"
            warnings.warn(f"tidal: decoding needs a static cache (a TidalCache, or cache_implementation='static'); "
                          f"this generate call ({kind}) runs dense, without the tidal compile", TidalFallbackWarning,
                          stacklevel=2)
            if given is None:
                kwargs["cache_implementation"] = implementation
            model.forward = self.dense_forward
            try:
                return self.generate(*args, **kwargs)
            finally:
                model.forward = self.forward
        kwargs["cache_implementation"] = None  # the cache is given: transformers refuses both
        beams = kwargs.get("num_beams") or getattr(model.generation_config, "num_beams", 1) or 1
        interval, step_graph = self.forward.interval, self.forward.step_graph
        if beams > 1 and interval:
            warnings.warn("tidal: KV-cache correction does not support beam search yet; this generate call "
                          "runs without correction", TidalFallbackWarning, stacklevel=2)
            self.forward.interval = 0
        if beams > 1 and step_graph:
            warnings.warn("tidal: step_graphs does not support beam search (it reorders the cache every step); "
                          "this generate call decodes with the compiled forward", TidalFallbackWarning, stacklevel=2)
            self.forward.step_graph, step_graph.fallback = None, "beam search reorders the cache every step"
        try:
            return self.generate(*args, **kwargs)
        finally:
            self.forward.interval, self.forward.step_graph = interval, step_graph
            if step_graph:
                step_graph.release()  # the graph's outputs hold this call's cache

    def new_cache(self, args: tuple, kwargs: dict[str, Any], at_least: int = 0) -> TidalCache:
        """A TidalCache long enough for this call (prompt plus new tokens), as long as any before
        it and at least `at_least`."""
        inputs = args[0] if args else next(
            (kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
        if inputs is None:
            raise ValueError("tidal: generate needs input_ids (or inputs_embeds) to size the TidalCache")
        config = copy.deepcopy(kwargs.get("generation_config") or self.model.generation_config)
        config.update(**{k: kwargs[k] for k in ("max_new_tokens", "max_length") if k in kwargs})
        needed = inputs.shape[1] + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
        self.max_cache_len = max(self.max_cache_len, needed, at_least, getattr(config, "max_cache_len", None) or 0)
        return TidalCache(self.model.config, max_cache_len=self.max_cache_len, page_size=self.page_size)


CALIBRATION_OPTIONS = ("calibration_ids", "max_selection_layers", "max_dense_layers", "threshold", "decode_steps",
                       "tokenizer", "verbose")


def compile_for_generation(model: torch.nn.Module, config: Any = None, **options: Any) -> torch.nn.Module:
    """Set `model` up for `model.generate` with tidal decoding, in place; returns it.

    `config` is a YAML path, dict or TidalConfig, or `"calibrate"`: choose the layers from the
    model's own attention first (`tidal_compile.calibrate`, with `budget` and its options
    `calibration_ids`, `max_selection_layers`, ...); `explain(model)` then shows the choice.

    `model.forward` compiled with backend="tidal" (depth from the model config); each generate
    call gets a `TidalCache` (Quest's page metadata and the correction bookkeeping travel with
    it); prefill stays dense (uncompiled with `cudagraphs=True`, which captures the decode steps
    in CUDA graphs); transformers' own generate-time compile is turned off so the forward is not
    compiled twice; KV-cache correction every `correction.interval` tokens. Layer sets that do
    not fit the model fail here; with sliding-window layers, the sparse layers whose selection
    layer has another attention type are named here (they stay dense). Not yet supported, each
    with a warning and dense attention: encoder-decoder models (left as they are), generate
    calls with a dynamic cache (run uncompiled); beam search runs without correction.
    `guard_filter_fn` goes to torch.compile as it is (which of Dynamo's guards to keep, e.g.
    `torch.compiler.skip_guard_on_all_nn_modules_unsafe`: fewer guards to evaluate each step, at
    the price torch's docs name). `step_graphs=True` (a CUDA model; not with `cudagraphs`)
    captures each sequence's decode step whole in one CUDA graph and replays it, without the host's
    path through Python, guards and Inductor's graph tree (`tidal_compile.step_graph`: what it
    checks, and when it falls back to the compiled forward with a warning); prefill uncompiled.
    """
    if isinstance(config, str) and config == "calibrate":
        from tidal_compile.calibration import calibrate

        if "budget" not in options:
            raise ConfigError("compile_for_generation(model, \"calibrate\") needs budget=K")
        calibration = {key: options.pop(key) for key in CALIBRATION_OPTIONS if key in options}
        config = calibrate(model, calibration.pop("calibration_ids", None), budget=options["budget"], **calibration)
    guard_filter = options.pop("guard_filter_fn", None)
    step_graphs = options.pop("step_graphs", False)
    if guard_filter is not None and not callable(guard_filter):
        raise ConfigError(f"guard_filter_fn must be a function of Dynamo's guard entries, got {guard_filter!r}")
    if config is not None:
        options = {"config": config, **options}
    model_config = getattr(model, "config", None)
    if getattr(model_config, "num_hidden_layers", None) is not None:
        options.setdefault("num_layers", model_config.num_hidden_layers)
    parsed = BackendOptions.parse(options).config
    if getattr(model_config, "is_encoder_decoder", False):
        warnings.warn("tidal: encoder-decoder models are not supported yet; generation stays dense",
                      TidalFallbackWarning, stacklevel=2)
        return model
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"tidal: compile_for_generation needs a decoder-only model with generate(); "
                        f"{type(model).__name__} has none")
    _check_graph_options(model, bool(options.get("cudagraphs")), step_graphs)
    plan = parsed.resolve(options["num_layers"]) if "num_layers" in options else None  # bad layer sets fail here
    sharding = model_tensor_parallel(model)
    if sharding:
        check_granularity(parsed, sharding)
    warn_about_model(model_config)
    if plan is not None and parsed.mode == "tidal":
        _warn_mixed_attention(plan, attention_types(model_config))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.cache_implementation = "static"
        generation_config.disable_compile = True
    # Correction happens here, around the compiled forward; the backend itself never corrects.
    compile_options = {**options, "correction": {"interval": 0}}
    if guard_filter is not None:
        compile_options["guard_filter_fn"] = guard_filter  # torch.compile takes it out before the backend
    compiled = torch.compile(model.forward, backend="tidal", options=compile_options)
    dense_forward = model.forward
    forward = TidalForward(compiled, parsed.correction.interval,
                           prefill=dense_forward if options.get("cudagraphs") or step_graphs else None,
                           signature=inspect.signature(dense_forward),
                           step_graph=StepGraph(compiled) if step_graphs else None)
    page_size = parsed.page_size if parsed.mode == "quest" else None
    model.generate = TidalGenerate(model, model.generate, dense_forward, forward, page_size)
    model.forward = forward
    return model


def _check_graph_options(model: torch.nn.Module, cudagraphs: bool, step_graphs: Any) -> None:
    """CUDA-graph options need a CUDA model, and only one of them captures the decode steps."""
    if not isinstance(step_graphs, bool):
        raise ConfigError(f"step_graphs must be True or False, got {step_graphs!r}")
    if cudagraphs and step_graphs:
        raise ConfigError("cudagraphs=True and step_graphs=True both capture the decode steps in CUDA graphs; "
                          "pick one (step_graphs captures the whole step, cudagraphs Inductor's graphs)")
    on_gpu = any(p.is_cuda for p in model.parameters())
    for name, asked in (("cudagraphs", cudagraphs), ("step_graphs", step_graphs)):
        if asked and not on_gpu:
            raise ConfigError(f"{name}=True needs the model on a CUDA GPU (model.cuda()); it is not")


def warn_about_model(model_config: Any) -> None:
    """Say before the first call what tidal cannot do for this model: attention that is not SDPA
    (nothing to rewrite), and attention logits the model soft-caps (SDPA, so tidal, does not)."""
    implementation = hf_compat.attention_implementation(model_config)
    if implementation is not None and implementation != "sdpa":
        warnings.warn(f"tidal: the model's attention is {implementation!r}, and tidal rewrites only "
                      "scaled_dot_product_attention: nothing will be rewritten; load the model with "
                      "attn_implementation=\"sdpa\" where it supports it", TidalFallbackWarning, stacklevel=3)
    softcap = getattr(model_config, "attn_logit_softcapping", None)
    if softcap and implementation == "sdpa":
        warnings.warn(f"tidal: the model soft-caps its attention logits (attn_logit_softcapping={softcap}), which "
                      "scaled_dot_product_attention, and so tidal's ops, do not: the output differs from the "
                      "model's eager attention", TidalFallbackWarning, stacklevel=3)


def attention_types(model_config: Any) -> list[str]:
    """Each layer's attention type from a Hugging Face config ("full_attention", "sliding_attention",
    ...): its `layer_types`, or every layer sliding when it sets a sliding window without them."""
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types:
        return [str(kind) for kind in layer_types]
    if getattr(model_config, "sliding_window", None) and getattr(model_config, "use_sliding_window", True):
        return ["sliding_attention"] * layers
    return ["full_attention"] * layers


def _warn_mixed_attention(plan: ResolvedPlanConfig, types: list[str]) -> None:
    """Say before the first call which sparse layers will stay dense because their selection layer
    attends with another attention type (the pass reuses indices only under the same mask)."""
    if len(set(types)) < 2:
        return
    kept = [layer for layer in range(min(plan.num_layers, len(types)))
            if layer not in plan.dense_layers and layer not in plan.selection_layers
            and types[max(s for s in plan.selection_layers if s < layer)] != types[layer]]
    if kept:
        warnings.warn(f"tidal: layers {kept} will stay dense: their selection layer (the nearest earlier one of "
                      f"selection_layers={list(plan.selection_layers)}) uses another attention type (layer types "
                      f"{sorted(set(types))}), and indices are reused only under the same mask. Add a selection "
                      "layer of their type before them to make them sparse.", TidalFallbackWarning, stacklevel=3)
