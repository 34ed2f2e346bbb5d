"""Decode steps captured whole in one CUDA graph: `compile_for_generation(..., step_graphs=True)`.

With `cudagraphs=True` Inductor replays its graphs from CUDA graphs, but every step still takes
the host's path to them: Python, Dynamo's guards, the CUDA-graph tree's checks. On the H200
that path was 0.7-1.4 ms of an 11 ms step, for full attention as for tidal
(`benchmarks/decode.py --step-graph`, docs/benchmarks.md). A `StepGraph` runs the first decode
step of a cache as it is (the warm-up), captures the compiled forward of the next ones in one
CUDA graph, and replays it: each step copies its tensor arguments into the graph's buffers,
replays, and returns the outputs copied out of the graph's memory.

What one graph can replay is checked, not assumed:
- a new cache, other tensor shapes or dtypes, other plain arguments, or a cache tensor that
  moved (a cache re-allocated or reordered, as beam search does) make a new capture;
- a step that changes the cache's host-side state (a Python counter, as transformers'
  sliding-window layers keep) cannot be replayed: that cache decodes with the compiled forward,
  with a `TidalFallbackWarning`, as does a step that cannot be captured (one that syncs with
  the host);
- generate's 2-D padding mask grows by one column a step: it is copied into a buffer as long
  as the cache (zero at first, as transformers pads it itself; a column past the step's mask lies
  past the query, which the causal mask hides whatever it holds), so one graph serves the whole
  sequence, and the next one on the same cache after `reset()`.
Dynamo's guards are evaluated when a step is captured, not at each replay: what they guard
(the model's attributes, the compile's options) must not change while a sequence decodes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from tidal_compile.backend import TidalFallbackWarning

Replay = Callable[[], Any]
"""Runs the captured step again and returns its outputs (in the graph's memory)."""

Tensors = dict[tuple[str, ...], Tensor]
"""A call's tensor arguments by path: (name,), or (name, key) inside a dict argument."""

PADDED_MASK = "attention_mask"
"""The argument padded to the cache's length (when it is a 2-D padding mask)."""

RECAPTURES_BEFORE_WARNING = 3


def capture_cuda_graph(step: Callable[[], Any]) -> Replay:
    """`step` captured in one CUDA graph; the returned function replays it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay() -> Any:
        graph.replay()
        return outputs

    return replay


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Work before a capture runs on a side stream (as torch.cuda.graphs asks), joined after."""
    if device.type != "cuda":
        yield
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def _copied(outputs: Any) -> Any:
    """`outputs` (a ModelOutput, tuple, list or tensor) with every tensor cloned, so that the next
    replay does not overwrite what the caller holds."""
    if isinstance(outputs, Tensor):
        return outputs.clone()
    if isinstance(outputs, dict):  # transformers' ModelOutput is an ordered dict of its set fields
        return type(outputs)(**{key: _copied(value) for key, value in outputs.items()})
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_copied(value) for value in outputs)
    return outputs


def _tensor_arguments(call: dict[str, Any]) -> Tensors:
    """The call's tensors by path: (name,) for a tensor argument, (name, key) for the tensors of a
    dict argument (transformers passes one mask per attention type as a dict)."""
    tensors: Tensors = {}
    for name, value in call.items():
        if isinstance(value, Tensor):
            tensors[(name,)] = value
        elif isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            tensors.update({(name, key): v for key, v in value.items()})
    return tensors


def _with_tensors(call: dict[str, Any], tensors: Tensors) -> dict[str, Any]:
    """`call` with its tensors replaced by `tensors` (paths as `_tensor_arguments` gives them)."""
    replaced = dict(call)
    for path, tensor in tensors.items():
        if len(path) == 1:
            replaced[path[0]] = tensor
        else:
            replaced[path[0]] = {**replaced[path[0]], path[1]: tensor}
    return replaced


def _holders(cache: Any) -> list[Any]:
    """The cache and its layers: the objects whose attributes a step reads and writes."""
    return [cache, *getattr(cache, "layers", ())]


def _cache_tensor_slots(cache: Any) -> list[tuple[dict[str, Any], str]]:
    """Where the cache keeps its tensors: (attribute dict, name) of each, to read their addresses
    fast before every replay."""
    return [(vars(holder), name) for holder in _holders(cache)
            for name, value in vars(holder).items() if isinstance(value, Tensor)]


def host_state(cache: Any) -> list[dict[str, Any]]:
    """The cache's and its layers' attributes that are not tensors (tidal's own `sequence`
    bookkeeping left out): a CUDA graph replays tensor work only, so a decode step must not
    change these."""
    return [{key: copy.copy(value) if isinstance(value, (list, dict, set)) else value  # in-place growth shows too
             for key, value in vars(holder).items() if not isinstance(value, Tensor) and key != "sequence"}
            for holder in _holders(cache)]


