"""What the host runs while the GPU waits for it, from the Chrome traces `decode.py --trace` writes.

    python benchmarks/host_gaps.py docs/results/traces/*.json.gz

Per trace: the GPU's long idle gaps between kernels (at least `decode.GAP_LONG_US`: the GPU
waiting for the host), and the host events (Dynamo's cache lookup, the compiled region,
`cudaGraphLaunch`, ...) by their time inside those gaps, nested events each counted (runs
anywhere, no GPU).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from typing import Any

from decode import GAP_LONG_US, gaps_between  # benchmarks/, beside this script

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def long_gaps(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) in us of each idle stretch of at least GAP_LONG_US between GPU events."""
    busy = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in GPU_CATEGORIES]
    return [(start, end) for start, end in gaps_between(busy) if end - start >= GAP_LONG_US]


def host_time_in_gaps(events: list[dict[str, Any]], gaps: list[tuple[float, float]]) -> Counter:
    """us of each host event name (with its category) inside `gaps`."""
    inside: Counter = Counter()
    for event in events:
        if event.get("ph") != "X" or event.get("cat") in GPU_CATEGORIES:
            continue
        start, end = event["ts"], event["ts"] + event.get("dur", 0)
        overlap = sum(max(0.0, min(end, b) - max(start, a)) for a, b in gaps)
        if overlap > 0:
            inside[(event.get("cat", ""), event["name"])] += overlap
    return inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=15, help="host events listed per trace")
    args = parser.parse_args()
    for path in args.traces:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            events = json.load(f)["traceEvents"]
        gaps = long_gaps(events)
        print(f"{path}: {len(gaps)} long gaps, {sum(b - a for a, b in gaps) / 1e3:.3f} ms: "
              + ", ".join(f"{(b - a) / 1e3:.3f}" for a, b in gaps))
        for (category, name), us in host_time_in_gaps(events, gaps).most_common(args.top):
            print(f"  {us / 1e3:8.3f} ms  {category:14s} {name[:100]}")


if __name__ == "__main__":
    main()
