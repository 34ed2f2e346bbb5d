"""The `tidal` backend: registration, options, errors, explain and the compile-time log."""

from __future__ import annotations

import logging
import re
from importlib.metadata import entry_points

import pytest
import torch

import tidal_compile
from tidal_compile import BackendOptions, ConfigError, TidalConfig
from tidal_compile.passes.masked_fill import MaskedFillAsWhere
from toy_decoder import ToyDecoder


def test_registered_by_entry_point():
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "tidal" in names
    assert "tidal" in torch._dynamo.list_backends(exclude_tags=())


def test_options_merge_yaml_and_shorthands(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("budget: 64\ngranularity: layer\n")
    opts = BackendOptions.parse({"config": str(path), "budget": 32, "num_layers": 8, "inner_backend": "eager"})
    assert opts.config == TidalConfig(budget=32, granularity="layer")
    assert (opts.num_layers, opts.inner_backend, opts.cudagraphs) == (8, "eager", False)
    assert BackendOptions.parse({"cudagraphs": True}).cudagraphs
    assert BackendOptions.parse({"config": TidalConfig(budget=8)}).config.budget == 8
    assert BackendOptions.parse(None).config == TidalConfig()


@pytest.mark.parametrize("options, message", [
    ({"budgt": 3}, "unknown config key 'budgt'.*backend options: config, num_layers, inner_backend, cudagraphs"),
    ({"cudagraphs": "yes"}, "cudagraphs must be true or false"),
    ({"merge_projections": "yes"}, "merge_projections must be true or false"),
    ({"cudagraphs": True, "inner_backend": "eager"}, "cudagraphs needs inner_backend inductor"),
    ({"inner_backend": "tvm"}, "inner_backend must be one of inductor, aot_eager, eager"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
    ({"mode": "quest", "quest_state": {}}, "unknown config key 'quest_state'"),
    ({"mode": "quest", "page_size": 12, "budget": 48}, "page_size must be a power of two"),
    ({"budget": 0}, "budget must be a positive integer"),
])
def test_bad_options_raise_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        BackendOptions.parse(options)
    with pytest.raises(ConfigError, match=message):
        tidal_compile.compile(torch.nn.Linear(2, 2), **options)


def test_options_of_the_wrong_type_are_named():
    with pytest.raises(ConfigError, match="options must be a dict .* got list"):
        BackendOptions.parse([("budget", 3)])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="options must be a dict"):
        torch.compile(torch.nn.Linear(4, 4), backend="tidal", options=[("budget", 3)])(torch.randn(2, 4))


def test_the_backend_leaves_the_options_dict_as_given():
    torch._dynamo.reset()
    options = {"mode": "quest", "budget": 32, "page_size": 8, "inner_backend": "eager"}
    model = ToyDecoder(num_layers=4)
    with torch.no_grad(), pytest.warns(tidal_compile.TidalFallbackWarning, match="pass cache=tidal_compile.TidalCache"):
        torch.compile(model, backend="tidal", options=options)(*model.inputs())
    assert options == {"mode": "quest", "budget": 32, "page_size": 8, "inner_backend": "eager"}


def test_bad_key_through_torch_compile_names_it():
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="tidal", options={"budgt": 3})
    with pytest.raises(Exception, match="unknown config key 'budgt'"):
        compiled(torch.randn(2, 4))


