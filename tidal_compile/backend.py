"""The `tidal` torch.compile backend: rewrite decode attention, then compile with Inductor.

Registered by entry point (`torch_dynamo_backends: tidal`), so after `pip install`::

    torch.compile(model, backend="tidal", options={"config": "tidal.yaml", "budget": 128})

`options` holds `config` (YAML path, dict or TidalConfig), any config key as a shorthand that
overrides it, and backend keys: `num_layers` (model depth, default: highest layer index in the
graph + 1), `inner_backend` (`inductor` default; `aot_eager` or `eager` to debug),
`cudagraphs` (Inductor captures each graph in CUDA graphs and replays it, what
`mode="reduce-overhead"` does; torch.compile takes no `mode` together with `options`) and
`inductor` (Inductor config patches, e.g. `{"max_autotune": True, "coordinate_descent_tuning":
True}`: what torch.compile's `options` would pass to plain Inductor) and `merge_projections`
(default true: projections reading one input, q|k|v and gate|up, become one matrix product over
their stacked weights, `passes/merge_projections`). The
backend never writes into `options`; per-sequence state (Quest's page metadata) lives in the
KV cache (:class:`tidal_compile.TidalCache`).
`torch.compile(model, backend="tidal", mode=...)` (no options) passes an Inductor mode through.
Inductor runs `passes/masked_fill` as its post-grad pre-pass: boolean-mask writes become `where`,
so a tensor-parallel model's graphs (transformers' sharded embedding) stay capturable in CUDA graphs.
CUDA graphs need a Hugging Face static cache allocated outside the compiled region (prefill run
uncompiled, as transformers' generate does; `hf.compile_for_generation` does it): a cache whose
lazy allocation is compiled into a captured graph crashes the replay (segfault, plain Inductor
as well, torch 2.11).
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx

from tidal_compile.config import ConfigError, TidalConfig
from tidal_compile.passes import run_tidal_passes
from tidal_compile.passes.masked_fill import MaskedFillAsWhere
from tidal_compile.passes.merge_projections import MergedProjections, merge_projections
from tidal_compile.report import build_report, record

log = logging.getLogger("tidal_compile")

INNER_BACKENDS = ("inductor", "aot_eager", "eager")


class TidalFallbackWarning(UserWarning):
    """A layer the config made sparse stays dense (e.g. its selection layer is in another graph)."""


@dataclass(frozen=True)
class BackendOptions:
    """`options=` of torch.compile, parsed: the tidal config plus backend-only settings."""

    config: TidalConfig
    num_layers: Optional[int] = None
    inner_backend: str = "inductor"
    cudagraphs: bool = False
    inductor: Mapping[str, Any] = field(default_factory=dict)
    merge_projections: bool = True

    KEYS = ("config", "num_layers", "inner_backend", "cudagraphs", "inductor", "merge_projections")
    """Backend options besides the config keys."""

    @classmethod
    def parse(cls, options: Optional[Mapping[str, Any]]) -> "BackendOptions":
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"options must be a dict of config keys and backend options "
                              f"({', '.join(cls.KEYS)}), got {type(options).__name__}")
        opts = dict(options or {})
        num_layers = opts.pop("num_layers", None)
        inner = opts.pop("inner_backend", "inductor")
        cudagraphs = opts.pop("cudagraphs", False)
        merge = opts.pop("merge_projections", True)
        inductor = _inductor_config(opts.pop("inductor", {}), inner)
        source = opts.pop("config", None)
        if num_layers is not None and (not isinstance(num_layers, int) or num_layers <= 0):
            raise ConfigError(f"num_layers must be a positive integer, got {num_layers!r}")
        if inner not in INNER_BACKENDS:
            raise ConfigError(f"inner_backend must be one of {', '.join(INNER_BACKENDS)}; got {inner!r}")
        if not isinstance(cudagraphs, bool):
            raise ConfigError(f"cudagraphs must be true or false, got {cudagraphs!r}")
        if not isinstance(merge, bool):
            raise ConfigError(f"merge_projections must be true or false, got {merge!r}")
        if cudagraphs and inner != "inductor":
            raise ConfigError(f"cudagraphs needs inner_backend inductor, got {inner!r}")
        try:
            config = TidalConfig.load(source, **opts)
        except ConfigError as e:
            if "unknown config key" in str(e):
                raise ConfigError(f"{e} (backend options: {', '.join(cls.KEYS)})") from None
            raise
        return cls(config, num_layers, inner, cudagraphs, inductor, merge)


def tidal_backend(gm: fx.GraphModule, example_inputs: list[Any],
                  options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> Callable:
    """Dynamo backend: run the tidal passes on `gm`, report, and compile the result.
    `mode` is torch.compile's Inductor mode (e.g. "reduce-overhead"), given without `options`."""
    opts = BackendOptions.parse(options)
    if opts.cudagraphs and not any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        raise ConfigError("cudagraphs=True needs a CUDA GPU: this graph's tensors are not on one (drop the option "
                          "on the CPU)")
    inductor_patches = _inductor_mode_patches(mode, opts)
    if opts.config.correction.interval:
        warnings.warn("tidal: correction.interval takes effect through tidal_compile.hf.compile_for_generation; "
                      "a bare torch.compile backend cannot correct the cache, so this graph decodes without "
                      "correction", TidalFallbackWarning, stacklevel=2)
    result = run_tidal_passes(gm, opts.config, opts.num_layers)
    merged = merge_projections(gm, example_inputs) if opts.merge_projections else MergedProjections()
    report = build_report(result, opts.config, example_inputs, merged.summary())
    record(report)
    if report.layers:
        log.info("%s", report)
    for message in report.warnings():
        warnings.warn(message, TidalFallbackWarning, stacklevel=2)
    compiled = _inner_compile(opts.inner_backend, inductor_patches)(gm, example_inputs)
    merged.share_storage()
    return merged.guard(compiled)


