"""TidalConfig: what the tidal pass does, loaded from YAML, a dict or keyword shorthands.

Every key of design section 3 is a field. Loading validates types and values and raises
:class:`ConfigError` naming the key and what is allowed. Layer indices are checked against the
model depth in :meth:`TidalConfig.resolve`, once the depth is known.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import yaml

MODES = ("tidal", "quest", "full", "topk_oracle")
GRANULARITIES = ("query_head", "kv_head", "layer")

# TidalDecode's reference setting for 32-layer Llama-3-8B re-selects at layer 13; "auto" scales
# that point to the model depth. No family has evidence for another point: calibrate per model.
DEFAULT_RESELECT_FRACTION = 13 / 32


class ConfigError(ValueError):
    """A tidal configuration value is invalid; the message names the key and allowed values."""


@dataclass(frozen=True)
class CorrectionConfig:
    """KV-cache correction: recompute polluted K/V every `interval` generated tokens (0 = off)."""

    interval: int = 0


@dataclass(frozen=True)
class TidalConfig:
    """Options of the tidal pass (design section 3)."""

    mode: str = "tidal"
    """tidal | quest | full | topk_oracle."""
    budget: int = 256
    """k: positions per sequence and index set that sparse layers attend to."""
    granularity: str = "query_head"
    """query_head | kv_head | layer: how many index sets a selection layer emits."""
    dense_layers: tuple[int, ...] = (0, 1)
    """Layers that always run exact attention."""
    selection_layers: Union[tuple[int, ...], str] = "auto"
    """Layers that run exact attention and pick the top-k positions, or "auto"."""
    sink: int = 0
    """The first `sink` valid positions are always selected (inside the budget)."""
    recent: int = 0
    """The last `recent` valid positions are always selected (inside the budget)."""
    page_size: int = 16
    """Quest page size (mode quest only)."""
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    """KV-cache correction settings."""

    def __post_init__(self) -> None:
        _validate(self)

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, source: Union[None, str, os.PathLike, Mapping[str, Any], "TidalConfig"] = None,
             **overrides: Any) -> "TidalConfig":
        """Build a config from a YAML path, a dict or a config, then apply keyword overrides."""
        if isinstance(source, TidalConfig):
            base = dataclasses.asdict(source)
            base["correction"] = dataclasses.asdict(source.correction)
        elif source is None:
            base = {}
        elif isinstance(source, (str, os.PathLike)):
            base = _read_yaml(source)
        elif isinstance(source, Mapping):
            base = dict(source)
        else:
            raise ConfigError(
                f"config: expected a YAML path, a dict or a TidalConfig, got {type(source).__name__}")
        return cls.from_dict({**base, **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TidalConfig":
        """Build a config from plain values (as read from YAML), validating every key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")
        kwargs = dict(values)
        for key in ("dense_layers", "selection_layers"):
            if key in kwargs:
                kwargs[key] = _layer_list(key, kwargs[key])
        if "correction" in kwargs:
            kwargs["correction"] = _correction(kwargs["correction"])
        return cls(**kwargs)

    # ------------------------------------------------------------- resolving

    def resolve(self, num_layers: int) -> "ResolvedPlanConfig":
        """Fix the layer sets for a model of `num_layers` layers and check they fit it."""
        if num_layers <= 0:
            raise ConfigError(f"num_layers must be positive, got {num_layers}")
        dense = tuple(sorted(set(self.dense_layers)))
        _check_in_range("dense_layers", dense, num_layers)
        if self.selection_layers == "auto":
            selection = auto_selection_layers(num_layers, dense)
        else:
            selection = tuple(sorted(set(self.selection_layers)))
            _check_in_range("selection_layers", selection, num_layers)
        overlap = sorted(set(dense) & set(selection))
        if overlap:
            raise ConfigError(
                f"dense_layers and selection_layers overlap at layer {overlap[0]}; "
                "a layer is either dense or selection")
        if self.mode == "tidal":
            first_sparse = min((i for i in range(num_layers) if i not in dense and i not in selection),
                               default=None)
            if first_sparse is not None and not any(s < first_sparse for s in selection):
                raise ConfigError(
                    f"selection_layers: layer {first_sparse} is sparse but no selection layer comes "
                    f"before it (selection_layers={list(selection)}); add an earlier selection "
                    "layer or make it dense")
        return ResolvedPlanConfig(config=self, num_layers=num_layers, dense_layers=dense,
                                  selection_layers=selection)


