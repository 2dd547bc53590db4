"""The ablation benchmark behind `dvd-serve bench`: one seeded workload against (a) vLLM monolithic, (b) dvd-serve
coupled, (c) dvd-serve DvD and (d) DvD + ViR, in turn, on this machine.

Per system: start its server, send the greedy parity requests (they double as warm-up), then for every resolution
and every offered rate one open-loop Poisson load level (locust in a subprocess), with `/metrics` scraped before and
after each level for per-stage means; then stop the server. Every system gets exactly the same requests: the same
dataset lines in the same order at the same seeded arrival times, fresh lines for every level so no cache serves
one level from another (with `repeated_image_share`, repeats stay within their level). Afterwards: token parity of (b), (c) and (d, detail=high) against (a), the markdown report,
the CSV/JSON of every level and the throughput-vs-TTFT-p90 plots.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from dvd_serve.common.config import FrozenConfig
from dvd_serve.loadtests.datasets import WorkloadConfig, poisson_arrivals, read_dataset, write_dataset
from dvd_serve.loadtests.metrics import LoadSummary, summarize, write_json
from dvd_serve.loadtests.parity import GreedyAnswer, ParityResult, compare_answers, greedy_answer
from dvd_serve.loadtests.runner import LoadRunConfig, LoadRunError, run_load, served_model
from dvd_serve.loadtests.stage_metrics import scrape, stage_means
from dvd_serve.loadtests.systems import SYSTEM_KEYS, SYSTEMS, ServerProcess, ServerSettings, ServerStartError, free_port
from dvd_serve.server.default_model import cache_root

# Offered request rates (req/s) per resolution for the tiny shape on a 2-core CPU: light, near and past capacity.
DEFAULT_RATES = {448: (4.0, 12.0, 24.0), 896: (1.5, 4.0, 8.0), 1344: (0.75, 2.0, 4.0)}


class BenchConfig(FrozenConfig):
    """One run of the ablation benchmark."""

    shape: str = Field(default="tiny", description="Checkpoint shape to generate (see `make-checkpoint --shape`).")
    seed: int = Field(default=0, ge=0, description="Seed of the checkpoint weights and of the whole workload.")
    checkpoint_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype the generated checkpoints are stored in (compute dtype: server.dtype)."
    )
    checkpoint_dir: str | None = Field(
        default=None,
        description="Folder to generate the checkpoints into, or to reuse them from; None = the dvd-serve cache.",
    )
    out_dir: str = Field(default="bench-results", description="Folder for the report, CSV/JSON, plots and raw data.")
    systems: tuple[str, ...] = Field(default=SYSTEM_KEYS, description="Systems to run, among a, b, c, d.")
    resolutions: tuple[int, ...] = Field(default=(448, 896, 1344), description="Square image sides in pixels.")
    rates: dict[int, tuple[float, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_RATES), description="Offered requests/s per resolution, ascending.",
    )
    duration_s: float = Field(default=10.0, gt=0, description="Seconds during which each level starts requests.")
    drain_timeout_s: float = Field(default=60.0, ge=0, description="Seconds a level's running requests may finish.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Most seconds one request may take.")
    images_per_request: int = Field(default=1, ge=0, description="Images per request that has images.")
    text_only_share: float = Field(default=0.0, ge=0, le=1, description="Share of requests without images.")
    repeated_image_share: float = Field(
        default=0.0, ge=0, le=1,
        description="Share of requests with images that resend an earlier request's images within the same level.",
    )
    max_tokens: int = Field(default=32, ge=1, description="Output tokens per request (ignore_eos, temperature 0).")
    parity_requests: int = Field(default=2, ge=1, description="Greedy parity requests per resolution.")
    parity_max_tokens: int = Field(default=16, ge=1, description="Output tokens of each parity request.")
    server: ServerSettings = Field(default_factory=ServerSettings, description="Engine settings of every system.")
    kv_cache_gib: float = Field(default=1.0, gt=0, description="vLLM CPU KV cache per engine (VLLM_CPU_KVCACHE_SPACE).")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="Seconds a server may take to become ready.")
    max_fail_ratio: float = Field(default=0.0, ge=0, le=1, description="Largest failed share of a passing level.")

    @field_validator("systems")
    @classmethod
    def _known_systems(cls, systems: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(systems) - set(SYSTEM_KEYS))
        if unknown or not systems:
            raise ValueError(f"systems must be among {SYSTEM_KEYS}; got {systems}")
        return tuple(key for key in SYSTEM_KEYS if key in systems)

    def rates_for(self, resolution: int) -> tuple[float, ...]:
        if resolution not in self.rates:
            raise ValueError(f"no offered rates for {resolution} px; give --rates {resolution}=R1,R2,...")
        return self.rates[resolution]

    def workload(self, resolution: int, num_requests: int, segment_starts: tuple[int, ...] = ()) -> WorkloadConfig:
        return WorkloadConfig(
            resolution=resolution, images_per_request=self.images_per_request, text_only_share=self.text_only_share,
            repeated_image_share=self.repeated_image_share, segment_starts=segment_starts,
            num_requests=num_requests, max_tokens=self.max_tokens, seed=self.seed,
            logprobs=True,  # TTFT times the first token even where random weights produce no text yet
        )

    def parity_workload(self, resolution: int) -> WorkloadConfig:
        """Greedy requests with logprobs, `detail: high` (vLLM ignores it; for (d) it switches the router off)."""
        return WorkloadConfig(
            resolution=resolution, images_per_request=max(self.images_per_request, 1),
            num_requests=self.parity_requests, max_tokens=self.parity_max_tokens, detail="high", logprobs=True,
            stream=False, seed=self.seed + 1,
        )


@dataclass(frozen=True, slots=True)
class LevelPlan:
    """One load level: which dataset lines it sends and with which arrival seed."""

    resolution: int
    rate: float
    first_request: int
    requests: int
    arrival_seed: int


@dataclass(frozen=True, slots=True)
class LevelResult:
    system: str
    resolution: int
    rate: float
    summary: LoadSummary
    stages: dict[str, float]
    load_average: float = math.nan  # 1-minute load average of the machine right after the level (all processes)


@dataclass
class BenchResult:
    config: BenchConfig
    levels: list[LevelResult] = field(default_factory=list)
    startup_s: dict[str, float] = field(default_factory=dict)
    failed_systems: dict[str, str] = field(default_factory=dict)  # system -> why it did not run
    parity: dict[str, ParityResult] = field(default_factory=dict)  # system -> against (a)
    wall_s: float = 0.0  # the whole run, checkpoints and datasets included

    def level(self, system: str, resolution: int, rate: float) -> LevelResult | None:
        return next((level for level in self.levels
                     if (level.system, level.resolution, level.rate) == (system, resolution, rate)), None)

    @property
    def passed(self) -> bool:
        return (not self.failed_systems and all(result.passed for result in self.parity.values())
                and all(level.summary.fail_ratio <= self.config.max_fail_ratio and level.summary.succeeded > 0
                        for level in self.levels))


def plan_levels(config: BenchConfig, resolution: int) -> list[LevelPlan]:
    """The levels of one resolution, each starting where the previous one's requests end."""
    plans, first = [], 0
    for index, rate in enumerate(config.rates_for(resolution)):
        arrival_seed = config.seed * 1000 + index
        count = len(poisson_arrivals(rate, config.duration_s, arrival_seed))
        plans.append(LevelPlan(resolution, rate, first, count, arrival_seed))
        first += count
    return plans