def test_torch_compile_mode_reaches_inductor(monkeypatch):
    """torch.compile(..., backend="tidal", mode=M) (no options) compiles with Inductor's patches for
    M; the cudagraphs option patches the same (on CUDA graphs only); an unknown mode names the problem."""
    import torch._inductor.compile_fx as compile_fx

    seen = []
    monkeypatch.setattr(compile_fx, "compile_fx",
                        lambda gm, inputs, config_patches: seen.append(config_patches) or gm.forward)
    x = torch.randn(2, 4)
    for kwargs in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"}):
        torch._dynamo.reset()
        torch.compile(torch.nn.Linear(4, 4), backend="tidal", **kwargs)(x)
    assert seen[0].pop("triton.cudagraphs") is True
    assert isinstance(seen[0].pop("post_grad_custom_pre_pass"), MaskedFillAsWhere) and not seen[0]
    assert seen[1]["max_autotune"] is True
    from tidal_compile.backend import _inductor_mode_patches
    patches = _inductor_mode_patches(None, BackendOptions.parse({"cudagraphs": True}))
    assert patches.keys() == {"triton.cudagraphs", "post_grad_custom_pre_pass"} and patches["triton.cudagraphs"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compile mode: Unrecognized mode=fast"):
        torch.compile(torch.nn.Linear(4, 4), backend="tidal", mode="fast")(x)


def test_inductor_option_patches_reach_inductor_and_bad_ones_name_the_problem(monkeypatch):
    """options={"inductor": {...}} passes Inductor config patches through (beside cudagraphs); an
    unknown key, a non-dict or a non-Inductor inner backend is a ConfigError naming it."""
    import torch._inductor.compile_fx as compile_fx

    seen = []
    monkeypatch.setattr(compile_fx, "compile_fx",
                        lambda gm, inputs, config_patches: seen.append(config_patches) or gm.forward)
    torch._dynamo.reset()
    options = {"inductor": {"coordinate_descent_tuning": True, "max_autotune_gemm": True}}
    torch.compile(torch.nn.Linear(4, 4), backend="tidal", options=options)(torch.randn(2, 4))
    assert seen[0]["coordinate_descent_tuning"] is True and seen[0]["max_autotune_gemm"] is True
    for bad, message in (({"inductor": {"max_autotun": True}}, "unknown Inductor config key(s) 'max_autotun'"),
                         ({"inductor": 3}, "inductor must be a dict of Inductor config keys, got int"),
                         ({"inductor": {"max_autotune": True}, "inner_backend": "eager"},
                          "inductor config patches need inner_backend inductor")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            BackendOptions.parse(bad)


def test_explain_lists_layers_and_logs_at_compile_time(caplog):
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    assert "no graph compiled yet" in str(tidal_compile.explain())
    model, other = ToyDecoder(num_layers=4), ToyDecoder(num_layers=4)
    compiled = tidal_compile.compile(model, budget=4, inner_backend="eager")
    with caplog.at_level(logging.INFO, logger="tidal_compile"), torch.no_grad():
        compiled(*model.inputs())
    text = str(tidal_compile.explain(compiled))
    assert "2 dense, 1 selection, 1 sparse" in text
    assert "layer   3  decode   sparse     indices from layer 2, k=4" in text
    assert "tidal graph" in caplog.text and "indices from layer 2" in caplog.text
    assert tidal_compile.explain(other) == [] and len(tidal_compile.explain()) == 1


def test_correction_through_the_bare_backend_warns():
    torch._dynamo.reset()
    model = ToyDecoder(num_layers=4)
    compiled = tidal_compile.compile(model, correction={"interval": 8}, inner_backend="eager")
    with pytest.warns(tidal_compile.TidalFallbackWarning, match="takes effect through .*compile_for_generation"):
        with torch.no_grad():
            compiled(*model.inputs())


def test_cuda_calls_the_kernels_do_not_take_are_reported_and_warned_once():
    """float64 on CUDA runs the PyTorch reference: the report says so with the reason, and one
    warning names the layers (fake CUDA tensors: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    def attend(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(out, k, v)

    gm = torch.fx.symbolic_trace(attend)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function"]
    for layer, node in enumerate(sdpa):
        node.meta["nn_module_stack"] = {"m": (f"model.layers.{layer}.self_attn", torch.nn.Module)}
    with FakeTensorMode() as mode:
        q, k = torch.empty(1, 2, 1, 8, device="cuda", dtype=torch.float64), torch.empty(1, 2, 5, 8, device="cuda",
                                                                                       dtype=torch.float64)
    FakeTensorProp(gm, mode).propagate(q, k, k)
    tidal_compile.clear_reports()
    with pytest.warns(tidal_compile.TidalFallbackWarning, match=r"layers \[0, 1\] run the plain-PyTorch reference"
                      r".*dtype torch.float64") as caught:
        tidal_compile.tidal_backend(gm, [q, k, k], options={"mode": "full", "inner_backend": "eager"})
    assert len([w for w in caught if "reference" in str(w.message)]) == 1
    text = str(tidal_compile.explain())
    assert text.count("[PyTorch reference, not the kernels: dtype torch.float64") == 2, text


def test_eager_attention_is_named_with_the_fix():
    """A model whose attention is not SDPA (attn_implementation="eager") gets nothing rewritten,
    and one warning says so and how to fix it."""
    torch._dynamo.reset()
    tidal_compile.clear_reports()
    model = ToyDecoder(num_layers=3, expand="eager")
    with pytest.warns(tidal_compile.TidalFallbackWarning, match=r"layers \[0, 1, 2\]: attention computed without "
                      r"scaled_dot_product_attention .* attn_implementation=\"sdpa\""), torch.no_grad():
        tidal_compile.compile(model, inner_backend="eager")(*model.inputs())
    assert "eager attention" in str(tidal_compile.explain())


def test_compile_checks_layer_sets_against_the_model_depth_at_once():
    from transformers import LlamaConfig

    model = torch.nn.Linear(2, 2)
    model.config = LlamaConfig(num_hidden_layers=4)
    with pytest.raises(ConfigError, match="selection_layers: layer 5 is out of range for a model with 4 layers"):
        tidal_compile.compile(model, selection_layers=[2, 5])
    with pytest.raises(ConfigError, match="dense_layers and selection_layers overlap at layer 2"):
        tidal_compile.compile(model, dense_layers=[0, 2], selection_layers=[2])


def test_two_compiles_with_different_configs_do_not_mix():
    """The same model compiled twice in one process (mode full and a sparse tidal config), calls
    interleaved: each keeps its own graphs and results."""
    model = ToyDecoder(num_layers=4)
    torch._dynamo.reset()
    full = tidal_compile.compile(model, mode="full", inner_backend="eager")
    sparse = tidal_compile.compile(model, budget=2, selection_layers=[2], inner_backend="eager")
    inputs = model.inputs(length=12)
    with torch.no_grad():
        expected = model(*inputs)
        for _ in range(2):
            torch.testing.assert_close(full(*inputs), expected)
            assert (sparse(*inputs) - expected).abs().max() > 1e-4, "budget 2 of 12 positions changes the output"
    modes = {g.config.mode for g in tidal_compile.explain(model)}
    assert modes == {"full", "tidal"}
