"""Compile kernel launches for a Hopper GPU (sm_90) without one: Triton's compiler and its own
ptxas. Reads a JSON list of launches (tests/test_kernels_compile.py's `described`) on stdin,
compiles each distinct variant (kernel, constexpr values, argument types, warps and stages) to a
cubin and prints one line per variant; a variant that does not compile raises with its name."""

from __future__ import annotations

import json
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tidal_compile import codegen

HOPPER = GPUTarget("cuda", 90, 32)
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def argument_type(value) -> str:
    if isinstance(value, dict):  # a tensor, by its pointer type
        return value["pointer"]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def variant(launch: dict) -> tuple[tuple, ASTSource, dict]:
    """(key: the kernel, its signature, constexpr values by name and options; compile source,
    options) of one launch."""
    jit = getattr(codegen.load(launch["template"]), launch["kernel"])
    arguments = launch["arguments"]
    signature, constexprs, by_index = {}, {}, {}
    for i, param in enumerate(jit.params):
        value = arguments.get(param.name, param.default)
        if param.is_constexpr or value is None:  # Triton specializes a None argument as a constant
            signature[param.name], constexprs[param.name], by_index[(i,)] = "constexpr", value, value
        else:
            signature[param.name] = argument_type(value)
    options = {name: arguments[name] for name in LAUNCH_OPTIONS if name in arguments}
    key = (launch["kernel"], tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
    return key, ASTSource(jit, signature, by_index), options


def main() -> None:
    seen = set()
    for launch in json.load(sys.stdin):
        key, source, options = variant(launch)
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        try:
            compiled = triton.compile(source, target=HOPPER, options=options)
        except Exception as error:
            raise SystemExit(f"{launch['kernel']} {dict(key[2])} {options}: does not compile for sm_90:\n{error}")
        assert compiled.asm["cubin"]
        print(f"compiled {launch['kernel']} {options} in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