def prepare_checkpoints(config: BenchConfig, report: Callable[[str], None]) -> dict[str, Path]:
    from dvd_serve.common.checkpoint.generate import make_checkpoint

    root = Path(config.checkpoint_dir) if config.checkpoint_dir else cache_root() / "bench-checkpoints"
    needed = {SYSTEMS[key].checkpoint for key in config.systems}
    folders = {}
    for kind in sorted(needed):
        folder = root / f"{config.shape}-{kind}-seed{config.seed}-{config.checkpoint_dtype}"
        if not (folder / "config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a run stopped half-way
            report(f"generating the {config.shape} {kind} checkpoint into {folder}")
            make_checkpoint(folder, fmt="chat", shape=config.shape, flash=kind == "flash", seed=config.seed,
                            dtype=config.checkpoint_dtype)
        folders[kind] = folder
    return folders


def prepare_datasets(config: BenchConfig, raw: Path, report: Callable[[str], None]) -> dict[int, tuple[Path, Path]]:
    """Per resolution: the load dataset (enough lines for all levels) and the parity dataset."""
    datasets = {}
    for resolution in config.resolutions:
        plans = plan_levels(config, resolution)
        needed = max(sum(plan.requests for plan in plans), 1)
        report(f"writing {needed} requests at {resolution} px")
        workload = config.workload(resolution, needed, tuple(plan.first_request for plan in plans))
        load = write_dataset(workload, raw / "datasets" / f"load-{resolution}px.jsonl")
        parity = write_dataset(config.parity_workload(resolution), raw / "datasets" / f"parity-{resolution}px.jsonl")
        datasets[resolution] = (load, parity)
    return datasets


def run_system(key: str, config: BenchConfig, checkpoints: dict[str, Path], datasets: dict[int, tuple[Path, Path]],
               result: BenchResult, raw: Path, report: Callable[[str], None]) -> dict[int, list[GreedyAnswer]]:
    """Runs every level against one system; returns its greedy parity answers per resolution."""
    system = SYSTEMS[key]
    port = free_port()
    server = ServerProcess(
        system.label, system.command(checkpoints[system.checkpoint], port, config.server), port, system.ready_path,
        raw / "logs" / f"{key}.log", env={"VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_gib:g}", "HF_HUB_OFFLINE": "1"},
    )
    with server:
        report(f"{system.label}: starting")
        result.startup_s[key] = server.start(config.startup_timeout_s)
        report(f"{system.label}: ready after {result.startup_s[key]:.0f} s")
        model = served_model(server.base_url)
        answers = {
            resolution: [greedy_answer(server.base_url, model, body) for body in read_dataset(parity)]
            for resolution, (_, parity) in datasets.items()
        }
        write_json(answers, raw / "parity" / f"{key}.json")
        for resolution, (load, _) in datasets.items():
            for plan in plan_levels(config, resolution):
                run = LoadRunConfig(
                    base_url=server.base_url, model=model, mode="poisson", rate=plan.rate,
                    duration_s=config.duration_s, drain_timeout_s=config.drain_timeout_s,
                    request_timeout_s=config.request_timeout_s, first_request=plan.first_request,
                    arrival_seed=plan.arrival_seed,
                )
                before = scrape(server.base_url)
                samples = run_load(run, load, raw / "samples" / key / f"{resolution}px-{plan.rate:g}rps.jsonl")
                stages = stage_means(before, scrape(server.base_url))
                summary = summarize(samples)
                result.levels.append(LevelResult(key, resolution, plan.rate, summary, stages, os.getloadavg()[0]))
                report(f"{system.label} {resolution}px {plan.rate:g} req/s offered: "
                       f"{summary.request_throughput:.2f} req/s, TTFT p90 {summary.ttft.p90 * 1000:.0f} ms, "
                       f"{summary.failed} failed of {summary.requests}")
    return answers


def run_bench(config: BenchConfig, report: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
              ) -> BenchResult:
    started = time.monotonic()
    raw = Path(config.out_dir) / "raw"
    result = BenchResult(config)
    checkpoints = prepare_checkpoints(config, report)
    datasets = prepare_datasets(config, raw, report)
    answers: dict[str, dict[int, list[GreedyAnswer]]] = {}
    for key in config.systems:
        try:
            answers[key] = run_system(key, config, checkpoints, datasets, result, raw, report)
        except (ServerStartError, LoadRunError, OSError) as error:
            result.failed_systems[key] = str(error).splitlines()[0]
            report(f"{SYSTEMS[key].label} failed: {error}")
    if "a" in answers:
        for key, by_resolution in answers.items():
            if key != "a":
                result.parity[key] = compare_answers(
                    [answer for resolution in config.resolutions for answer in answers["a"][resolution]],
                    [answer for resolution in config.resolutions for answer in by_resolution[resolution]],
                )
    result.wall_s = time.monotonic() - started
    return result


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 and math.isfinite(denominator) else math.nan
