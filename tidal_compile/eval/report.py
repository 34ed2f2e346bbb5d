"""Figures and tables from the needle and recall JSON files (needs matplotlib: `pip install
tidal-compile[eval]`).

    python -m tidal_compile.eval.report --needle needle.json --recall recall.json --out docs/quality
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional


def accuracy_grid(cells: list[dict[str, Any]]) -> dict[str, dict[tuple[int, float], float]]:
    grid: dict[str, dict[tuple[int, float], float]] = defaultdict(dict)
    for c in cells:
        grid[c["setting"]][(c["length"], c["depth"])] = c["accuracy"]
    return grid


def summary_table(cells: list[dict[str, Any]]) -> str:
    """Markdown: mean accuracy per setting and context length (over depths), and overall."""
    grid = accuracy_grid(cells)
    lengths = sorted({c["length"] for c in cells})
    lines = ["| setting | " + " | ".join(f"L={n}" for n in lengths) + " | mean |",
             "| --- | " + " | ".join("---" for _ in lengths) + " | --- |"]
    for setting, acc in grid.items():
        per_length = [[a for (n, _), a in acc.items() if n == length] for length in lengths]
        means = [100 * sum(v) / len(v) for v in per_length]
        overall = 100 * sum(acc.values()) / len(acc)
        lines.append(f"| {setting} | " + " | ".join(f"{m:.1f}" for m in means) + f" | {overall:.1f} |")
    return "\n".join(lines)


def recall_table(recall: dict[str, dict[str, float]]) -> str:
    layers = sorted({int(layer) for per in recall.values() for layer in per})
    lines = ["| setting | " + " | ".join(f"L{n}" for n in layers) + " | mean |",
             "| --- | " + " | ".join("---" for _ in layers) + " | --- |"]
    for setting, per in recall.items():
        values = {int(k): v for k, v in per.items()}
        row = [f"{values[n]:.3f}" if n in values else "" for n in layers]
        lines.append(f"| {setting} | " + " | ".join(row) + f" | {sum(values.values()) / len(values):.3f} |")
    return "\n".join(lines)


def heatmaps(cells: list[dict[str, Any]], path: Path) -> None:
    """One accuracy heat map (needle depth x context length) per setting, like the TidalDecode paper's figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = accuracy_grid(cells)
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    cols = min(4, len(grid))
    rows = -(-len(grid) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (setting, acc) in zip(axes.flat, grid.items()):
        values = [[acc.get((n, d), float("nan")) for n in lengths] for d in depths]
        ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(setting, fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("context length", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    for ax in list(axes.flat)[len(grid):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recall_plot(recall: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # distinct colours for up to 20 settings
    for setting, per in recall.items():
        layers = sorted(int(k) for k in per)
        ax.plot(layers, [per[str(n)] if str(n) in per else per[n] for n in layers], marker="o", label=setting)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass on chosen positions")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--needle", type=Path)
    parser.add_argument("--recall", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.needle:
        cells = json.loads(args.needle.read_text())["cells"]
        heatmaps(cells, args.out / "needle_heatmaps.png")
        print(summary_table(cells))
    if args.recall:
        recall = json.loads(args.recall.read_text())["recall"]
        recall_plot(recall, args.out / "recall_per_layer.png")
        print(recall_table(recall))


if __name__ == "__main__":
    main()
