"""Boolean-mask writes as `where`: an Inductor post-grad pass that keeps graphs capturable.

`x[mask] = value` traces to `aten.index_put(x, [mask], value)` with a boolean index. Inductor
refuses to capture a graph holding one in CUDA graphs (the boolean index needs `nonzero`, a host
sync, when captured), so a single such write turns `mode="reduce-overhead"` off for the whole
graph. Transformers' tensor parallelism puts two in every decode step: the vocabulary-sharded
embedding masks the token ids outside its shard and zeroes their rows. When `mask` covers the
leading dimensions of `x` and `value` is one element, the write is `where(mask, value, x)`: the
same result, no host sync, capturable.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._guards import detect_fake_mode
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

from tidal_compile.passes.fx_utils import fake_value

aten = torch.ops.aten
INDEX_PUTS = (aten.index_put.default, aten._unsafe_index_put.default)


def _scalar_constant(node: Any) -> Optional[Any]:
    """The Python number a one-element graph constant holds (through copies of it), if `node` is one."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
            aten.lift_fresh_copy.default, aten.clone.default):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    owner = node.graph.owning_module
    constant = getattr(owner, node.target, None) if owner is not None else None
    if isinstance(constant, torch.Tensor) and constant.numel() == 1 and constant.device.type != "meta":
        return constant.item()
    return None


def _where_of(node: fx.Node) -> Optional[tuple[fx.Node, Any, bool]]:
    """(mask, value, value_is_node) when `node` is `index_put(x, [mask], value)` with a boolean
    mask over x's leading dimensions and a one-element value; else None."""
    if node.op != "call_function" or node.target not in INDEX_PUTS:
        return None
    x, indices, value = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate or len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return None
    mask, x_val, mask_val, value_val = indices[0], fake_value(x), fake_value(indices[0]), fake_value(value)
    if x_val is None or mask_val is None or value_val is None or mask_val.dtype != torch.bool:
        return None
    leading = x_val.shape[:mask_val.dim()]
    if len(leading) != mask_val.dim() or not all(statically_known_true(m == n) for m, n in zip(mask_val.shape, leading)):
        return None
    if not statically_known_true(value_val.numel() == 1):
        return None
    scalar = _scalar_constant(value)
    if scalar is not None:
        return mask, scalar, False
    if value_val.device == x_val.device:
        return mask, value, True
    return None


def _python_number(value: Any, dtype: torch.dtype) -> Any:
    """`value` as the Python number `index_put` would store into a tensor of `dtype`."""
    if dtype == torch.bool:
        return bool(value)
    if dtype.is_complex:
        return complex(value)
    return float(value) if dtype.is_floating_point else int(value)  # int() truncates, as the store does


def _call(graph: fx.Graph, target: Any, *args: Any) -> fx.Node:
    """A new node `target(*args)` with its fake value, as later Inductor passes expect."""
    node = graph.call_function(target, args)
    fake_args = [fake_value(a) if isinstance(a, fx.Node) else a for a in args]
    with detect_fake_mode(fake_args) or contextlib.nullcontext():
        node.meta["val"] = target(*fake_args)
    return node


def rewrite_masked_index_put(graph: fx.Graph) -> int:
    """Replace every boolean-mask `index_put` of one value over leading dimensions with `where`;
    returns how many were replaced."""
    replaced = 0
    for node in list(graph.nodes):
        found = _where_of(node)
        if found is None:
            continue
        mask, value, value_is_node = found
        x = node.args[0]
        x_val, mask_val = fake_value(x), fake_value(mask)
        with graph.inserting_before(node):
            for _ in range(x_val.dim() - mask_val.dim()):  # the mask's trailing size-1 dimensions
                mask = _call(graph, aten.unsqueeze.default, mask, -1)
            if value_is_node:
                value = _call(graph, torch.ops.prims.convert_element_type.default, value, x_val.dtype)
                where = _call(graph, aten.where.self, mask, _call(graph, aten.squeeze.default, value), x)
            else:
                where = _call(graph, aten.where.ScalarSelf, mask, _python_number(value, x_val.dtype), x)
        node.replace_all_uses_with(where)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        counters["tidal"]["masked_index_put_to_where"] += replaced
    return replaced


class MaskedFillAsWhere(CustomGraphPass):
    """The pass as Inductor's `post_grad_custom_pre_pass` (running `then`, a pass already
    configured there, afterwards)."""

    def __init__(self, then: Optional[Callable[[fx.Graph], None]] = None) -> None:
        self.then = then

    def __call__(self, graph: fx.Graph) -> None:
        rewrite_masked_index_put(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        """This file's hash and `then`'s uuid; None (no caching, as Inductor does) when `then` has none."""
        if self.then is None:
            return get_hash_for_files((__file__,))
        then = self.then.uuid() if isinstance(self.then, CustomGraphPass) else None
        return None if then is None else (get_hash_for_files((__file__,)), then)
