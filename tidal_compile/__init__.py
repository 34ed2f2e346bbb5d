"""tidal-compile: a torch.compile backend for TidalDecode sparse-attention decoding.

    model = torch.compile(model, backend="tidal", options={"config": "tidal.yaml"})
    ...
    print(tidal_compile.explain(model))
"""

from tidal_compile import ops  # noqa: F401  (registers torch.ops.tidal.*)
from tidal_compile.backend import BackendOptions, TidalFallbackWarning, tidal_backend
from tidal_compile.config import ConfigError, CorrectionConfig, TidalConfig
from tidal_compile.report import clear_reports, explain

__version__ = "0.1.0"

__all__ = ["BackendOptions", "ConfigError", "CorrectionConfig", "TidalConfig", "TidalFallbackWarning",
           "clear_reports", "explain", "tidal_backend"]
