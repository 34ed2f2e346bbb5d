"""Where one grouped top-k's time goes: the phases of `radix_select` (radix_topk.py.jinja), timed
inside the kernel with the SM's cycle counter, next to the whole `select_topk` (its first launch,
`radix_group_max`, is the rest).

    python benchmarks/topk_phases.py

The shipped template is not changed: a copy of the templates is rendered with a `clock64` read
before each phase of `radix_select` and the cycle counts stored per row; the top-k is ranked by
logit (query_head), so the kernel's unused `Lse` argument carries them. Clock reads are ordered
against the kernel's memory operations only, so a phase boundary is approximate; the phases of a
row add up to its program's time. Prints, per shape, the median over rows in us (at the H200's
1.98 GHz), the candidates the gather kept and the groups chosen.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jinja2
import torch

from tidal_compile import codegen
from tidal_compile.ops import kernels
from tune_topk import decode_logits, us  # benchmarks/, beside this script

GHZ = 1.98
# (batch, heads, kv heads, length, budget, plan overrides)
CASES = [(1, 32, 8, 131072, 256, {}), (1, 32, 8, 131072, 2048, {}), (8, 32, 8, 32768, 256, {}),
         (8, 32, 8, 32768, 2048, {})]
# radix_select's phases, each timed from the statement that starts it to the next phase's
PHASES = {"groups": "        top, tail, threshold = _choose_groups(group_keys",
          "gather": "        count = _gather_candidates(",
          "candidate threshold": "        threshold, need = _threshold(cand_keys",
          "emit": "        _emit(cand_keys"}
SLOTS = len(PHASES) + 2  # the phases, then the candidates and the groups chosen
CLOCK = '''

@triton.jit
def _clock():
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
'''


def timed_templates() -> Path:
    """A copy of the templates whose radix_select stores its phases' cycles in Lse[row * SLOTS:]."""
    folder = Path(tempfile.mkdtemp(prefix="topk_phases_"))
    for template in codegen.TEMPLATE_DIR.glob("*.jinja"):
        shutil.copy(template, folder / template.name)
    path = folder / "radix_topk.py.jinja"
    source = path.read_text()
    head, select = source.split("def radix_select(")
    lines = select.splitlines()
    for phase, (name, start) in enumerate(PHASES.items()):
        at = [i for i, line in enumerate(lines) if line.startswith(start)]
        assert len(at) == 1, f"phase {name!r}: {start!r} must start one statement of radix_select"
        indent = start[:len(start) - len(start.lstrip())]
        lines.insert(at[0], f"{indent}t{phase} = _clock()")
    indent = " " * 8
    stores = [f"{indent}t{len(PHASES)} = _clock()"]
    stores += [f"{indent}tl.store(Lse + row * {SLOTS} + {p}, (t{p + 1} - t{p}).to(tl.float32))"
               for p in range(len(PHASES))]
    stores += [f"{indent}tl.store(Lse + row * {SLOTS} + {len(PHASES)}, count.to(tl.float32))",
               f"{indent}tl.store(Lse + row * {SLOTS} + {len(PHASES) + 1}, (top + tail).to(tl.float32))"]
    body = "\n".join(lines + stores) + "\n"
    include = '{% include "radix_keys.py.jinja" %}\n'
    path.write_text(head.replace(include, include + CLOCK) + "def radix_select(" + body)
    return folder


def main() -> None:
    codegen._ENV.loader = jinja2.FileSystemLoader(str(timed_templates()))
    codegen._load.cache_clear()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for batch, heads, kv_heads, length, budget, overrides in CASES:
        _, logits, summary = decode_logits(batch, heads, kv_heads, length)
        rows = batch * heads
        plan = kernels.plan_topk(rows, length, budget, logits.device, grouped=True, **overrides)
        assert plan.group > 1, "the phases are those of a grouped top-k with groups of several positions"
        cycles = torch.zeros(rows * SLOTS, device="cuda")

        def topk():
            return kernels.select_topk(logits, cycles, summary, budget, heads, False, plan)

        topk()
        per_row = cycles.view(rows, SLOTS).cpu().median(0).values
        total = us(topk)
        slowest = cycles.view(rows, SLOTS)[:, :len(PHASES)].sum(1).max().item() / GHZ / 1e3
        phases = ", ".join(f"{name} {per_row[p] / GHZ / 1e3:.2f}" for p, name in enumerate(PHASES))
        print(f"B={batch} L={length} k={budget} {plan}: select_topk {total:.1f} us (radix_select's slowest row "
              f"{slowest:.1f}); radix_select per row (us): {phases}; candidates {per_row[-2]:.0f}, groups "
              f"{per_row[-1]:.0f}", flush=True)
        del logits
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
