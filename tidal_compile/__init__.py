"""tidal-compile: a torch.compile backend for TidalDecode sparse-attention decoding.

    model = torch.compile(model, backend="tidal", options={"config": "tidal.yaml"})
    ...
    print(tidal_compile.explain(model))
"""

from typing import Any

import torch

from tidal_compile import ops  # noqa: F401  (registers torch.ops.tidal.*)
from tidal_compile.backend import BackendOptions, TidalFallbackWarning, tidal_backend
from tidal_compile.config import ConfigError, CorrectionConfig, TidalConfig
from tidal_compile.cache import TidalCache
from tidal_compile.calibration import calibrate
from tidal_compile.report import clear_reports, explain

__version__ = "0.1.0"


def compile(model: Any, config: Any = None, **options: Any) -> Any:
    """`torch.compile(model, backend="tidal", options=...)`, with the options checked now: a bad
    key raises :class:`ConfigError` here rather than at the first call, and so do layer sets that
    do not fit the model's depth (from `num_layers`, or a Hugging Face model's config, which then
    also gives the backend the depth)."""
    if config is not None:
        options = {"config": config, **options}
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(depth, int):
        options.setdefault("num_layers", depth)
    parsed = BackendOptions.parse(options)
    if parsed.num_layers is not None:
        parsed.config.resolve(parsed.num_layers)
    if getattr(model, "config", None) is not None:
        from tidal_compile.hf import warn_about_model

        warn_about_model(model.config)
    return torch.compile(model, backend="tidal", options=options)


__all__ = ["BackendOptions", "ConfigError", "calibrate", "CorrectionConfig", "TidalCache", "TidalConfig", "TidalFallbackWarning",
           "clear_reports", "compile", "explain", "tidal_backend"]