@dataclass(frozen=True)
class ResolvedPlanConfig:
    """A config whose layer sets are fixed for a model of known depth."""

    config: TidalConfig
    num_layers: int
    dense_layers: tuple[int, ...]
    selection_layers: tuple[int, ...]


def auto_selection_layers(num_layers: int, dense_layers: Sequence[int]) -> tuple[int, ...]:
    """TidalDecode's default: the first layer after the dense ones, and a re-selection layer
    at 13/32 of the depth (layer 13 of a 32-layer Llama). Layers past the model's end are
    dropped, so a 2-layer model has none.
    """
    first = max(dense_layers, default=-1) + 1
    reselect = round(DEFAULT_RESELECT_FRACTION * num_layers)
    chosen = {first} | ({reselect} if reselect > first + 1 else set())  # adjacent: nothing to reuse
    return tuple(sorted(i for i in chosen if i < num_layers and i not in dense_layers))


# ---------------------------------------------------------------- validation


def _validate(cfg: TidalConfig) -> None:
    _check_choice("mode", cfg.mode, MODES)
    _check_choice("granularity", cfg.granularity, GRANULARITIES)
    for key in ("budget", "sink", "recent", "page_size"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if cfg.budget <= 0:
        raise ConfigError(f"budget must be a positive integer (tokens kept per index set), got {cfg.budget}")
    for key in ("sink", "recent"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    # The current token is always kept; sink and recent count inside the budget.
    if cfg.sink + max(cfg.recent, 1) > cfg.budget:
        raise ConfigError(
            f"sink + max(recent, 1) must be <= budget (the current token is always kept), "
            f"got sink={cfg.sink}, recent={cfg.recent}, budget={cfg.budget}")
    if cfg.page_size <= 0:
        raise ConfigError(f"page_size must be a positive integer, got {cfg.page_size}")
    if cfg.mode == "quest" and cfg.page_size & (cfg.page_size - 1):
        raise ConfigError(f"page_size must be a power of two in mode quest (the kernels tile pages), got {cfg.page_size}")
    if cfg.mode == "quest" and cfg.budget < 2 * cfg.page_size:
        raise ConfigError(
            f"budget must be at least 2 * page_size in mode quest, got budget={cfg.budget}, "
            f"page_size={cfg.page_size}")
    if not isinstance(cfg.dense_layers, tuple):
        raise ConfigError(f"dense_layers must be a list of layer indices, got {cfg.dense_layers!r}")
    if not (cfg.selection_layers == "auto" or isinstance(cfg.selection_layers, tuple)):
        raise ConfigError(
            f"selection_layers must be a list of layer indices or 'auto', got {cfg.selection_layers!r}")
    if not isinstance(cfg.correction, CorrectionConfig):
        raise ConfigError(f"correction must be a mapping like {{interval: 0}}, got {cfg.correction!r}")
    if not isinstance(cfg.correction.interval, int) or cfg.correction.interval < 0:
        raise ConfigError(f"correction.interval must be an integer >= 0, got {cfg.correction.interval!r}")


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _layer_list(key: str, value: Any) -> Union[tuple[int, ...], str]:
    if key == "selection_layers" and value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        allowed = "a list of layer indices" + (" or 'auto'" if key == "selection_layers" else "")
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    negative = [i for i in value if i < 0]
    if negative:
        raise ConfigError(f"{key}: layer index {negative[0]} is negative; layers count from 0")
    return tuple(value)


def _check_in_range(key: str, layers: Sequence[int], num_layers: int) -> None:
    for i in layers:
        if i >= num_layers:
            raise ConfigError(
                f"{key}: layer {i} is out of range for a model with {num_layers} layers "
                f"(allowed 0..{num_layers - 1})")


def _correction(value: Any) -> CorrectionConfig:
    if isinstance(value, CorrectionConfig):
        return value
    if value is None:
        return CorrectionConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(f"correction must be a mapping like {{interval: 0}}, got {value!r}")
    unknown = sorted(set(value) - {"interval"})
    if unknown:
        raise ConfigError(f"unknown config key 'correction.{unknown[0]}'; allowed keys: correction.interval")
    interval = value.get("interval", 0)
    if not isinstance(interval, int) or isinstance(interval, bool):
        raise ConfigError(f"correction.interval must be an integer >= 0, got {interval!r}")
    return CorrectionConfig(interval=interval)


def _read_yaml(path: Union[str, os.PathLike]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {os.fspath(path)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {os.fspath(path)} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {os.fspath(path)} must hold a mapping of keys, got {type(data).__name__}")
    return data