def _inductor_config(patches: Any, inner_backend: str) -> dict[str, Any]:
    """The `inductor` option checked: a dict of Inductor config keys (dotted, as
    `torch._inductor.config` names them), for the Inductor inner backend."""
    if not isinstance(patches, Mapping):
        raise ConfigError(f"inductor must be a dict of Inductor config keys, got {type(patches).__name__}")
    if not patches:  # the common case: no copy of Inductor's config at every compile
        return {}
    from torch._inductor import config as inductor_config

    if inner_backend != "inductor":
        raise ConfigError(f"inductor config patches need inner_backend inductor, got {inner_backend!r}")
    known = inductor_config.get_config_copy()
    unknown = sorted(key for key in patches if key not in known)
    if unknown:
        raise ConfigError(f"unknown Inductor config key(s) {', '.join(map(repr, unknown))} in the inductor option "
                          f"(keys of torch._inductor.config, e.g. 'max_autotune', 'coordinate_descent_tuning')")
    return dict(patches)


def _inductor_mode_patches(mode: Optional[str], opts: BackendOptions) -> dict[str, Any]:
    """Inductor config patches for torch.compile's `mode`, the `inductor` and `cudagraphs`
    options, and the post-grad pass that writes boolean-mask stores as `where` (capturable in
    CUDA graphs)."""
    from torch._inductor import config as inductor_config, list_mode_options

    try:
        patches = dict(list_mode_options(mode)) if mode else {}
    except RuntimeError as e:
        raise ConfigError(f"torch.compile mode: {e}") from None
    patches.update(opts.inductor)
    if opts.cudagraphs:
        patches["triton.cudagraphs"] = True
    patches["post_grad_custom_pre_pass"] = MaskedFillAsWhere(then=inductor_config.post_grad_custom_pre_pass)
    return patches


def _inner_compile(name: str, inductor_patches: dict[str, Any]) -> Callable:
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return functools.partial(compile_fx, config_patches=inductor_patches)
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    return torch._dynamo.lookup_backend(name)
