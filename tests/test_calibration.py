"""Calibration: measured coverage, the layer choice, the YAML it writes, and the whole path on
a tiny model. The planted tests build the attention of every layer by hand (the probe's own
code path, fed through a toy module), so the right answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from tidal_compile import TidalConfig
from tidal_compile.calibration import (Coverage, CoverageProbe, Variant, best_plans, choose_plan, measure_coverage,
                                       split_for_decoding, variants, write_yaml)
from models import tiny_model

LAYERS, HEADS, LENGTH, BUDGET = 8, 2, 64, 8


class PlantedLayer(torch.nn.Module):
    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx


def planted_coverage(plant: int, seed: int = 0, steps: int = 6) -> Coverage:
    """Layers after `plant` attend to the positions that layer `plant` ranks highest (a shifted
    copy of its keys' scores); every other layer attends to random positions of its own. So the
    plant's top-k covers every later layer, and no other layer covers them."""
    gen = torch.Generator().manual_seed(seed)
    probe = CoverageProbe(LAYERS, BUDGET, variants(BUDGET, HEADS, HEADS))
    for _ in range(steps):
        hot = torch.randperm(LENGTH, generator=gen)[:BUDGET - 1]
        for layer in range(LAYERS):
            key = torch.randn(1, HEADS, LENGTH, 4, generator=gen) * 0.1
            query = torch.zeros(1, HEADS, 1, 4)
            query[..., 0] = 1.0
            targets = hot if layer >= plant else torch.randperm(LENGTH, generator=gen)[:BUDGET - 1]
            key[:, :, targets, 0] += 6.0  # these positions get almost all of the layer's attention
            probe.attention(PlantedLayer(layer), query, key, key, None, scaling=1.0)
    return Coverage(LAYERS, HEADS, HEADS, BUDGET, LENGTH, steps, probe.coverage())


@pytest.mark.parametrize("plant", [2, 5])
def test_calibration_picks_the_planted_selection_layer(plant):
    coverage = planted_coverage(plant)
    table = coverage.table[Variant("query_head", 0, 0)]
    assert table[plant, plant + 1:].min() > 0.9 and table[plant - 1, plant + 1:].max() < 0.5
    plan = choose_plan(coverage, max_dense_layers=LAYERS, max_selection_layers=1, threshold=0.9)
    assert plan.selection_layers == (plant,)
    assert set(plan.dense_layers) == set(range(plant)), "the layers before the plant have no good source"
    assert all(plan.source[layer] == plant for layer in range(plant + 1, LAYERS))
    assert plan.worst > 0.9


def test_calibration_is_deterministic():
    a, b = planted_coverage(3), planted_coverage(3)
    assert choose_plan(a) == choose_plan(b)


def test_best_plans_maximise_the_worst_layer_for_each_cost():
    nan = math.nan
    # layer 1 covers 2 and 3 well; layer 0 covers them badly
    table = torch.tensor([[nan, 0.5, 0.2, 0.3],
                          [nan, nan, 0.95, 0.9],
                          [nan, nan, nan, 0.6],
                          [nan, nan, nan, nan]])
    best = best_plans(table, max_dense=2, max_selection=2)
    worst, mean, roles = best[2]
    assert roles == ("dense", "selection", 1, 1) and worst == pytest.approx(0.9)
    assert best[1][0] == pytest.approx(0.2), "one full read: layer 0 selects for all"


def test_the_written_yaml_loads_back_to_the_same_config(tmp_path):
    config = TidalConfig(budget=64, granularity="kv_head", dense_layers=(0,), selection_layers=(1, 4), recent=8)
    path = tmp_path / "model.yaml"
    write_yaml(config, "calibrated: ...\nlayer   0  dense", str(path))
    assert TidalConfig.load(str(path)) == config
    assert path.read_text().startswith("# calibrated: ...\n# layer   0  dense\n")


def test_calibration_of_a_tiny_model_end_to_end(tmp_path):
    """A real (tiny, random) Llama: coverage of every pair measured through the model's own
    attention, a valid config chosen, identical on a second run."""
    import tidal_compile

    model = tiny_model("llama", layers=5)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 96, (40,), generator=gen) for _ in range(2)]
    config = tidal_compile.calibrate(model, ids, budget=8, decode_steps=4, verbose=False)
    assert config == tidal_compile.calibrate(model, ids, budget=8, decode_steps=4, verbose=False)
    plan = config.resolve(5)
    assert config.budget == 8 and len(plan.selection_layers) <= 3 and len(plan.dense_layers) <= 2
    prompts, continuations = split_for_decoding(ids, 4)
    coverage = measure_coverage(model, prompts, continuations, 8)
    for table in coverage.table.values():
        upper = table[torch.triu(torch.ones(5, 5, dtype=torch.bool))]
        assert ((upper > 0) & (upper <= 1 + 1e-6)).all(), "coverage is a share of attention mass"
    assert "calibrated: budget 8" in tidal_compile.calibration.calibration_summary(model)


def test_compile_for_generation_calibrates_then_compiles_and_explains_the_choice():
    import tidal_compile
    from tidal_compile.hf import compile_for_generation

    from models import prompts

    torch._dynamo.reset()
    tidal_compile.clear_reports()
    model = tiny_model("llama", layers=5)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 96, (40,), generator=gen) for _ in range(2)]
    compile_for_generation(model, "calibrate", budget=8, calibration_ids=ids, decode_steps=4, verbose=False,
                           inner_backend="eager")
    model.generate(prompts(1, 12, False)[0], max_new_tokens=3, do_sample=False)
    text = str(tidal_compile.explain(model))
    assert text.startswith("calibrated: budget 8") and "tidal graph" in text


def test_the_calibrate_command_writes_a_config_that_loads_back(tmp_path, capsys):
    """`python -m tidal_compile.calibrate MODEL --budget K --out FILE` on a saved model of the
    project's retrieval vocabulary (built-in data, no tokenizer needed)."""
    from tidal_compile.calibration import main
    from test_eval import _tiny_retrieval_model

    model_dir = _tiny_retrieval_model(tmp_path / "model")
    out = tmp_path / "model.yaml"
    main([str(model_dir), "--budget", "16", "--out", str(out)])
    config = TidalConfig.load(str(out))
    assert config.mode == "tidal" and config.budget == 16
    text = out.read_text()
    assert text.startswith("# calibrated: budget 16") and "# layer   0" in text
    assert "predicted KV bytes read per decode step" in capsys.readouterr().out
