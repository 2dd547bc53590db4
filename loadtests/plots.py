"""Throughput against TTFT p90 over the offered load levels: one PNG per resolution, one line per system."""

from __future__ import annotations

import math
from pathlib import Path

from dvd_serve.loadtests.bench import BenchResult
from dvd_serve.loadtests.systems import SYSTEMS


def plot_throughput_vs_ttft(result: BenchResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for resolution in result.config.resolutions:
        figure, axes = plt.subplots(figsize=(6.4, 4.4))
        for key in result.config.systems:
            levels = sorted((level for level in result.levels if (level.system, level.resolution) ==
                             (key, resolution)), key=lambda level: level.rate)
            points = [(level.summary.ttft.p90 * 1000, level.summary.request_throughput, level.rate)
                      for level in levels if math.isfinite(level.summary.ttft.p90)]
            if not points:
                continue
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=SYSTEMS[key].label)
            for ttft_ms, throughput, rate in points:
                axes.annotate(f"{rate:g}/s", (ttft_ms, throughput), textcoords="offset points", xytext=(4, 4),
                              fontsize=7)
        axes.set_xscale("log")
        axes.set_xlabel("TTFT p90 (ms, log scale)")
        axes.set_ylabel("throughput (requests/s)")
        axes.set_title(f"{result.config.shape} shape, {resolution} px, labels = offered req/s")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = folder / f"throughput_vs_ttft_p90_{resolution}px.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
