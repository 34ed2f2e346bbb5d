"""Which arguments of each kernel launch Inductor counts as written, by torch's own analysis of a
user Triton kernel (as torch.compile runs it: it copies a written argument that another argument
or a later reader shares around the launch), for a Hopper GPU without one. The analysis is
torch's private `triton_kernel_wrap.identify_accessed_tensors` (`identify_mutated_tensors` in
older releases). Reads a JSON list of
launches (tests/test_kernels_compile.py's `described`) on stdin, prints a JSON list of the
written argument names of each."""

from __future__ import annotations

import json
import sys

import torch
from torch._higher_order_ops import triton_kernel_wrap
from triton.runtime import driver

from hopper_compile import HOPPER, LAUNCH_OPTIONS
from tidal_compile import codegen

DTYPES = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*i32": torch.int32, "*i64": torch.int64,
          "*i1": torch.bool}


class HopperDriver:
    """What the analysis asks of Triton's driver: the target it generates the kernel's IR for."""

    def get_current_target(self):
        return HOPPER

    def get_current_device(self) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def written(launch: dict) -> list[str]:
    kernel = getattr(codegen.load(launch["template"]), launch["kernel"])
    kwargs = {name: torch.empty(16, dtype=DTYPES[value["pointer"]]) if isinstance(value, dict) else value
              for name, value in launch["arguments"].items() if name not in LAUNCH_OPTIONS}
    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(triton_kernel_wrap.identify_mutated_tensors(kernel, kwargs, {}))


def main() -> None:
    driver.set_active(HopperDriver())
    seen: dict[str, list[str]] = {}
    answers = []
    for launch in json.load(sys.stdin):
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen[key] = written(launch)
        answers.append(seen[key])
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
