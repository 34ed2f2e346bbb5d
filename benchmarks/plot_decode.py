"""Plots of `benchmarks/decode.py` results (runs anywhere matplotlib does, no GPU).

    python benchmarks/plot_decode.py docs/results/decode-*.json --out-dir docs

Writes `decode_latency.png` (ms per step against context, one line per method, one panel per
shape (rows) and batch (columns)) and `decode_breakdown.png` (each row's step split into weights,
attention, selection, other kernels and time outside kernels, stacked). A row of a later file
replaces an earlier file's row of the same shape, batch, context and method.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import matplotlib

from decode_table import load_rows  # benchmarks/, beside this script

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = ("weights", "attention", "selection", "communication", "other", "outside")


def plot_latency(rows: list[dict], path: str) -> None:
    panels = defaultdict(lambda: defaultdict(dict))  # (shape, batch) -> method -> context -> ms
    for row in rows:
        panels[(row["shape"], row["batch"])][row["method"]][row["context"]] = row["ms"]
    shapes = sorted({shape for shape, _ in panels})
    batches = sorted({batch for _, batch in panels})
    fig, axes = plt.subplots(len(shapes), len(batches), figsize=(5 * len(batches), 4 * len(shapes)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for (shape, batch), methods in panels.items():
        ax = axes[shapes.index(shape)][batches.index(batch)]
        ax.set_visible(True)
        for method, points in sorted(methods.items()):
            contexts = sorted(points)
            ax.plot(contexts, [points[c] for c in contexts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}, batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_breakdown(rows: list[dict], path: str) -> None:
    labels = [f"{r['shape']} B{r['batch']} {r['context'] // 1024}K\n{r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 5))
    bottom = [0.0] * len(rows)
    for part in PARTS:
        values = [max(r["outside_ms"], 0.0) if part == "outside" else r["categories"].get(part, 0.0) for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("ms per decode step")
    ax.set_title("Decode step breakdown (outside = step - kernel time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by benchmarks/decode.py --out")
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args()
    rows = load_rows(args.results)
    plot_latency(rows, os.path.join(args.out_dir, "decode_latency.png"))
    plot_breakdown([r for r in rows if r["context"] > 1024], os.path.join(args.out_dir, "decode_breakdown.png"))


if __name__ == "__main__":
    main()
