"""Merge the linear projections that read one input (q|k|v, gate|up) into one matrix product.

A decode step is a chain of matrix-vector products bound by reading the weights; one product
over the stacked weights reads the same bytes in fewer launches, at a higher bandwidth (H200,
Llama-3-8B, batch 1: 4.42 -> 3.89 ms a step for the projections, `benchmarks/projections.py`).

Dynamo hands the backend the parameters as graph inputs. For each group of `linear` calls on
one input whose weights (and biases) are plain tensors of one dtype and device, the pass stacks
them into one tensor, registers it on the graph module (a constant input for Inductor, static
under CUDA graphs) and replaces the calls with one `linear` whose output columns each old call's
users read through `narrow`; once the graph is compiled, `share_storage` points each
parameter's `.data` at its rows of the stack (no second copy of the weights stays; in-place
updates of a parameter, e.g. `load_state_dict`, reach the stack). Parameters already stacked by
an earlier graph are used in place.

Skipped, so nothing changes: graphs traced with grad enabled on weights that require it (the
merged product would not reach the parameters' gradients), tensor subclasses (DTensor shards,
quantized weights), inference tensors, and groups where a user's `view` of an output would not
accept the narrowed columns' strides. A parameter replaced after the compile (another tensor
object or storage, same shape) is caught before each call: its values are copied into the stack
for that call, with a warning to recompile.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor
from torch._dynamo.source import ConstantSource

from tidal_compile.passes.fx_utils import fake_value, is_call, module_path

LINEAR = torch._C._nn.linear
MEMORY_MARGIN = 1 << 30  # bytes of device memory a merge leaves free


@dataclass(frozen=True)
class StackedPart:
    """Rows [start, start + rows) of a stacked tensor that graph input `position` must alias."""

    position: int
    stack: Tensor
    start: int
    rows: int

    def address(self) -> int:
        return self.stack[self.start].data_ptr()


@dataclass
class MergedProjections:
    """What `merge_projections` did to one graph: its groups (module names) and the parameters it
    stacked, which `guard` checks before each call."""

    groups: list[tuple[str, ...]] = field(default_factory=list)
    parts: list[StackedPart] = field(default_factory=list)
    moves: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """(parameter, its rows of a new stack): `share_storage` points the one at the other."""
    no_room: int = 0
    """Groups left separate: the device had no room for a second copy of their weights."""

    def summary(self) -> Optional[str]:
        """One line for the report (None: nothing merged or left out for memory)."""
        kinds = sorted({"|".join(name.rsplit(".", 1)[-1] for name in group) for group in self.groups})
        lines = [f"projections merged: {', '.join(kinds)} ({len(self.groups)} matrix products for "
                 f"{sum(map(len, self.groups))})"] if self.groups else []
        if self.no_room:
            lines.append(f"projections not merged in {self.no_room} group(s): no device memory for a second copy of "
                         f"their weights during the compile")
        return "; ".join(lines) or None

    def share_storage(self) -> None:
        """Point each merged parameter's `.data` at its rows of the new stacks, freeing its own
        storage: after the compile, since AOT fakifies the parameters as Dynamo saw them."""
        for parameter, rows in self.moves:
            parameter.data = rows
        self.moves.clear()

    def guard(self, compiled: Callable) -> Callable:
        """`compiled` (called as Dynamo calls a backend's result, with the graph inputs as
        arguments), checking first that every stacked parameter still aliases its rows."""
        if not self.parts:
            return compiled
        positions = [part.position for part in self.parts]
        addresses = [part.address() for part in self.parts]
        warned = []

        def refresh(args: Sequence[Any]) -> None:
            if [args[i].data_ptr() for i in positions] == addresses:
                return
            for part in self.parts:
                if args[part.position].data_ptr() != part.address():
                    with torch.no_grad():
                        part.stack[part.start:part.start + part.rows].copy_(args[part.position])
            if not warned:
                warned.append(True)
                warnings.warn("tidal: parameters of merged projections were replaced after torch.compile; their "
                              "values are copied into the merged weights before every call: recompile "
                              "(torch._dynamo.reset()) to merge them again, or pass merge_projections=False",
                              stacklevel=3)

        def run(*args: Any) -> Any:
            refresh(args)
            return compiled(*args)

        return run


def merge_projections(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> MergedProjections:
    """Merge the projections of `gm` that share an input (see the module docstring); rewrites
    `gm` in place. The caller compiles `gm`, then calls `share_storage` and `guard`."""
    placeholders = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    merged = MergedProjections()
    for calls in _calls_by_input(gm.graph):
        weights = _inputs(calls, 1, placeholders, example_inputs)
        biases = _inputs(calls, 2, placeholders, example_inputs)
        if weights is None or not _stackable(weights, biases) or not _views_accept_narrowing(calls, weights):
            continue
        if not _room_for([[t for _, t in weights], [t for _, t in biases]]):
            merged.no_room += 1
            continue
        _rewrite(gm, calls, weights, biases, merged)
    if merged.groups:
        gm.graph.lint()
        gm.recompile()
    return merged


def _calls_by_input(graph: fx.Graph) -> list[list[fx.Node]]:
    """Groups of two or more `linear(x, weight[, bias])` calls on one input x, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if is_call(node, LINEAR) and not node.kwargs and len(node.args) in (2, 3):
            groups.setdefault(node.args[0], []).append(node)
    return [calls for calls in groups.values() if len(calls) > 1]


