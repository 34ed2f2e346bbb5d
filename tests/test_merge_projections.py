"""Projections that read one input become one matrix product (passes/merge_projections.py): the
same outputs, the parameters sharing the merged weights' storage, and untouched where merging
would be wrong (gradients, a view that flattens the output, merging switched off); a parameter
replaced after the compile still gives the right output."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tidal_compile
from models import greedy_decode, prompts, tiny_model


class Projections(torch.nn.Module):
    """Linear projections of one input, each viewed as heads (as attention's q, k and v are) and
    summed over them, plus a projection of another input that must stay as it is."""

    def __init__(self, width: int, outs: list[int], bias: bool, head: int):
        super().__init__()
        self.head = head
        self.projections = torch.nn.ModuleList(torch.nn.Linear(width, out, bias=bias) for out in outs)
        self.other = torch.nn.Linear(width, outs[0], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [p(x).view(*x.shape[:-1], -1, self.head).sum(-2) for p in self.projections]
        return torch.stack(outs).sum(0) + self.other(x * 2).view(*x.shape[:-1], -1, self.head).sum(-2)


def compiled(module: torch.nn.Module, **options) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(module, backend="tidal", options={"inner_backend": "aot_eager", **options})


def projections_line() -> str:
    """The last compiled graph's report line on merged projections ("" if none)."""
    return next((line for line in str(tidal_compile.explain()).splitlines() if "projections" in line), "")


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 4), width=st.sampled_from([8, 16]),
       heads=st.lists(st.integers(1, 4), min_size=2, max_size=4), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_merged_projections_give_the_separate_outputs(batch, seq, width, heads, bias, dtype, seed):
    torch.manual_seed(seed)
    module = Projections(width, [4 * h for h in heads], bias, head=4).to(dtype)
    x = torch.randn(batch, seq, width, dtype=dtype)
    with torch.no_grad():
        expected = module(x)
        tidal_compile.clear_reports()
        got = compiled(module)(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert f"(1 matrix products for {len(heads)})" in projections_line()
    weights = [p.weight for p in module.projections]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1  # one stack, no second copy
    assert module.other.weight.untyped_storage().data_ptr() != weights[0].untyped_storage().data_ptr()
    with torch.no_grad():  # an in-place update of a parameter reaches the merged product
        weights[-1].mul_(-1)
        torch.testing.assert_close(compiled(module)(x), module(x), rtol=tol, atol=tol)


def test_models_merge_attention_and_mlp_projections_with_the_same_tokens():
    """Llama (no biases) and Qwen2 (q, k, v biases): greedy decode through the compiled model, its
    projections merged, gives the eager model's tokens and logits; a second graph (decode after
    prefill) finds the parameters stacked and adds no copy."""
    for family in ("llama", "qwen2"):
        model = tiny_model(family, layers=2)
        prompt, padding = prompts(2, 8, True)
        tokens, logits = greedy_decode(model, model, prompt, 3, 32, padding=padding)
        attention = model.model.layers[1].self_attn
        tidal_compile.clear_reports()
        got_tokens, got_logits = greedy_decode(compiled(model, mode="full"), model, prompt, 3, 32, padding=padding)
        assert torch.equal(got_tokens, tokens)
        torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
        lines = [line for line in str(tidal_compile.explain()).splitlines() if "projections" in line]
        assert lines == ["  projections merged: gate_proj|up_proj, q_proj|k_proj|v_proj (4 matrix products for 10)"] * 2
        q, k, v = (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
        assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
        assert v.data_ptr() == k.data_ptr() + k.numel() * k.element_size()


def test_merging_switched_off_or_with_gradients_changes_nothing():
    module = Projections(8, [8, 12], bias=True, head=4)
    x = torch.randn(2, 3, 8)
    for options, grad in (({"merge_projections": False}, False), ({}, True)):
        tidal_compile.clear_reports()
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(compiled(module, **options)(x), module(x))
        assert "projections merged" not in projections_line()
        assert len({p.weight.untyped_storage().data_ptr() for p in module.projections}) == 2
    compiled(module)(x).sum().backward()  # gradients reach every parameter
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in module.projections)


def test_a_view_that_flattens_an_output_keeps_its_group_separate():
    class Flattened(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x).view(-1) + self.b(x).view(-1)

    module = Flattened()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        tidal_compile.clear_reports()
        torch.testing.assert_close(compiled(module)(x), module(x))
    assert "projections merged" not in projections_line()


def test_a_parameter_replaced_after_the_compile_is_copied_in_with_a_warning():
    module = Projections(8, [8, 12, 4], bias=False, head=4)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        forward = compiled(module)
        forward(x)
        module.projections[1].weight = torch.nn.Parameter(torch.randn(12, 8))
        with pytest.warns(UserWarning, match="replaced after torch.compile"):
            torch.testing.assert_close(forward(x), module(x))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once
            module.projections[1].weight.mul_(3)  # still its own storage: copied again
            torch.testing.assert_close(forward(x), module(x))
