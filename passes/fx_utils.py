"""Small FX helpers shared by the tidal passes."""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# The public SDPA signature (torch.nn.functional.scaled_dot_product_attention and its ATen op).
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

PUBLIC_SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
# Fused ATen SDPA variants that return a tuple whose element 0 is the attention output.
FUSED_SDPA_TARGETS = tuple(
    getattr(aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
    if hasattr(aten, name))


def is_sdpa(node: fx.Node) -> bool:
    """Whether `node` computes scaled-dot-product attention in any form we recognise."""
    return node.op == "call_function" and node.target in PUBLIC_SDPA_TARGETS + FUSED_SDPA_TARGETS


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The SDPA call's arguments by public-SDPA name (fused ops' `attn_bias` becomes `attn_mask`)."""
    if node.target in PUBLIC_SDPA_TARGETS:
        bound = dict(zip(_SDPA_PARAMS, node.args))
        bound.update(node.kwargs)
    else:
        schema_names = [a.name for a in node.target._schema.arguments]
        bound = dict(zip(schema_names, node.args))
        bound.update(node.kwargs)
        if "attn_bias" in bound:
            bound["attn_mask"] = bound.pop("attn_bias")
    return {**_SDPA_DEFAULTS, **bound}


def fake_value(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo or AOT recorded for a node, if any."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def module_path(node: fx.Node) -> Optional[tuple[str, Optional[type]]]:
    """Qualified path and class of the innermost module that called `node`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)  # "layers[3]" -> "layers.3"
    return path, cls if isinstance(cls, type) else None


def layer_index(path: str) -> Optional[int]:
    """The decoder layer number in a module path: the last integer component."""
    numbers = [int(part) for part in path.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def model_family(cls: Optional[type]) -> Optional[str]:
    """Hugging Face model family of a module class ("llama" for transformers.models.llama.*)."""
    if cls is None:
        return None
    match = re.match(r"transformers\.models\.([a-z0-9_]+)\.", cls.__module__)
    return match.group(1) if match else None


def is_call(node: Any, *targets: Any) -> bool:
    """Whether `node` calls one of `targets` (functions, ATen overloads or method names)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in targets
    return node.op == "call_function" and node.target in targets


def is_getitem(node: Any) -> bool:
    return is_call(node, operator.getitem)


def erase_if_unused(*nodes: Any) -> None:
    """Erase those of `nodes` that nothing uses any more and, transitively, their inputs that only
    they used, if they are pure views (each node at most once, though several may share inputs)."""
    pending = [n for n in nodes if isinstance(n, fx.Node)]
    erased: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op not in ("call_function", "call_method") or not _is_pure_view(node):
            continue
        pending.extend(node.all_input_nodes)
        node.graph.erase_node(node)
        erased.add(node)


_VIEW_METHODS = ("expand", "reshape", "view", "unsqueeze", "contiguous")
_VIEW_FUNCTIONS = (torch.reshape, torch.unsqueeze, aten.expand.default, aten.view.default,
                   aten.reshape.default, aten.unsqueeze.default, aten._unsafe_view.default,
                   aten.clone.default, operator.getitem)


def _is_pure_view(node: fx.Node) -> bool:
    return is_call(node, *_VIEW_METHODS) or is_call(node, *_VIEW_FUNCTIONS)


def known_equal(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or SymInts) are provably equal, without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def specialized(value: Any) -> Optional[float]:
    """A number the kernels need as a constant (a head count, the scale), as a plain int / float:
    a symbolic one (torch.compile(dynamic=True)) is specialised to its traced value, which adds a
    guard (another value recompiles). None when `value` is no number."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val", value.meta.get("example_value"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, torch.SymFloat):
        return float(value)
    return None


def same_shape(shape: Any, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(known_equal(a, b) for a, b in zip(shape, expected))


def static_shape(node: Any) -> Optional[tuple[int, ...]]:
    """The node's tensor shape if every dimension is a plain int, else None."""
    value = fake_value(node)
    if value is None or not all(isinstance(size, int) for size in value.shape):
        return None
    return tuple(value.shape)
