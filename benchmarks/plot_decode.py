"""Plots of `benchmarks/decode.py` results (runs anywhere matplotlib does, no GPU).

    python benchmarks/plot_decode.py docs/results/decode-*.json --out-dir docs

Writes `decode_latency.png` (ms per step against context, log scales, one line per method, one
panel per shape (rows) and batch (columns)) and `decode_breakdown.png` (each row's step split into
weights, attention, selection, other kernels and time outside kernels, stacked; the same panels,
Inductor left out: its expanded-cache attention would flatten every other bar, its step is in the
latency plot). A method has one colour in every panel. A row of a later file replaces an earlier
file's row of the same shape, batch, context and method.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import matplotlib

from decode_table import METHODS, load_rows  # benchmarks/, beside this script

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

PARTS = ("weights", "attention", "selection", "communication", "other", "outside")


def method_key(method: str) -> tuple[int, str]:
    """Sort key: the usual methods in a fixed order, any other method after them by name."""
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def method_colors(rows: list[dict]) -> dict[str, str]:
    """One colour per method, the same in every panel and both plots."""
    methods = sorted({row["method"] for row in rows}, key=method_key)
    return {method: f"C{index % 10}" for index, method in enumerate(methods)}


def label_log_axis(ax) -> None:
    """Plain numbers on a log y axis (20, not 2 x 10^1): every tick within a decade, else 1, 2, 3 and 5 x 10^n."""
    low, high = ax.get_ylim()
    leading_digits = "123456789" if high / low < 10 else "1235"
    formatter = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in leading_digits else "")
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(formatter)


def panel_grid(rows: list[dict], panel_size: tuple[float, float]):
    """A figure with one panel per (shape, batch): shapes are rows, batches columns; unused panels hidden."""
    shapes = sorted({row["shape"] for row in rows})
    batches = sorted({row["batch"] for row in rows})
    fig, axes = plt.subplots(len(shapes), len(batches), squeeze=False,
                             figsize=(panel_size[0] * len(batches), panel_size[1] * len(shapes)))
    for ax in axes.flat:
        ax.set_visible(False)

    def panel(shape: str, batch: int):
        ax = axes[shapes.index(shape)][batches.index(batch)]
        ax.set_visible(True)
        ax.set_title(f"{shape}, batch {batch}")
        ax.set_ylabel("ms per decode step")
        ax.grid(alpha=0.3)
        return ax

    return fig, panel


def by_panel(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    panels = defaultdict(list)
    for row in rows:
        panels[(row["shape"], row["batch"])].append(row)
    return panels


def plot_latency(rows: list[dict], path: str) -> None:
    colors = method_colors(rows)
    fig, panel = panel_grid(rows, (5, 4))
    for (shape, batch), panel_rows in by_panel(rows).items():
        ax = panel(shape, batch)
        points = defaultdict(dict)  # method -> context -> ms
        for row in panel_rows:
            points[row["method"]][row["context"]] = row["ms"]
        for method in sorted(points, key=method_key):
            contexts = sorted(points[method])
            ax.plot(contexts, [points[method][c] for c in contexts], marker="o", label=method, color=colors[method])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        label_log_axis(ax)
        ax.set_xlabel("context (tokens)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_breakdown(rows: list[dict], path: str) -> None:
    fig, panel = panel_grid(rows, (6, 4.5))
    for (shape, batch), panel_rows in by_panel(rows).items():
        ax = panel(shape, batch)
        panel_rows = sorted(panel_rows, key=lambda r: (r["context"], method_key(r["method"])))
        bottom = [0.0] * len(panel_rows)
        for index, part in enumerate(PARTS):
            values = [max(r["outside_ms"], 0.0) if part == "outside" else r["categories"].get(part, 0.0)
                      for r in panel_rows]
            ax.bar(range(len(panel_rows)), values, bottom=bottom, label=part, color=f"C{index}")
            bottom = [b + v for b, v in zip(bottom, values)]
        labels = [f"{r['context'] // 1024}K {r['method']}" for r in panel_rows]
        ax.set_xticks(range(len(panel_rows)), labels, rotation=90, fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("Decode step breakdown (outside = step - kernel time; Inductor in the latency plot)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by benchmarks/decode.py --out")
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args()
    rows = load_rows(args.results)
    plot_latency(rows, os.path.join(args.out_dir, "decode_latency.png"))
    plot_breakdown([r for r in rows if r["context"] > 1024 and r["method"] != "inductor"],
                   os.path.join(args.out_dir, "decode_breakdown.png"))


if __name__ == "__main__":
    main()
