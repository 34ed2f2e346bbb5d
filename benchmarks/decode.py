"""End-to-end decode latency at full depth: the model as users compile it today (Inductor) against
the tidal backend's modes, side by side in one process, with where each step's time goes.

    python benchmarks/decode.py --quick                                  # < 3 minutes
    python benchmarks/decode.py --shapes llama3-8b --batches 1 --contexts 131072 --out decode.json
    python benchmarks/decode.py                                          # every shape, batch, context

Models are random-initialised at the real shapes of Llama-2-7B, Llama-3-8B and Qwen2-7B, every
layer (bf16, HF SDPA attention). For each shape, batch and context, every method compiles
`model.forward` with CUDA graphs (Inductor `mode="reduce-overhead"`; tidal `cudagraphs=True`), the
KV cache (a TidalCache; Quest pages for quest) is filled by hand with random K/V through the
cache's own `update` (which also moves its length: the static cache writes at, and masks up to,
its own length), then `--steps` greedy decode steps are timed with CUDA events after `--warmup`
ones (median), and a few more run under the profiler. The floor is the same model at a 1K context.

Per row: ms per step; speed-up over inductor and over full (and over full by kernel time alone:
the host's share of a step varies from run to run); the ceiling of those two speed-ups (the
step at the floor less its KV reads, plus the method's KV bytes, at the copy bandwidth); attention
time (step minus the floor)
against the time to read the KV bytes the method must read at the measured copy bandwidth;
kernel time per step from the profiler split into weights (matrix products), attention,
selection (top-k, Quest page scores) and other kernels, and the launches a step (the JSON has
each kernel's time and launches); the step time outside kernels, and the GPU's idle gaps between
kernels (short: kernel to kernel; long: waiting for the host).
Methods: inductor, inductor+where (Inductor with tidal's boolean-mask-as-`where` pass, which keeps
tensor-parallel graphs capturable in CUDA graphs: benchmarks/decode_tp.py), full, tidal:K, quest:K,
topk_oracle:K (K the budget). Each row counts the graphs Inductor did not capture.
`--step-graph also|only` times each row a second way (rows METHOD+graph): compiled without CUDA
graphs, the whole step then captured in one CUDA graph by hand and replayed, so no Python, Dynamo
guards or CUDA-graph tree run between steps: how much of a step the host's share is.
`--separate-projections also|only` runs the backend's rows with `merge_projections=False` too
(rows METHOD+separate, compared with the +separate full rows): what merging q|k|v and gate|up
into one product each saves. Plain Inductor rows keep the model's separate products. Plots:
`python benchmarks/plot_decode.py results.json`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import transformers
import triton
from torch._dynamo.utils import counters
from torch._inductor import list_mode_options
from torch.autograd import DeviceType
from tqdm import tqdm

import tidal_compile
from tidal_compile import TidalCache, TidalConfig, hf_compat
from tidal_compile.passes.masked_fill import MaskedFillAsWhere
from tidal_compile.step_graph import capture_cuda_graph, side_stream
from attention import copy_bandwidth  # benchmarks/attention.py, beside this script
from decode_table import CAPTURED as STEP_GRAPH  # rows captured whole: one suffix for both scripts
from decode_table import METHODS  # the methods a full sweep runs, the table's columns

FLOOR_CONTEXT = 1024
HEAD_DIM = 128


@dataclass(frozen=True)
class Shape:
    """A model shape: the config of its family at real size, every layer."""

    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    long_context: int  # the longest context benchmarked

    def config(self, max_positions: int) -> Any:
        cls = transformers.Qwen2Config if self.family == "qwen2" else transformers.LlamaConfig
        return cls(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                   num_hidden_layers=self.layers, num_attention_heads=self.heads,
                   num_key_value_heads=self.kv_heads, head_dim=HEAD_DIM, rope_theta=self.rope_theta,
                   max_position_embeddings=max_positions, attn_implementation="sdpa")

    def kv_bytes(self, batch: int, context: int, layers: Optional[int] = None) -> int:
        """Bytes of K and V (bf16) of `layers` (default all) layers at this batch and context."""
        return 2 * (self.layers if layers is None else layers) * batch * self.kv_heads * context * HEAD_DIM * 2


SHAPES = {
    "llama2-7b": Shape("llama", 32, 4096, 11008, 32, 32, 32000, 10000.0, 102400),
    "llama3-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128256, 500000.0, 131072),
    "qwen2-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 152064, 1000000.0, 131072),
}


@dataclass(frozen=True)
class Method:
    """A baseline (`inductor`, `inductor+where`), or a tidal mode with its budget (`tidal:256`)."""

    name: str

    @property
    def mode(self) -> str:
        return self.name.split(":")[0]

    @property
    def budget(self) -> int:
        return int(self.name.split(":")[1]) if ":" in self.name else 256

    def config(self) -> TidalConfig:
        return TidalConfig.load(mode=self.mode, budget=self.budget)

    def options(self, cudagraphs: bool = True, merge: bool = True) -> Optional[dict[str, Any]]:
        """Backend options (None: plain Inductor)."""
        return None if self.is_baseline else {"config": self.config(), "cudagraphs": cudagraphs,
                                               "merge_projections": merge}

    @property
    def file_name(self) -> str:
        """The method's name as a file name (`tidal_256`)."""
        return self.name.replace(":", "_").replace("+", "_")

    @property
    def is_baseline(self) -> bool:
        return self.mode in BASELINES

    def compiling(self) -> contextlib.AbstractContextManager:
        """The Inductor settings a baseline compiles under."""
        if self.mode == "inductor+where":
            return torch._inductor.config.patch(post_grad_custom_pre_pass=MaskedFillAsWhere())
        return contextlib.nullcontext()

    def page_size(self) -> Optional[int]:
        return TidalConfig().page_size if self.mode == "quest" else None

    def attention_bytes(self, shape: Shape, batch: int, context: int) -> int:
        """KV-cache bytes one decode step must read (page metadata included for Quest)."""
        if self.is_baseline or self.mode in ("full", "topk_oracle"):
            return shape.kv_bytes(batch, context)
        config = self.config().resolve(shape.layers)
        full_layers = len(config.dense_layers) + (len(config.selection_layers) if self.mode == "tidal" else 0)
        sparse_layers = shape.layers - full_layers
        rows = batch * shape.heads * min(self.budget, context)  # query_head: each query head reads its own rows
        sparse = 2 * sparse_layers * rows * HEAD_DIM * 2
        if self.mode == "quest":
            pages = -(-context // config.config.page_size)
            sparse += 2 * sparse_layers * batch * shape.kv_heads * pages * HEAD_DIM * 2
        return shape.kv_bytes(batch, context, full_layers) + sparse


BASELINES = ("inductor", "inductor+where")
SEPARATE = "+separate"
"""Suffix of the rows compiled with `merge_projections=False` (q, k, v, gate and up as separate products)."""
STEP_GRAPH_WARMUP = 2  # steps run before the capture (on a side stream, as torch.cuda.graph asks)
GUARD_FILTERS = {"nn-modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
"""`--guard-filter` choices: Dynamo guards dropped (torch's own unsafe filters)."""
QUICK = dict(shapes=["llama3-8b"], batches=[1], contexts=[32768], methods=["inductor", "full", "tidal:256"],
             floor_methods=[], steps=10, warmup=3, profile_steps=2)  # three compiles of ~40-60 s each


# ------------------------------------------------------------------------------- kernel time

WEIGHT_KERNELS = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk", "triton_tem", "matmul")
SELECTION_KERNELS = ("radix_", "quest_scores")
COMMUNICATION_KERNELS = ("nccl", "allreduce", "all_reduce", "cross_device")
ATTENTION_KERNELS = ("flash_decode", "sparse_decode", "combine_splits", "mask_", "flash",
                     "fmha", "attention", "efficient")


def kernel_category(name: str) -> str:
    """weights | communication | selection | attention | other, from a GPU kernel's name."""
    lowered = name.lower()
    for category, markers in (("weights", WEIGHT_KERNELS), ("communication", COMMUNICATION_KERNELS),
                              ("selection", SELECTION_KERNELS), ("attention", ATTENTION_KERNELS)):
        if any(marker in lowered for marker in markers):
            return category
    return "other"


GAP_LONG_US = 20.0  # an idle gap at least this long between kernels: the GPU waits for the host


def gaps_between(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The idle stretches (start, end) between `intervals` ((start, end), in any order; overlapping
    ones merge)."""
    gaps, busy_until = [], None
    for start, end in sorted(intervals):
        if busy_until is not None and start > busy_until:
            gaps.append((busy_until, start))
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def idle_gaps(intervals: list[tuple[float, float]], steps: int) -> dict[str, float]:
    """The GPU's idle time between the kernels of `intervals` ((start, end) in us) per step, in
    ms: short gaps (kernel to kernel: launch latency, graph nodes) and long ones (at least
    GAP_LONG_US: the GPU waiting for the host), and the longest gap. The wait before the first
    kernel is not seen, so `steps` steps show `steps` - 1 of the waits between steps."""
    lengths = [end - start for start, end in gaps_between(intervals)]
    long = sum(gap for gap in lengths if gap >= GAP_LONG_US)
    return dict(short_ms=(sum(lengths) - long) / 1e3 / steps, long_ms=long / 1e3 / steps,
                longest_ms=max(lengths, default=0.0) / 1e3)


def profile_kernels(step: Callable[[], None], steps: int, trace: Optional[str] = None) -> dict[str, Any]:
    """`kernel_summary` of `steps` profiled steps; with `trace`, host activity too, written there
    as a Chrome trace (`.json.gz`: compressed)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    if trace:
        prof.export_chrome_trace(trace)
    return kernel_summary([(event.name, event.time_range.start, event.time_range.end) for event in prof.events()
                           if event.device_type == DeviceType.CUDA], steps)


def kernel_summary(kernels: list[tuple[str, float, float]], steps: int) -> dict[str, Any]:
    """From the GPU kernels (name, start, end in us) of `steps` steps: kernel time per step (ms) by
    category, every kernel's time and launches per step (longest first), launches per step and the
    idle gaps between kernels (`idle_gaps`)."""
    by_category = dict.fromkeys(("weights", "attention", "selection", "communication", "other"), 0.0)
    by_name: dict[str, dict[str, Any]] = {}
    for name, start, end in kernels:
        ms = (end - start) / 1e3 / steps
        by_category[kernel_category(name)] += ms
        entry = by_name.setdefault(name[:120], dict(name=name[:120], ms=0.0, launches=0.0))
        entry["ms"] += ms
        entry["launches"] += 1 / steps
    return dict(kernel_ms=sum(by_category.values()), categories=by_category, launches=len(kernels) / steps,
                kernels=sorted(by_name.values(), key=lambda entry: -entry["ms"]),
                gaps=idle_gaps([(start, end) for _, start, end in kernels], steps))


# ------------------------------------------------------------------------------- one row


@dataclass
class Row:
    shape: str
    batch: int
    context: int
    method: str
    ms: float  # median of synced steps (each waits for the GPU, as generate's stop check does)
    compile_s: float
    attention_bytes: int
    kernel_ms: float
    categories: dict[str, float]
    kernels: list[dict[str, Any]]  # each kernel's name, ms and launches per step, longest first
    launches: float = 0.0  # kernel launches per step
    pipelined_ms: Optional[float] = None  # pipelined_step_ms: steps issued back to back
    gaps: dict[str, float] = field(default_factory=dict)  # idle_gaps of the profiled steps
    cudagraph_skips: int = 0  # graphs Inductor ran without CUDA graphs
    floor: bool = False
    speedup_vs_inductor: Optional[float] = None
    speedup_vs_full: Optional[float] = None
    kernel_speedup_vs_full: Optional[float] = None  # by GPU kernel time alone (the host's share varies run to run)
    pipelined_speedup_vs_full: Optional[float] = None  # by pipelined steps (the host ahead of the GPU)
    attention_ms: Optional[float] = None
    read_ms: Optional[float] = None  # attention_bytes at the copy bandwidth
    # The speed-ups this method would reach with its step at the floor without the floor's own KV
    # reads, plus read_ms (its attention at the copy bandwidth), against the other methods as measured
    ceiling_vs_inductor: Optional[float] = None
    ceiling_vs_full: Optional[float] = None

    @property
    def outside_ms(self) -> float:
        return self.ms - self.kernel_ms


def build_model(shape: Shape, max_positions: int) -> torch.nn.Module:
    config = shape.config(max_positions)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def filled_cache(model: torch.nn.Module, batch: int, context: int, capacity: int, page_size: Optional[int],
                 kv_heads: int) -> TidalCache:
    """A TidalCache holding `context` random positions of `kv_heads` heads per layer, written through
    `Cache.update` (so its length, where the next token is written and up to where the mask
    reaches, is `context`)."""
    config = model.config
    cache = TidalCache(config, max_cache_len=capacity, page_size=page_size)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for layer in range(config.num_hidden_layers):
        k, v = (torch.randn(batch, kv_heads, context, HEAD_DIM, device="cuda",
                            dtype=torch.bfloat16, generator=generator) for _ in range(2))
        cache.update(k, v, layer)
        del k, v
    return cache


@torch.no_grad()
def measure(model: torch.nn.Module, method: Method, shape_name: str, shape: Shape, batch: int, context: int,
            steps: int, warmup: int, profile_steps: int, kv_heads: Optional[int] = None,
            trace: Optional[str] = None, skip_guard_eval: bool = False, guard_filter: Optional[str] = None,
            inductor_config: Optional[dict[str, Any]] = None, step_graph: bool = False, merge: bool = True) -> Row:
    """Compile `model.forward` for `method`, fill a cache to `context`, time and profile decode steps
    (`kv_heads`: the KV heads a rank holds, under tensor parallelism; `trace`: a Chrome trace file of
    the profiled steps; `skip_guard_eval`: time the steps after the compile with Dynamo's guards
    off, `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, to measure what guards cost;
    `guard_filter`: a key of GUARD_FILTERS, the guards Dynamo keeps; `inductor_config`: Inductor
    config patches for every method, the tidal backend's `inductor` option; `step_graph`: compile
    without CUDA graphs, then capture the whole step (forward, argmax, next position) in one
    CUDA graph by hand and time its replays: what a step costs with no Python, guards or graph
    tree around the kernels; `merge`: the backend's merge_projections)."""
    torch._dynamo.reset()
    options = method.options(cudagraphs=not step_graph, merge=merge)
    guards = {"guard_filter_fn": GUARD_FILTERS[guard_filter]} if guard_filter else {}
    patches = inductor_config or {}
    if options is not None:
        forward = torch.compile(model.forward, backend="tidal", options={**options, "inductor": patches, **guards})
    else:  # mode="reduce-overhead" as its options (torch.compile takes no options beside a mode)
        mode_options = {} if step_graph else list_mode_options("reduce-overhead")
        forward = torch.compile(model.forward, options={**mode_options, **patches, **guards})
    capacity = context + warmup + 2 * steps + profile_steps + 1 + (STEP_GRAPH_WARMUP if step_graph else 0)
    cache = filled_cache(model, batch, context, capacity, method.page_size(), kv_heads or shape.kv_heads)
    cache_name = hf_compat.forward_cache_name(model.forward)
    token = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    positions = torch.full((batch, 1), context, dtype=torch.long, device="cuda")

    def step() -> None:  # static inputs, updated in place: the same step can be captured and replayed
        out = forward(input_ids=token, position_ids=positions, use_cache=True, **{cache_name: cache})
        torch.argmax(out.logits[:, -1:], -1, out=token)
        positions.add_(1)

    skips_before = counters["inductor"]["cudagraph_skips"]
    started = time.perf_counter()
    with method.compiling():
        step()  # compiles
        if step_graph:
            step = captured(step, STEP_GRAPH_WARMUP)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip_guard_eval else contextlib.nullcontext()
    with stance:
        times = synced_step_times(step, warmup + steps)[warmup:]
        pipelined_ms = pipelined_step_ms(step, steps)
        kernels = profile_kernels(step, profile_steps, trace)
    row = Row(shape=shape_name, batch=batch, context=context, method=method.name, ms=statistics.median(times),
              pipelined_ms=pipelined_ms, compile_s=compile_s,
              attention_bytes=method.attention_bytes(shape, batch, context),
              floor=context == FLOOR_CONTEXT, cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before,
              **kernels)
    del forward, cache, step  # a captured step holds its graph's memory pool
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return row


def synced_step_times(step: Callable[[], None], steps: int) -> list[float]:
    """ms of each of `steps` steps, each timed by its own pair of events and waited for (as
    generate's per-token stop check waits)."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def pipelined_step_ms(step: Callable[[], None], steps: int) -> float:
    """ms a step over `steps` steps issued back to back (one pair of events, no sync between
    steps): the host prepares the next step while the GPU runs this one, so what a step's own
    launch costs before its first kernel (a graph's launch, guards, Python) is hidden unless the
    host is slower than the GPU. The synced step (`measure`'s, as generate's per-token stop check
    syncs) minus this one is that launch latency."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def captured(step: Callable[[], None], warmup: int) -> Callable[[], None]:
    """`step` captured in one CUDA graph (after `warmup` runs on a side stream); returns its replay.
    Every kernel of the step must be capturable: a step that syncs with the host (a graph break
    reading a tensor's value) cannot be, and says so."""
    with side_stream(torch.device("cuda")):
        for _ in range(warmup):
            step()
    try:
        return capture_cuda_graph(step)
    except RuntimeError as error:
        raise RuntimeError(f"the compiled decode step cannot be captured in one CUDA graph: {error}") from error


def fits(shape: Shape, batch: int, context: int, methods: list[Method]) -> bool:
    """Whether weights, the KV cache, Quest pages and Inductor's expanded K/V of one layer fit."""
    weights = 2 * (shape.layers * (4 * shape.hidden * shape.hidden + 3 * shape.hidden * shape.intermediate)
                   + 2 * shape.vocab * shape.hidden)
    expanded = 2 * batch * shape.heads * context * HEAD_DIM * 2 if any(m.is_baseline for m in methods) else 0
    need = weights + shape.kv_bytes(batch, context) * 1.15 + expanded + (4 << 30)
    return need < 0.92 * torch.cuda.get_device_properties(0).total_memory


def derive(rows: list[Row], bandwidth: float) -> None:
    """Fill each row's speed-ups, attention time over the floor and read time at `bandwidth`."""
    def find(row: Row, method: str, context: int) -> Optional[Row]:
        return next((r for r in rows if (r.shape, r.batch, r.context, r.method) ==
                     (row.shape, row.batch, context, method)), None)

    for row in rows:
        graph = STEP_GRAPH if row.method.endswith(STEP_GRAPH) else ""  # captured rows against captured rows ...
        variant = (SEPARATE if SEPARATE in row.method else "") + graph  # ... and separate against separate
        inductor, full = find(row, "inductor" + graph, row.context), find(row, "full" + variant, row.context)
        row.speedup_vs_inductor = inductor.ms / row.ms if inductor else None
        row.speedup_vs_full = full.ms / row.ms if full else None
        row.kernel_speedup_vs_full = full.kernel_ms / row.kernel_ms if full else None
        row.pipelined_speedup_vs_full = (full.pipelined_ms / row.pipelined_ms
                                         if full and full.pipelined_ms and row.pipelined_ms else None)
        floor = find(row, row.method, FLOOR_CONTEXT) or find(row, "full" + variant, FLOOR_CONTEXT)
        row.read_ms = row.attention_bytes / bandwidth * 1e3
        if floor is not None and not row.floor:
            row.attention_ms = row.ms - floor.ms
            ideal = floor.ms - floor.attention_bytes / bandwidth * 1e3 + row.read_ms
            row.ceiling_vs_inductor = inductor.ms / ideal if inductor else None
            row.ceiling_vs_full = full.ms / ideal if full else None


def print_row(row: Row, out: Callable[[str], None]) -> None:
    def ratio(x: Optional[float]) -> str:
        return f"x{x:5.2f}" if x else "   -  "

    attention = (f"attn {row.attention_ms:6.3f} ms = {row.attention_ms / row.read_ms:4.2f}x read"
                 if row.attention_ms is not None else "attn    -")
    c = row.categories
    out(f"{row.shape:10s} B={row.batch:<2d} L={row.context:<6d} {row.method:16s} {row.ms:7.3f} ms  "
        f"{ratio(row.speedup_vs_inductor)} vs inductor  {ratio(row.speedup_vs_full)} vs full "
        f"({ratio(row.kernel_speedup_vs_full)} by kernel time, {ratio(row.pipelined_speedup_vs_full)} pipelined; "
        f"ceiling {ratio(row.ceiling_vs_inductor)} / {ratio(row.ceiling_vs_full)})  {attention}  "
        f"| kernels {row.kernel_ms:6.3f} (w {c['weights']:.3f} a {c['attention']:.3f} s {c['selection']:.3f} "
        f"c {c['communication']:.3f} o {c['other']:.3f}; {row.launches:.0f} launches) outside {row.outside_ms:6.3f} "
        f"(idle gaps: short {row.gaps.get('short_ms', 0):.3f} long {row.gaps.get('long_ms', 0):.3f} longest "
        f"{row.gaps.get('longest_ms', 0):.3f}; pipelined step {row.pipelined_ms or 0:.3f})  "
        f"[compile {row.compile_s:.0f} s]"
        + (f"  NO CUDA GRAPHS in {row.cudagraph_skips} graph(s)" if row.cudagraph_skips else ""))


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `measure` both decode benchmarks take."""
    parser.add_argument("--trace", default=None, help="folder for a Chrome trace (host and GPU) of each row's profiled steps")
    parser.add_argument("--guard-filter", choices=list(GUARD_FILTERS), default=None,
                        help="compile every method with this Dynamo guard filter (unsafe; measures the guards' cost)")
    parser.add_argument("--inductor-config", nargs="*", default=[], type=inductor_patch,
                        metavar="KEY=VALUE", help="Inductor config patches for every method, e.g. "
                        "coordinate_descent_tuning=True max_autotune=True (the tidal backend's `inductor` option)")


def inductor_patch(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` as (key, the value as a Python literal)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a Python literal") from None


def patch_sets(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The Inductor config patches each row runs with: --inductor-config's, after none with --beside-plain."""
    patches = dict(args.inductor_config)
    return [{}, patches] if args.beside_plain and patches else [patches]


def step_graphs(args: argparse.Namespace) -> list[bool]:
    """Whether each row runs captured whole by hand (--step-graph): not, also (after the plain one), only."""
    return {None: [False], "also": [False, True], "only": [True]}[args.step_graph]


def merge_variants(args: argparse.Namespace, method: Method) -> list[bool]:
    """Whether each row merges the projections (--separate-projections): the backend's default,
    also without (after it), or only without; plain Inductor rows run once."""
    if method.is_baseline:
        return [True]
    return {None: [True], "also": [True, False], "only": [False]}[args.separate_projections]


def trace_file(folder: Optional[str], stem: str) -> Optional[str]:
    """Where a row's Chrome trace goes (`folder/stem.json.gz`), if traces are asked for."""
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(Path(folder) / f"{stem}.json.gz")


def jobs(args: argparse.Namespace) -> list[tuple[str, int, int, Method]]:
    """(shape, batch, context, method) to run, the floor of each (shape, batch) first; rows that do
    not fit the GPU are dropped with a note."""
    planned = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for batch in args.batches:
            contexts = [shape.long_context if c == 0 else c for c in args.contexts]
            for context in contexts:
                methods = [Method(m) for m in args.methods]
                if not fits(shape, batch, context, methods):
                    print(f"skipped: {shape_name} batch {batch} context {context} does not fit the GPU", flush=True)
                    continue
                if not any(j[:3] == (shape_name, batch, FLOOR_CONTEXT) for j in planned):
                    planned += [(shape_name, batch, FLOOR_CONTEXT, Method(m)) for m in args.floor_methods]
                planned += [(shape_name, batch, context, m) for m in methods]
    return planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 0],
                        help="0: the shape's long context (100K for Llama-2-7B, 128K otherwise)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--floor-methods", nargs="*", default=["inductor", "full"],
                        help="methods run at the 1K floor; the flag alone (no methods): no floor rows")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="Llama-3-8B, batch 1, 32K: inductor, full, tidal:256; no floor, fewer steps")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--beside-plain", action="store_true",
                        help="with --inductor-config: also run every row without the patches, just before it (the "
                        "patched rows are named METHOD+config: their 'vs full' is the patches' speed-up)")
    parser.add_argument("--step-graph", choices=("also", "only"), default=None,
                        help="time the whole step captured in one CUDA graph by hand (rows named METHOD+graph, "
                        "compared with +graph rows): also (after each plain row) or only; a measurement of the "
                        "host's share, not how the backend runs")
    parser.add_argument("--separate-projections", choices=("also", "only"), default=None,
                        help="run the backend's rows with merge_projections=False (rows named METHOD+separate, "
                        "compared with +separate rows): also (after each merged row) or only")
    add_measure_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    for name in args.methods + args.floor_methods:
        if Method(name).mode not in (*BASELINES, *tidal_compile.config.MODES):
            parser.error(f"unknown method {name!r}; methods: {', '.join(BASELINES)}, full, tidal:K, quest:K, "
                         f"topk_oracle:K")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode.py needs a CUDA GPU")

    bandwidth = copy_bandwidth()
    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; CUDA graphs, bf16, full depth")
    print(header, flush=True)
    rows: list[Row] = []
    model, built = None, None
    progress = tqdm(jobs(args), desc="decode rows", unit="row", file=sys.stdout, dynamic_ncols=True)
    for shape_name, batch, context, method in progress:
        progress.set_postfix_str(f"{shape_name} B={batch} L={context} {method.name}")
        shape = SHAPES[shape_name]
        if built != shape_name:
            model = None
            gc.collect()
            torch.cuda.empty_cache()
            longest = max(shape.long_context if c == 0 else c for c in args.contexts)
            model, built = build_model(shape, longest + 4096), shape_name
        for patches, merge, step_graph in itertools.product(patch_sets(args), merge_variants(args, method),
                                                            step_graphs(args)):
            suffix = (("+config" if patches and args.beside_plain else "") + ("" if merge else SEPARATE)
                      + (STEP_GRAPH if step_graph else ""))
            trace = trace_file(args.trace, f"{shape_name}-b{batch}-{context}-{method.file_name}{suffix}")
            rows.append(measure(model, method, shape_name, shape, batch, context, args.steps, args.warmup,
                                args.profile_steps, trace=trace, guard_filter=args.guard_filter,
                                inductor_config=patches, step_graph=step_graph, merge=merge))
            rows[-1].method += suffix
            derive(rows, bandwidth)
            print_row(rows[-1], progress.write)
            if args.out:  # after every row: a long sweep cut short keeps what it measured
                save(args.out, header, bandwidth, rows)
    progress.close()
    print("\nall rows:")
    for row in rows:
        print_row(row, print)


def save(path: str, header: str, bandwidth: float, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump(dict(header=header, device=torch.cuda.get_device_name(), torch=torch.__version__,
                       transformers=transformers.__version__, triton=triton.__version__,
                       python=platform.python_version(), bandwidth=bandwidth, date=time.strftime("%Y-%m-%d"),
                       command=" ".join(sys.argv), rows=[dict(asdict(r), outside_ms=r.outside_ms) for r in rows]),
                  f, indent=1)


if __name__ == "__main__":
    main()
