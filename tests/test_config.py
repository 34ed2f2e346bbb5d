"""TidalConfig: loading from YAML / dict / keywords, defaults, and every validation error."""

from __future__ import annotations

import pytest

from tidal_compile.config import ConfigError, CorrectionConfig, TidalConfig, auto_selection_layers


def test_defaults_match_design():
    cfg = TidalConfig()
    assert (cfg.mode, cfg.budget, cfg.granularity, cfg.dense_layers) == ("tidal", 256, "query_head", (0, 1))
    assert cfg.selection_layers == "auto" and cfg.correction == CorrectionConfig(0)


def test_yaml_loading_with_overrides(tmp_path):
    path = tmp_path / "tidal.yaml"
    path.write_text("mode: tidal\nbudget: 64\ngranularity: kv_head\ndense_layers: [0]\n"
                    "selection_layers: [1, 5]\nsink: 2\nrecent: 4\npage_size: 8\ncorrection: {interval: 16}\n")
    cfg = TidalConfig.load(path, budget=128)
    assert cfg.budget == 128 and cfg.granularity == "kv_head" and cfg.dense_layers == (0,)
    assert cfg.selection_layers == (1, 5) and (cfg.sink, cfg.recent, cfg.page_size) == (2, 4, 8)
    assert cfg.correction.interval == 16


def test_load_accepts_dict_config_and_empty_yaml(tmp_path):
    cfg = TidalConfig.load({"budget": 32})
    assert TidalConfig.load(cfg, mode="full") == TidalConfig(budget=32, mode="full")
    (tmp_path / "empty.yaml").write_text("")
    assert TidalConfig.load(tmp_path / "empty.yaml") == TidalConfig()


def test_auto_selection_layers_follow_tidaldecode_default():
    assert auto_selection_layers(32, (0, 1)) == (2, 13)
    assert auto_selection_layers(8, (0, 1)) == (2,), "layer 3 would re-select right after layer 2"
    assert auto_selection_layers(12, (0, 1)) == (2, 5)
    assert auto_selection_layers(4, (0, 1)) == (2,)
    assert auto_selection_layers(2, (0, 1)) == ()
    plan = TidalConfig().resolve(32)
    assert plan.dense_layers == (0, 1) and plan.selection_layers == (2, 13)


@pytest.mark.parametrize("values, message", [
    ({"budgt": 3}, "unknown config key 'budgt'"),
    ({"correction": {"every": 3}}, "unknown config key 'correction.every'"),
    ({"mode": "fast"}, "mode must be one of tidal, quest, full, topk_oracle"),
    ({"granularity": "token"}, "granularity must be one of query_head, kv_head, layer"),
    ({"budget": 0}, "budget must be a positive integer"),
    ({"budget": -5}, "budget must be a positive integer"),
    ({"budget": "256"}, "budget must be an integer"),
    ({"budget": 2.5}, "budget must be an integer"),
    ({"budget": True}, "budget must be an integer"),
    ({"sink": -1}, "sink must be >= 0"),
    ({"recent": -1}, "recent must be >= 0"),
    ({"sink": 4, "recent": 4, "budget": 6}, "sink \\+ max\\(recent, 1\\) must be <= budget"),
    ({"page_size": 0}, "page_size must be a positive integer"),
    ({"mode": "quest", "budget": 16, "page_size": 16}, "at least 2 \\* page_size"),
    ({"dense_layers": "0,1"}, "dense_layers must be a list of layer indices"),
    ({"dense_layers": [0, -1]}, "dense_layers: layer index -1 is negative"),
    ({"selection_layers": "some"}, "selection_layers must be a list of layer indices or 'auto'"),
    ({"selection_layers": [2.0]}, "selection_layers must be a list"),
    ({"correction": 5}, "correction must be a mapping"),
    ({"correction": {"interval": -1}}, "correction.interval must be an integer >= 0"),
    ({"correction": {"interval": "often"}}, "correction.interval must be an integer"),
])
def test_invalid_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        TidalConfig.from_dict(values)


@pytest.mark.parametrize("values, layers, message", [
    ({"dense_layers": [0, 9]}, 8, "dense_layers: layer 9 is out of range for a model with 8 layers"),
    ({"selection_layers": [2, 8]}, 8, "selection_layers: layer 8 is out of range"),
    ({"dense_layers": [0, 1, 2], "selection_layers": [2, 5]}, 8, "overlap at layer 2"),
    ({"dense_layers": [0], "selection_layers": [3]}, 8, "layer 1 is sparse but no selection layer comes before it"),
])
def test_layer_sets_checked_against_depth(values, layers, message):
    cfg = TidalConfig.from_dict(values)
    with pytest.raises(ConfigError, match=message):
        cfg.resolve(layers)


def test_sparse_layer_check_only_in_tidal_mode():
    cfg = TidalConfig.from_dict({"mode": "topk_oracle", "dense_layers": [0], "selection_layers": []})
    assert cfg.resolve(4).selection_layers == ()


def test_yaml_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        TidalConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TidalConfig.load(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TidalConfig.load(listing)
    with pytest.raises(ConfigError, match="expected a YAML path, a dict or a TidalConfig"):
        TidalConfig.load(42)


def test_shipped_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples, "examples/ ships YAML configs"
    for path in examples:
        TidalConfig.load(path)