def _inputs(calls: list[fx.Node], index: int, placeholders: dict[fx.Node, int],
            example_inputs: Sequence[Any]) -> Optional[list[tuple[int, Tensor]]]:
    """(graph input position, tensor) of each call's argument `index`: [] when no call has one
    (biases), None when some are not graph inputs holding plain tensors."""
    args = [call.args[index] if len(call.args) > index else None for call in calls]
    if index == 2 and all(arg is None for arg in args):
        return []
    found = []
    for arg in args:
        position = placeholders.get(arg) if isinstance(arg, fx.Node) else None
        value = example_inputs[position] if position is not None else None
        if type(value) not in (Tensor, torch.nn.Parameter) or value.is_inference():
            return None
        found.append((position, value))
    return found


def _stackable(weights: list[tuple[int, Tensor]], biases: Optional[list[tuple[int, Tensor]]]) -> bool:
    """Distinct contiguous 2-D weights (and 1-D biases) of one dtype and device and one input width,
    none needing a gradient in this graph."""
    if biases is None:
        return False
    tensors = [t for _, t in weights + biases]
    first = weights[0][1]
    return (len({id(t) for t in tensors}) == len(tensors)
            and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors)
            and all(w.dim() == 2 and w.shape[1] == first.shape[1] for _, w in weights)
            and all(b.dim() == 1 and b.shape[0] == w.shape[0] for (_, w), (_, b) in zip(weights, biases))
            and first.is_floating_point()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _views_accept_narrowing(calls: list[fx.Node], weights: list[tuple[int, Tensor]]) -> bool:
    """Whether every `view` of a call's output also views its columns of the merged output (a
    view that flattens the last dimension into the others would not): checked on Dynamo's fake
    tensors, as an output of the merged width narrowed."""
    total = sum(w.shape[0] for _, w in weights)
    for call in calls:
        out = fake_value(call)
        if out is None:
            return False
        viewers = [user for user in call.users if is_call(user, "view")]
        if not viewers:
            continue
        with out.fake_mode:
            narrowed = out.new_empty((*out.shape[:-1], total)).narrow(-1, 0, out.shape[-1])
            for user in viewers:
                shape = fx.node.map_arg(user.args[1:], lambda arg: arg.meta.get("example_value"))
                try:
                    narrowed.view(*shape)
                except (RuntimeError, ValueError, TypeError):  # the view is impossible, or its size unknown
                    return False
    return True


def _room_for(kinds: list[list[Tensor]]) -> bool:
    """Whether the device holds a copy of the weights (and biases) not yet stacked, with a
    margin: each stack lives beside its parameters' own storage until `share_storage`."""
    device = kinds[0][0].device
    needed = sum(t.nbytes for tensors in kinds if tensors and not _stacked(tensors) for t in tensors)
    if device.type != "cuda" or not needed:
        return True
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return needed + MEMORY_MARGIN < free + cached


def _stacked(tensors: list[Tensor]) -> bool:
    """Whether `tensors` lie in one storage, one after another (an earlier graph stacked them)."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _stack(tensors: list[Tensor]) -> tuple[Tensor, bool]:
    """One tensor whose rows are `tensors` in order, and whether it is new: a view where they
    already lie so in one storage (an earlier graph stacked them), else a copy."""
    first = tensors[0]
    if _stacked(tensors):
        rows = sum(t.shape[0] for t in tensors)
        return first.detach().as_strided((rows, *first.shape[1:]), (first[0].numel(), *first.stride()[1:])), False
    with torch.inference_mode(False), torch.no_grad():
        return torch.cat([t.detach() for t in tensors]), True


def _rewrite(gm: fx.GraphModule, calls: list[fx.Node], weights: list[tuple[int, Tensor]],
             biases: list[tuple[int, Tensor]], merged: MergedProjections) -> None:
    """One `linear` on the stacked weights (and biases) in place of `calls`, each old output
    its columns of the new one."""
    graph = gm.graph
    index = len(merged.groups)
    names = []
    for tag, inputs in (("weight", weights), ("bias", biases)):
        if not inputs:
            names.append(None)
            continue
        stack, new = _stack([t for _, t in inputs])
        name = f"_tidal_merged_{tag}_{index}"
        gm.register_buffer(name, stack, persistent=False)
        if hasattr(gm, "_param_name_to_source"):  # Dynamo's record of where each lifted constant comes from
            gm._param_name_to_source[name] = ConstantSource(name)
        names.append(name)
        start = 0
        for position, t in inputs:
            merged.parts.append(StackedPart(position, stack, start, t.shape[0]))
            if new:
                merged.moves.append((t, stack[start:start + t.shape[0]]))
            start += t.shape[0]
    with graph.inserting_before(calls[0]):
        weight, bias = (graph.get_attr(name) if name else None for name in names)
        product = graph.call_function(LINEAR, (calls[0].args[0], weight, bias))
        _copy_source(calls[0], product)
        start = 0
        for call, (_, w) in zip(calls, weights):
            columns = graph.call_function(torch.narrow, (product, -1, start, w.shape[0]))
            _copy_source(call, columns)
            call.replace_all_uses_with(columns)
            start += w.shape[0]
    for call in calls:
        graph.erase_node(call)
    merged.groups.append(tuple((module_path(call) or (call.name, None))[0] for call in calls))


def _copy_source(old: fx.Node, new: fx.Node) -> None:
    """Give `new` the module path and stack trace of the call it replaces."""
    new.meta.update({key: old.meta[key] for key in ("nn_module_stack", "stack_trace") if key in old.meta})
