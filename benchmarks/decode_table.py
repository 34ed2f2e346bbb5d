"""The latest figure of every decode row, as one markdown table (runs anywhere, no GPU, no torch).

    python benchmarks/decode_table.py docs/results/decode-*.json

Reads JSON files written by `benchmarks/decode.py --out`, in the order given: a row of a later file
replaces an earlier file's row of the same shape, batch, context and method. Prints one line per
shape, batch and context: ms per step of each method, the floor (full attention at a 1K context,
same shape and batch, in tidal k=256's run, else in full's), and tidal k=256's speed-ups (by
step, by kernel time, by pipelined step: runs since 2026-12-02) and ceiling as its own run
measured them (baselines from that same process), then the files the line's rows come from.
Rows whose whole step ran in one CUDA graph (`decode.py --step-graph`, methods METHOD+graph)
follow in a table of their own.

    python benchmarks/decode_table.py --missing docs/results/decode-*.json

prints instead, for each line, the `decode.py` command that would fill its empty cells (with
`full` and tidal k=256 again, so that the new rows' ratios come from one run, and a floor).
With `--cells-only` the commands run the empty cells alone (the table shows other methods' ms
only, so their baselines need not share their run): `full` beside tidal k=256 only when that
cell is empty (its ratios), a floor only for a line without one, and the lines of one shape and
batch that need the same methods in one command (one process, one floor): about half the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

METHODS = ("inductor", "full", "tidal:256", "tidal:2048", "quest:256", "topk_oracle:256")
HEADLINE = "tidal:256"
CAPTURED = "+graph"
"""Suffix of decode.py's rows whose whole step (forward, argmax, next position) ran in one hand-captured
CUDA graph (--step-graph; decode.py's STEP_GRAPH)."""
Key = tuple[str, int, int, str]  # shape, batch, context, method


def load_rows(paths: list[str]) -> list[dict]:
    """Every row of the files, a later file's row replacing an earlier one's; each row keeps its
    file's name (without `decode-` and `.json`) under "file"."""
    rows: dict[Key, dict] = {}
    for path in paths:
        name = Path(path).stem.removeprefix("decode-")
        with open(path) as f:
            for row in json.load(f)["rows"]:
                rows[(row["shape"], row["batch"], row["context"], row["method"])] = dict(row, file=name)
    return list(rows.values())


def _ms(row: Optional[dict]) -> str:
    return "-" if row is None else f"{row['ms']:.2f}"


def _floor(*rows: Optional[dict]) -> str:
    """The floor of the first row whose run had one (its step minus its attention time)."""
    for row in rows:
        if row is not None and row.get("attention_ms") is not None:
            return f"{row['ms'] - row['attention_ms']:.2f}"
    return "-"


def _ratio(row: Optional[dict], field: str) -> str:
    value = None if row is None else row.get(field)
    return "-" if value is None else f"{value:.2f}x"


def _lines(rows: list[dict], suffix: str) -> list[tuple[str, int, int]]:
    """(shape, batch, context) of every row run the way `suffix` names (CAPTURED, or "": plain), sorted."""
    return sorted({(r["shape"], r["batch"], r["context"]) for r in rows
                   if not r["floor"] and r["method"].endswith(CAPTURED) == bool(suffix)})


def table(rows: list[dict], suffix: str = "") -> str:
    """The markdown table of `rows` (load_rows), lines sorted by shape, batch and context: the rows
    as Inductor's CUDA graphs run them, or with `suffix` CAPTURED the rows whose whole step ran in
    one CUDA graph (each method's ratios against that run's captured baselines)."""
    by_key = {(r["shape"], r["batch"], r["context"], r["method"]): r for r in rows}
    methods = [m + suffix for m in METHODS]
    headline = HEADLINE + suffix
    head = ["shape", "B", "L", "floor (1K, same run)", *methods, f"{headline} / full (by kernels; pipelined)",
            f"{headline} / inductor", f"{headline} ceiling / full", "from"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for shape, batch, context in _lines(rows, suffix):
        cells = [by_key.get((shape, batch, context, m)) for m in methods]
        tidal = by_key.get((shape, batch, context, headline))
        by_kernels_and_pipelined = (f'{_ratio(tidal, "kernel_speedup_vs_full")}; '
                                    f'{_ratio(tidal, "pipelined_speedup_vs_full")}')
        files = sorted({r["file"] for r in cells if r is not None})
        out.append("| " + " | ".join([
            shape, str(batch), f"{context // 1024}K",
            _floor(tidal, by_key.get((shape, batch, context, "full" + suffix))), *map(_ms, cells),
            f"{_ratio(tidal, 'speedup_vs_full')} ({by_kernels_and_pipelined})", _ratio(tidal, "speedup_vs_inductor"),
            _ratio(tidal, "ceiling_vs_full"), ", ".join(f"`{f}`" for f in files)]) + " |")
    return "\n".join(out)


def missing(rows: list[dict], cells_only: bool = False) -> list[str]:
    """For each line of the table with an empty method cell, the decode.py command that fills it:
    the missing methods beside full and HEADLINE (their run's baselines), with a floor; with
    `cells_only`, the missing methods alone (full beside an absent HEADLINE), a floor only where
    the line has none, lines of one shape and batch with the same methods in one command."""
    by_key = {(r["shape"], r["batch"], r["context"], r["method"]): r for r in rows}
    commands: dict[tuple, list[int]] = {}  # (shape, batch, methods, floor, absent) -> contexts
    for shape, batch, context in _lines(rows, ""):
        absent = tuple(m for m in METHODS if (shape, batch, context, m) not in by_key)
        if not absent:
            continue
        baselines = ("full",) if HEADLINE in absent or not cells_only else ()
        methods = tuple(m for m in METHODS if m in absent or m in baselines or (m == HEADLINE and not cells_only))
        line_rows = (by_key.get((shape, batch, context, m)) for m in (HEADLINE, "full"))
        floor = not cells_only or _floor(*line_rows) == "-"
        key = (shape, batch, methods, floor, absent if not cells_only else ())
        commands.setdefault(key, []).append(context)
    return [f"python benchmarks/decode.py --shapes {shape} --batches {batch} --contexts {' '.join(map(str, contexts))} "
            f"--methods {' '.join(methods)} --floor-methods{' full' if floor else ''}"
            + (f"  # missing: {' '.join(absent)}" if absent else "")
            for (shape, batch, methods, floor, absent), contexts in commands.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by benchmarks/decode.py --out, oldest first")
    parser.add_argument("--missing", action="store_true", help="the decode.py commands that fill the empty cells")
    parser.add_argument("--cells-only", action="store_true",
                        help="with --missing: run the empty cells alone, lines of one shape and batch together")
    args = parser.parse_args()
    if args.cells_only and not args.missing:
        parser.error("--cells-only goes with --missing")
    rows = load_rows(args.results)
    if args.missing:
        print("\n".join(missing(rows, args.cells_only)))
        return
    print(table(rows))
    if _lines(rows, CAPTURED):
        print(f"\nEach step captured whole in one CUDA graph (decode.py --step-graph: methods {CAPTURED}):\n")
        print(table(rows, CAPTURED))


if __name__ == "__main__":
    main()
