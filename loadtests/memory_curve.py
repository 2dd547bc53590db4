"""RSS over time, per process group, from a soak's `resources.csv`: a table by window and a plot.

    python -m dvd_serve.loadtests.memory_curve RESULTS_DIR [--window 300]

Prints, for each group, the RSS at the start of every window and the growth within it (MiB): a group whose growth
slows to ~0 levels off; one whose last window grows as fast as its first does not. Then, from the replicas' own
samples (`RESULTS_DIR/memory/`), the same per replica for RSS, malloc and Python small objects, which says whether
growth is Python objects, native allocations or memory malloc holds free. Writes `RESULTS_DIR/rss.png`.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Groups worth a curve: the whole ones and the halves of the actor groups (`soak_processes.actor_split_usage`).
SHOWN_GROUPS = ("gateway", "vision", "language", "language/actor", "language/children", "ray")


@dataclass(frozen=True)
class Window:
    start_s: float
    start_mib: float
    growth_mib: float


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """group -> [(seconds since start, RSS MiB)], for groups with at least one process."""
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open(encoding="utf-8") as rows:
        for row in csv.DictReader(rows):
            if int(row["processes"]) > 0:
                curves[row["group"]].append((float(row["at_s"]), float(row["rss_mib"])))
    return dict(curves)


def windows(curve: list[tuple[float, float]], window_s: float) -> list[Window]:
    """The curve cut into consecutive windows of `window_s`: RSS at each window's first sample, growth to its last."""
    cut: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for at_s, mib in curve:
        cut[int(at_s // window_s)].append((at_s, mib))
    return [Window(points[0][0], points[0][1], points[-1][1] - points[0][1]) for _, points in sorted(cut.items())]


def table(curves: dict[str, list[tuple[float, float]]], window_s: float) -> list[str]:
    groups = [group for group in SHOWN_GROUPS if group in curves]
    by_group = {group: windows(curves[group], window_s) for group in groups}
    count = max(len(cut) for cut in by_group.values())
    lines = ["| window | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for index in range(count):
        cells = []
        for group in groups:
            cut = by_group[group]
            cells.append(f"{cut[index].start_mib:.0f} ({cut[index].growth_mib:+.1f})" if index < len(cut) else "-")
        lines.append(f"| {index * window_s / 60:.0f}-{(index + 1) * window_s / 60:.0f} min | " + " | ".join(cells) + " |")
    return lines


REPLICA_COLUMNS = ("rss_mib", "malloc_in_use_mib", "malloc_free_mib", "pymalloc_blocks", "children_rss_mib")


def replica_memory_table(folder: Path, window_s: float) -> list[str]:
    """From the replicas' own samples (`memory-<role>-<pid>.csv`): per replica and window, where memory went."""
    lines = ["| replica | window | " + " | ".join(REPLICA_COLUMNS) + " |", "|---|---|" + "---|" * len(REPLICA_COLUMNS)]
    for path in sorted(folder.glob("memory-*.csv")):
        with path.open(encoding="utf-8") as rows:
            samples = [row for row in csv.DictReader(rows)]
        if not samples:
            continue
        started = float(samples[0]["unix_s"])
        cut: dict[int, list[dict]] = defaultdict(list)
        for sample in samples:
            cut[int((float(sample["unix_s"]) - started) // window_s)].append(sample)
        for index, points in sorted(cut.items()):
            cells = []
            for column in REPLICA_COLUMNS:
                if points[0][column] in ("", "None"):
                    cells.append("-")
                    continue
                first, last = float(points[0][column]), float(points[-1][column])
                cells.append(f"{first:.0f} ({last - first:+.0f})" if column == "pymalloc_blocks"
                             else f"{first:.1f} ({last - first:+.1f})")
            lines.append(f"| {path.stem.removeprefix('memory-')} | {index * window_s / 60:.0f}-"
                         f"{(index + 1) * window_s / 60:.0f} min | " + " | ".join(cells) + " |")
    return lines


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.0, 4.4))
    for group in SHOWN_GROUPS:
        if group in curves:
            first = curves[group][0][1]
            axes.plot([at / 60 for at, _ in curves[group]], [mib - first for _, mib in curves[group]], label=group)
    axes.set_xlabel("minutes since the load started")
    axes.set_ylabel("RSS change since the start (MiB)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a soak's output folder (holds resources.csv)")
    parser.add_argument("--window", type=float, default=300.0, help="window length in seconds (default 300)")
    args = parser.parse_args(argv)
    curves = read_curves(args.results / "resources.csv")
    print("RSS MiB at the start of each window (growth within it)")
    print("\n".join(table(curves, args.window)))
    if (args.results / "memory").is_dir():
        print("\nEach replica's own view: value at the start of each window (change within it)")
        print("\n".join(replica_memory_table(args.results / "memory", args.window)))
    print(f"plot: {plot(curves, args.results / 'rss.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
