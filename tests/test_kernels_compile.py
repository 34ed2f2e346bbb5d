"""Every kernel variant the launchers launch compiles for a Hopper GPU (sm_90), on the CPU, and
writes only what Inductor can leave in place under torch.compile (no copies around the launch).

The launches of small problems are recorded while they run in Triton's interpreter; each distinct
variant (kernel, constexpr switches, argument types, warps and stages) is then compiled to a cubin
by Triton's own compiler and ptxas, which need no GPU or driver. The interpreter accepts code the
compiler rejects (types, layouts, constexpr use); this finds it before a GPU run. The problems are
float16, as the interpreter tests' are; their pointers are compiled as the GPU path's bfloat16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

kernels = pytest.importorskip("tidal_compile.ops.kernels")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="launches are recorded in Triton's interpreter (set by conftest without a GPU)")

Launch = tuple[Any, dict[str, Any], set[str]]  # (interpreted kernel, its keyword arguments, those it changed)
POINTERS = {torch.float32: "*fp32", torch.float16: "*bf16", torch.bfloat16: "*bf16", torch.int32: "*i32",
            torch.int64: "*i64", torch.bool: "*i1"}
"""Triton's pointer type of a tensor argument (float16 compiled as bfloat16)."""


def recorded_launches(run: Callable[[], None]) -> list[Launch]:
    """The launches `run` makes through `kernels.wrap_triton` (each still runs), each with the
    names of the tensor arguments it changed. Uninitialised buffers (`torch.empty`) come filled
    with a fixed byte pattern, so that a kernel's write of zeros into one shows as a change."""
    launches: list[Launch] = []
    wrap, empty = kernels.wrap_triton, torch.empty

    def patterned_empty(*args, **kwargs) -> torch.Tensor:
        tensor = empty(*args, **kwargs)
        tensor.view(-1).view(torch.uint8).fill_(0x5A)
        return tensor

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(**kwargs):
                tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
                before = {name: bits(value) for name, value in tensors.items()}
                wrap(self.kernel)[grid](**kwargs)
                changed = {name for name, value in tensors.items() if not torch.equal(bits(value), before[name])}
                launches.append((self.kernel, kwargs, changed))
            return launch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "wrap_triton", Recording)
        patch.setattr(torch, "empty", patterned_empty)
        run()
    return launches


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor`'s elements as bytes (compares NaNs, and garbage, bit for bit)."""
    return tensor.contiguous().view(-1).view(torch.uint8).clone()


def described(launch: Launch) -> dict[str, Any]:
    """A launch as `hopper_compile.py` and `inductor_writes.py` take it: template, kernel and each
    argument's value, or its Triton pointer type for a tensor (`POINTERS`)."""
    kernel, kwargs, _ = launch
    arguments = {name: {"pointer": POINTERS[value.dtype]} if isinstance(value, torch.Tensor) else value
                 for name, value in kwargs.items()}
    return {"template": kernel.fn.__module__.rsplit(".", 1)[-1].rsplit("_", 1)[0] + ".py.jinja",
            "kernel": kernel.fn.__name__, "arguments": arguments}


def in_fresh_process(script: str, launches: list[Launch]) -> str:
    """The output of tests/`script` given the launches (JSON on stdin), run in a fresh process without
    the interpreter (it patches triton.language for good in the process that ran it)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name(script))], env=env,
                          input=json.dumps([described(launch) for launch in launches]), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def decode_inputs(length: int = 300, head_dim: int = 128):
    """A batch of two (GQA 4 query heads per KV head): left padding in one sequence, an unfilled
    cache tail in the other."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, head_dim, generator=gen).half()
    k, v = (torch.randn(2, 2, length, head_dim, generator=gen).half() for _ in range(2))
    mask = torch.ones(2, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :40] = False
    mask[1, ..., length - 60:] = False
    return q, k, v, mask


def dense_launches() -> None:
    q, k, v, mask = decode_inputs()
    additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    for attn_mask, bound_loop in ((mask, False), (mask, True), (additive, True), (None, False)):
        kernels.flash_decode(q, k, v, attn_mask, 0.1, bound_loop=bound_loop)
    kernels.flash_decode(q[:, :2], k[:, :1], v[:, :1], mask, 0.1)  # one sequence-head per batch: the branch
    kernels.flash_decode(q.float(), k.float(), v.float(), mask, 0.1)


def selection_launches() -> None:
    q, k, v, mask = decode_inputs()
    summary = kernels.summarize_mask(mask, 2, k.shape[2], q.device, sink=4, recent=8)
    _, lse, logits = kernels.flash_decode(q, k, v, mask, 0.1, emit_logits=True, summary=summary)
    taken_tail = dict(group=16, block=16, group_block=16)  # 19 groups: a step and a tail taken whole
    every = dict(early_exit=False)  # selections that read every digit (plan_topk's stop early)
    early = dict(early_exit=True, group_slack=8)  # top groups that stop at a bin up to 8 over
    for sets, by_prob in ((8, False), (2, True), (1, True)):
        for grouped, gather_programs, digit_bits, steps, exit in (
                (True, 1, 8, {}, every), (True, 4, 8, {}, {}), (True, 1, 4, {}, {}), (True, 4, 4, {}, every),
                (False, 1, 8, {}, {}), (True, 1, 4, taken_tail, {}), (True, 4, 4, taken_tail, every),
                (True, 1, 8, {}, early), (True, 4, 4, taken_tail, early)):
            plan = kernels.plan_topk(2 * sets, k.shape[2], 64, q.device, grouped=grouped,
                                     gather_programs=gather_programs, digit_bits=digit_bits,
                                     **{"group": 4, **steps, **exit})
            assert (plan.taken_tail(k.shape[2], 64) > 0) == bool(steps)
            kernels.select_topk(logits, lse, summary, 64, sets, by_prob, plan)


def sparse_launches() -> None:
    q, k, v, _ = decode_inputs()
    for sets in (8, 2, 1):
        indices = torch.randperm(240)[:64].sort().values.int().expand(2, sets, 64).contiguous()
        kernels.sparse_decode(q, k, v, indices, 0.1)


def quest_launches() -> None:
    q, k, v, mask = decode_inputs()
    summary = kernels.summarize_mask(mask, 2, k.shape[2], q.device)
    pages = k.shape[2] // 16 + 1
    for grouped in (True, False):
        plan = kernels.plan_topk(16, pages, 4, q.device, grouped=grouped)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "plan_topk", lambda *args, **kw: plan)
            # Nothing summarised yet: the launch summarises every page, then scores them.
            page_min, page_max = (torch.zeros(2, 2, pages, 128, dtype=k.dtype) for _ in range(2))
            filled = torch.zeros(2, dtype=torch.int32)
            kernels.quest_attention(q, k, v, mask, page_min, page_max, filled, 0.1, 64, 16, summary)


def small_head_dim_launches() -> None:
    """Each attention op at head dim 8, below tl.dot's smallest dimension (16; tiny test models)."""
    q, k, v, mask = decode_inputs(head_dim=8)
    summary = kernels.summarize_mask(mask, 2, k.shape[2], q.device)
    _, lse, logits = kernels.flash_decode(q, k, v, mask, 0.1, emit_logits=True, summary=summary)
    indices = kernels.select_topk(logits, lse, summary, 64, 2, True)
    kernels.sparse_decode(q, k, v, indices, 0.1)
    page_min, page_max = (torch.zeros(2, 2, k.shape[2] // 16 + 1, 8, dtype=k.dtype) for _ in range(2))
    kernels.quest_attention(q, k, v, mask, page_min, page_max, torch.zeros(2, dtype=torch.int32), 0.1, 64, 16, summary)


def every_scenario() -> None:
    for scenario in (dense_launches, selection_launches, sparse_launches, quest_launches, small_head_dim_launches):
        scenario()


@pytest.fixture(scope="module")
def scenario_launches() -> list[Launch]:
    """`every_scenario`'s launches, recorded once (interpreted) for the tests below."""
    launches = recorded_launches(every_scenario)
    assert launches, "the scenarios launched no kernel"
    return launches


def test_every_launched_kernel_variant_compiles_for_hopper(scenario_launches):
    """Dense (a bool mask bounded and not, an additive one, none, the one-sequence-head branch,
    fp32), selection (both top-k plans, the grouped one with its gather split too, at every
    granularity, sink and recent), sparse (each index-set granularity), Quest (metadata and
    scores, both page top-k plans) and head dim 8 launches compile for sm_90 in a fresh process: one compile run (about a minute with Triton's cache empty)."""
    assert "compiled" in in_fresh_process("hopper_compile.py", scenario_launches)


OVERCOUNTED = {"radix_select": {"Logits", "Lse", "Rank", "GroupMax"}, "radix_emit": {"Rank", "Hist"},
               "radix_select_groups": {"GroupMax"}, "radix_gather": {"Logits", "Lse", "Rank", "Groups"}}
"""Arguments Inductor counts as written that these kernels only read: their helpers' results
decide where they store, and the analysis then counts every pointer the helpers read
(templates/radix_keys.py.jinja). Harmless while each is a buffer of the layer's own that no other
argument shares and nothing reads after the launch, as the launchers pass them."""


def inductor_writes(launches: list[Launch]) -> list[set[str]]:
    """The arguments of each launch that Inductor counts as written (tests/inductor_writes.py)."""
    return [set(names) for names in json.loads(in_fresh_process("inductor_writes.py", launches))]


def test_inductor_sees_each_launch_write_only_what_it_writes(scenario_launches):
    """Under torch.compile Inductor copies an argument a kernel writes, by its analysis of the
    kernel, when another argument or a later reader shares it: every written argument, as Inductor
    sees it, is one the launch changes (but OVERCOUNTED), and no two share a buffer. Guards the
    mask summary, which every layer reads, and buffers passed twice (Quest's scores, the group keys;
    three copies a Quest layer on the H200, docs/benchmarks.md)."""
    problems = []
    for (kernel, kwargs, changed), written in zip(scenario_launches, inductor_writes(scenario_launches),
                                                  strict=True):
        name = kernel.fn.__name__
        if written - changed - OVERCOUNTED.get(name, set()):
            problems.append(f"{name} seen writing {sorted(written - changed)} (changed: {sorted(changed)})")
        buffers = [kwargs[arg].untyped_storage().data_ptr() for arg in written]
        if len(set(buffers)) < len(buffers):
            problems.append(f"{name} writes {sorted(written)}, of which some share a buffer")
    assert not problems, "\n".join(problems)


def test_no_launch_writes_into_part_of_a_buffer(scenario_launches):
    """Every tensor a kernel writes is a whole buffer, not a view of part of one: under
    torch.compile Inductor copies a written view out of its buffer and back around the launch
    (five launches a Quest layer on the H200, docs/benchmarks.md)."""
    def part_of_a_buffer(tensor: torch.Tensor) -> bool:
        return tensor.numel() * tensor.element_size() < tensor.untyped_storage().nbytes()

    assert any(changed for _, _, changed in scenario_launches), "no launch wrote a tensor: the check cannot fail"
    written_views = {f"{kernel.fn.__name__}.{name}" for kernel, kwargs, changed in scenario_launches
                     for name in changed if part_of_a_buffer(kwargs[name])}
    assert not written_views