def _changed(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """Names of the host-side attributes that differ between two `host_state` snapshots."""
    changed = []
    for old, new in zip(before, after):
        for key in sorted(old.keys() | new.keys()):
            try:
                same = bool(old.get(key) == new.get(key))
            except Exception:  # values without a plain equality
                same = old.get(key) is new.get(key)
            if not same:
                changed.append(key)
    return changed


class StepGraph:
    """A decode-step forward replayed from one CUDA graph per cache and call signature (see the
    module docstring). `forward` is the compiled model forward (without Inductor's CUDA graphs);
    `capture` turns a step into its replay (tests pass one that runs on the CPU)."""

    _cache: Optional[weakref.ref]
    _signature: Optional[tuple]
    _slots: list[tuple[dict[str, Any], str]]
    _addresses: list[int]
    _buffers: Tensors
    _padded: set[tuple[str, ...]]
    _replay: Optional[Replay]

    def __init__(self, forward: Callable[..., Any],
                 capture: Callable[[Callable[[], Any]], Replay] = capture_cuda_graph):
        self.forward = forward
        self.capture = capture
        self.captures = 0
        """Steps captured so far (a new cache or call signature each)."""
        self.fallback: Optional[str] = None
        """Why the latest sequence decodes without the graph (None while it replays)."""
        self._recaptures = 0
        self.release()

    def describe(self) -> str:
        """One line for `tidal_compile.explain`: how the decode steps are launched."""
        if self.fallback:
            return f"step_graphs: the latest sequence decoded with the compiled forward: {self.fallback}"
        if not self.captures:
            return "step_graphs: on; no decode step captured yet (a sequence's second decode step is the first)"
        return (f"step_graphs: decode steps replayed from one CUDA graph per sequence ({self.captures} "
                f"capture{'s' if self.captures > 1 else ''} so far)")

    def release(self) -> None:
        """Drop the captured graph, its buffers and outputs (which hold the cache): `generate`
        calls this when it returns; a later step captures anew."""
        self._cache = self._signature = self._replay = None
        self._slots, self._addresses, self._buffers, self._padded = [], [], {}, set()

    def __call__(self, call: dict[str, Any], cache: Any) -> Any:
        """Run one decode step: `call` are the forward's arguments by name, `cache` the TidalCache
        among them."""
        tensors = _tensor_arguments(call)
        if (self._cache is None or self._cache() is not cache
                or self._signature_of(call, tensors, cache) != self._signature
                or [slot[name].data_ptr() for slot, name in self._slots] != self._addresses):
            return self._start(call, tensors, cache)
        if self._replay is None:  # this cache's steps cannot be replayed (warned at its start)
            return self.forward(**call)
        self._load(tensors)
        return _copied(self._replay())

    def _signature_of(self, call: dict[str, Any], tensors: Tensors, cache: Any) -> tuple:
        """What a captured step depends on besides tensor values and the cache's tensors: grad
        mode, each tensor's shape and dtype (a padded mask: its batch only), the plain
        arguments' values (`tensors`: the call's, from `_tensor_arguments`)."""
        parts: list[Any] = [torch.is_grad_enabled()]
        for path, value in tensors.items():
            shape = value.shape[:1] if self._pads(path, value, cache) else value.shape
            parts.append((path, tuple(shape), value.dtype, value.device))
        held = {path[0] for path in tensors}
        for name, value in call.items():
            if name in held:
                continue
            if value is cache:
                parts.append((name, "cache"))
                continue
            try:
                hash(value)
                parts.append((name, value))
            except TypeError:
                parts.append((name, id(value)))
        return tuple(parts)

    @staticmethod
    def _pads(path: tuple[str, ...], value: Tensor, cache: Any) -> bool:
        return path == (PADDED_MASK,) and value.dim() == 2 and value.shape[1] <= cache.capacity

    def _start(self, call: dict[str, Any], tensors: Tensors, cache: Any) -> Any:
        """The first step of a cache or signature: run it (the warm-up), then capture the step
        for the next ones, unless it changed the cache's host state or cannot be captured."""
        self._count_recapture(cache)
        self.fallback = None
        self._cache, self._signature, self._replay = weakref.ref(cache), self._signature_of(call, tensors, cache), None
        self._slots = _cache_tensor_slots(cache)
        self._addresses = [slot[name].data_ptr() for slot, name in self._slots]
        self._padded = {path for path, value in tensors.items() if self._pads(path, value, cache)}
        self._buffers = {path: (torch.zeros(value.shape[0], cache.capacity, dtype=value.dtype, device=value.device)
                                if path in self._padded else torch.empty_like(value))
                         for path, value in tensors.items()}
        self._load(tensors)
        static_call = _with_tensors(call, self._buffers)
        device = next(iter(self._buffers.values())).device
        before = host_state(cache)
        with side_stream(device):
            outputs = self.forward(**static_call)
        changed = _changed(before, host_state(cache))
        if changed:
            self._fall_back(f"a decode step changes the cache's host-side state ({', '.join(changed)}), which a "
                            "CUDA graph does not replay")
            return outputs
        try:
            self._replay = self.capture(lambda: self.forward(**static_call))
        except Exception as error:  # a step that syncs with the host, or an op that cannot be captured
            self._fall_back(f"the compiled decode step cannot be captured in one CUDA graph ({error})")
            return outputs
        self.captures += 1
        return outputs

    def _count_recapture(self, cache: Any) -> None:
        """Warn when one sequence keeps needing new captures (each costs a step's host time)."""
        if self._cache is None or self._cache() is not cache:
            self._recaptures = 0
            return
        self._recaptures += 1
        if self._recaptures == RECAPTURES_BEFORE_WARNING:
            warnings.warn(f"tidal: step_graphs captured this sequence's decode step anew {RECAPTURES_BEFORE_WARNING} "
                          "times (its arguments' shapes or values, or the cache's tensors, keep changing): each "
                          "capture costs a step's host time, so step_graphs gains nothing here", TidalFallbackWarning,
                          stacklevel=5)

    def _fall_back(self, reason: str) -> None:
        self._buffers, self._replay, self.fallback = {}, None, reason
        warnings.warn(f"tidal: step_graphs: {reason}; this sequence decodes with the compiled forward, as without "
                      "step_graphs", TidalFallbackWarning, stacklevel=5)

    def _load(self, tensors: Tensors) -> None:
        """Copy this step's tensor arguments (`_tensor_arguments`) into the captured graph's
        buffers (of the padded mask, this step's columns: the columns past them lie past the
        query, masked whatever they hold)."""
        for path, buffer in self._buffers.items():
            value = tensors[path]
            (buffer[:, :value.shape[1]] if path in self._padded else buffer).copy_(value)
