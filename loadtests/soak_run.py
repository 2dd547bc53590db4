"""One bounded soak: steady mixed load with hang-ups against a dvd-serve gateway while its workers get SIGKILLed.

Sequence: write the seeded datasets; start `dvd-serve serve` (DvD topology, tiny default checkpoint unless `model`
is set, `vision_replicas` vision replicas) or attach to `url`; send a few warm-up requests; read every process
group's resources and the gateway's counters; then for `duration_s` at once: the open-loop locust load (image and
text-only streaming requests), the hang-up clients, the seeded kills and a resource sample every
`sample_interval_s`; then let the load drain, wait until `/ready` (Ray restarts killed actors), wait until the
in-flight gauges are 0, and read the resources and counters again. A server the soak started is stopped at the end;
its replicas sample their own memory into `memory/` (see `common/process_memory.py`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import Field, field_validator

from dvd_serve.common.config import FrozenConfig
from dvd_serve.loadtests.datasets import WorkloadConfig, poisson_arrivals, read_dataset, with_model, write_dataset
from dvd_serve.loadtests.metrics import RequestSample, read_samples, write_rows_csv, write_samples_csv
from dvd_serve.loadtests.parity import greedy_answer
from dvd_serve.loadtests.runner import LoadRunConfig, LoadRunError, run_load, served_model
from dvd_serve.loadtests.soak_accounting import (
    Check,
    OutcomeCounts,
    client_counts,
    error_causes,
    failed_before_streaming,
    gateway_counts,
    identity_checks,
)
from dvd_serve.loadtests.soak_gateway import GatewayScrape, counter_delta, in_flight_check, scrape_gateway
from dvd_serve.loadtests.soak_hangups import HangUpClient, hang_up_delays, run_hang_ups
from dvd_serve.loadtests.soak_processes import (
    ACTOR_CLASSES,
    GroupUsage,
    Kill,
    ServingProcesses,
    WorkerKiller,
    kill_times,
    session_processes,
)
from dvd_serve.loadtests.systems import SYSTEMS, ServerProcess, ServerSettings, free_port

POLL_S = 1.0
HANG_UP_THREADS = 32


class SoakConfig(FrozenConfig):
    """One soak run: the server, the load, the kills and how long the end state may take to settle."""

    url: str | None = Field(default=None, description="Attach to this running gateway; None = start one.")
    api_key: str | None = Field(default=None, description="Bearer key of an attached gateway.")
    gateway_pid: int | None = Field(
        default=None, description="Pid of the attached gateway; None = the process listening on the URL's port.",
    )
    model: str | None = Field(default=None, description="Checkpoint of a started server; None = the tiny default.")
    vision_replicas: int = Field(default=2, ge=1, description="Vision replicas of a started server.")
    language_replicas: int = Field(default=1, ge=1, description="Language replicas of a started server.")
    duration_s: float = Field(default=120.0, gt=0, description="Seconds during which requests start and kills happen.")
    rate: float = Field(default=1.0, gt=0, description="Mean arrivals/s of the steady open-loop load.")
    hang_up_rate: float = Field(default=0.2, gt=0, description="Mean arrivals/s of requests whose client hangs up.")
    hang_up_after_s: tuple[float, float] = Field(
        default=(0.2, 3.0), description="Range of the seeded wait after which a hang-up client leaves without output.",
    )
    resolution: int = Field(default=448, ge=28, description="Side in pixels of every image.")
    images_per_request: int = Field(default=1, ge=1, description="Images in a request that has images.")
    text_only_share: float = Field(default=0.3, ge=0, le=1, description="Share of text-only requests.")
    repeated_image_share: float = Field(
        default=0.0, ge=0, le=1,
        description="Share of requests with images that resend an earlier request's images (cache hits mixed with "
        "new images; the vision caches must stay within vision_cache_mib throughout).",
    )
    vision_cache_mib: float = Field(
        default=1024.0, ge=0,
        description="Embedding cache budget per vision replica: passed to a started server, and the bound the "
        "sampled cache sizes are checked against (for an attached server, give what it was started with).",
    )
    max_tokens: int = Field(default=32, ge=1, description="Output tokens of a steady-load request.")
    hang_up_max_tokens: int = Field(
        default=256, ge=1, description="Output tokens a hang-up request asks for (long, so it is still running).",
    )
    kill_roles: tuple[str, ...] = Field(
        default=("vision", "language"), description="Actor roles whose processes may be killed; empty = no kills.",
    )
    kill_interval_s: float = Field(default=30.0, gt=0, description="Mean seconds between kills (exponential gaps).")
    kill_warmup_s: float = Field(default=10.0, ge=0, description="Seconds of load before the first kill may come.")
    drain_timeout_s: float = Field(default=120.0, ge=0, description="Seconds running requests may finish after.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Most seconds one steady-load request may take.")
    recovery_timeout_s: float = Field(default=300.0, ge=0, description="Seconds to wait for `/ready` after the load.")
    settle_timeout_s: float = Field(default=30.0, ge=0, description="Seconds the in-flight gauges may take to reach 0.")
    sample_interval_s: float = Field(default=10.0, gt=0, description="Seconds between resource samples.")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="Seconds a started server may take to be ready.")
    warmup_requests: int = Field(
        default=4, ge=0, description="Complete requests sent before the start readings (not counted in the soak).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of datasets, arrivals, hang-up delays and kills.")
    out_dir: str = Field(default="soak-results", description="Folder for datasets, samples, resources and the result.")

    @field_validator("kill_roles")
    @classmethod
    def _known_roles(cls, roles: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(roles) - set(ACTOR_CLASSES))
        if unknown:
            raise ValueError(f"kill roles must be among {tuple(ACTOR_CLASSES)}; got {unknown}")
        return roles

    @field_validator("hang_up_after_s")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError("hang_up_after_s must be (shortest, longest) with 0 < shortest <= longest")
        return bounds

    def workload(self, num_requests: int) -> WorkloadConfig:
        return WorkloadConfig(
            resolution=self.resolution, images_per_request=self.images_per_request,
            text_only_share=self.text_only_share, repeated_image_share=self.repeated_image_share,
            num_requests=max(num_requests, 1), max_tokens=self.max_tokens, seed=self.seed,
        )

    def hang_up_workload(self, num_requests: int) -> WorkloadConfig:
        """Logprobs on: random weights may produce no text for a while, the first token still counts as output."""
        return self.workload(num_requests).model_copy(
            update={"max_tokens": self.hang_up_max_tokens, "logprobs": True, "seed": self.seed + 1}
        )


@dataclass
class SoakResult:
    config: SoakConfig
    steady: OutcomeCounts
    hang_ups: OutcomeCounts
    clients: OutcomeCounts
    gateway: OutcomeCounts | None
    checks: list[Check]
    kills: list[Kill]
    usage_start: dict[str, GroupUsage]
    usage_end: dict[str, GroupUsage]
    actor_pids_start: dict[str, list[int]]
    actor_pids_end: dict[str, list[int]]
    recovered_after_s: float | None  # seconds after the load until /ready answered 200; None = never
    wall_s: float
    error_causes: dict[str, int] = field(default_factory=dict)  # failed requests by status and code
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


class SoakError(RuntimeError):
    """The soak could not run (no server, no gateway process): not a finding about the server."""


def run_soak(config: SoakConfig, report: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
             ) -> SoakResult:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    server = None if config.url else _server(config, out)
    result: SoakResult | None = None
    try:
        if server is not None:
            report(f"starting dvd-serve ({config.vision_replicas} vision, {config.language_replicas} language)")
            report(f"ready after {server.start(config.startup_timeout_s):.0f} s")
        base_url = config.url or server.base_url
        gateway_pid = server.process.pid if server is not None else config.gateway_pid or _listening_pid(base_url)
        result = _soak(config, base_url, ServingProcesses(gateway_pid), out, report)
        return result
    finally:
        if server is not None:
            status = server.stop()
            left = session_processes(server.process.pid)
            report(f"server stopped with exit status {status}, {len(left)} process(es) of its session left")
            if result is not None:
                result.checks.append(Check("server stopped cleanly", status == 0 and not left,
                                           f"exit status {status}, {len(left)} process(es) of its session left"))


def _server(config: SoakConfig, out: Path) -> ServerProcess:
    from dvd_serve.server.default_model import ensure_default_model

    port = free_port()
    model = Path(config.model) if config.model else ensure_default_model()
    settings = ServerSettings(cpus=os.cpu_count() or 1, max_images_per_request=config.images_per_request)
    command = SYSTEMS["c"].command(model, port, settings) + [
        "--vision-replicas", str(config.vision_replicas), "--lm-replicas", str(config.language_replicas),
        "--memory-report", str((out / "memory").resolve()), "--vision-cache-mib", f"{config.vision_cache_mib:g}",
    ]
    return ServerProcess("dvd-serve", command, port, "/ready", out / "server.log")


def _listening_pid(base_url: str) -> int:
    port = urllib.parse.urlparse(base_url).port or 80
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    raise SoakError(f"no local process listens on port {port}: give the gateway's pid")


def _soak(config: SoakConfig, base_url: str, processes: ServingProcesses, out: Path,
          report: Callable[[str], None]) -> SoakResult:
    started = time.monotonic()
    model = served_model(base_url, config.api_key)
    _warm_up(config, base_url, model, out)
    usage_start, pids_start = processes.usage(), processes.actor_pids()
    before = scrape_gateway(base_url, config.api_key)
    load = _offer_load(config, base_url, model, processes, out, report)
    load_ended = time.monotonic()

    recovered = _wait_ready(base_url, config.recovery_timeout_s)
    recovered_after_s = None if recovered is None else recovered - load_ended
    report("ready again" if recovered is not None else f"not ready {config.recovery_timeout_s:g} s after the load")
    after = _settled_scrape(base_url, config.api_key, config.settle_timeout_s)
    usage_end, pids_end = processes.usage(), processes.actor_pids()

    clients = client_counts(load.steady.accepted + load.hang_ups.accepted, load.samples)
    gateway = gateway_counts(counter_delta(before.chat_statuses, after.chat_statuses),
                             counter_delta(before.stream_aborts, after.stream_aborts))
    checks = [*identity_checks(clients, gateway), in_flight_check(after),
              Check("ready after the load", recovered is not None,
                    f"/ready 200 after {recovered_after_s:.1f} s" if recovered is not None else "never")]
    checks.append(cache_budget_check(config, load.cache_rows, before, after))
    causes = error_causes(load.samples)
    if config.url is None and config.language_replicas >= 2:  # a request not yet streaming is retried elsewhere
        before_streaming = failed_before_streaming(causes)
        checks.append(Check("no server error before streaming", before_streaming == 0,
                            f"{before_streaming} request(s) got a 5xx before their stream started"))
    return SoakResult(config, load.steady, load.hang_ups, clients, gateway, checks, load.kills, usage_start, usage_end,
                      pids_start, pids_end, recovered_after_s, time.monotonic() - started, causes, load.notes)


def cache_budget_check(config: SoakConfig, cache_rows: list[dict], before: GatewayScrape,
                       after: GatewayScrape) -> Check:
    """Every sampled vision cache within its budget; with repeats asked for, they must also have hit."""
    peak = max((row["cache_mib"] for row in cache_rows), default=0.0)
    lookups = counter_delta(before.vision_cache_lookups, after.vision_cache_lookups)
    hits = lookups.get("hit", 0.0) + lookups.get("in_flight", 0.0)
    repeats_hit = hits > 0 or config.repeated_image_share == 0
    detail = (f"peak {peak:g} MiB of {config.vision_cache_mib:g} MiB per replica over {len(cache_rows)} samples; "
              f"lookups {lookups.get('hit', 0):g} hit / {lookups.get('miss', 0):g} miss / "
              f"{lookups.get('in_flight', 0):g} in flight")
    return Check("vision caches within budget", peak <= config.vision_cache_mib and repeats_hit, detail)


def _warm_up(config: SoakConfig, base_url: str, model: str, out: Path) -> None:
    """A few complete requests first, so the start readings are of warm processes (not counted in the soak)."""
    if not config.warmup_requests:
        return
    warm_up = config.workload(config.warmup_requests).model_copy(
        update={"stream": False, "logprobs": True, "seed": config.seed + 2, "text_only_share": 0.25})
    for body in read_dataset(write_dataset(warm_up, out / "warm-up.jsonl")):
        greedy_answer(base_url, model, body, config.api_key, timeout_s=config.request_timeout_s)


@dataclass
class _Load:
    steady: OutcomeCounts
    hang_ups: OutcomeCounts
    samples: list[RequestSample]
    kills: list[Kill]
    notes: list[str]
    cache_rows: list[dict]  # sampled sizes of the vision replicas' embedding caches


def _offer_load(config: SoakConfig, base_url: str, model: str, processes: ServingProcesses, out: Path,
                report: Callable[[str], None]) -> _Load:
    """Steady load, hang-ups, kills and resource samples at once, until every request has ended."""
    steady_arrivals = len(poisson_arrivals(config.rate, config.duration_s, config.seed))
    hang_up_arrivals = poisson_arrivals(config.hang_up_rate, config.duration_s, config.seed + 1)
    steady_dataset = write_dataset(config.workload(steady_arrivals), out / "steady.jsonl")
    hang_up_bodies = [with_model(body, model) for body in read_dataset(
        write_dataset(config.hang_up_workload(len(hang_up_arrivals)), out / "hang-ups.jsonl"))]
    delays = hang_up_delays(len(hang_up_arrivals), *config.hang_up_after_s, config.seed)
    report(f"load: {steady_arrivals} steady + {len(hang_up_arrivals)} hang-up requests over {config.duration_s:g} s")

    client = HangUpClient(base_url, config.api_key)
    sampler = _ResourceSampler(processes, config.sample_interval_s, lambda: scrape_gateway(base_url, config.api_key))
    steady = _Background(lambda: _steady_load(config, base_url, model, steady_dataset, out))
    hang_ups = _Background(
        lambda: (run_hang_ups(client, hang_up_bodies, hang_up_arrivals, delays, HANG_UP_THREADS), None))
    kills = _kill_on_schedule(config, processes, time.monotonic(), report)
    steady_samples, steady_error = steady.join()
    hang_up_samples, hang_up_error = hang_ups.join()
    client.close()
    sampler.stop()
    write_rows_csv(sampler.rows, out / "resources.csv")
    write_rows_csv(sampler.cache_rows, out / "vision-cache.csv")
    write_samples_csv(hang_up_samples, out / "hang-up-samples.csv")
    notes = [f"{name} failed: {error}" for name, error in (("steady load", steady_error), ("hang-ups", hang_up_error))
             if error]
    return _Load(client_counts(steady_arrivals, steady_samples), client_counts(len(hang_up_arrivals), hang_up_samples),
                 [*steady_samples, *hang_up_samples], kills, notes, sampler.cache_rows)


def _steady_load(config: SoakConfig, base_url: str, model: str, dataset: Path, out: Path
                 ) -> tuple[list[RequestSample], str | None]:
    """The open-loop locust load; if locust fails, the samples it logged so far and why it failed."""
    run = LoadRunConfig(
        base_url=base_url, model=model, api_key=config.api_key, mode="poisson", rate=config.rate,
        duration_s=config.duration_s, drain_timeout_s=config.drain_timeout_s,
        request_timeout_s=config.request_timeout_s, arrival_seed=config.seed,
    )
    samples = out / "steady-samples.jsonl"
    try:
        return run_load(run, dataset, samples), None
    except LoadRunError as error:
        return read_samples(samples), str(error).splitlines()[0]


class _Background:
    """Runs `work` on a thread; `join` returns its samples and the error it ended with, if any."""

    def __init__(self, work: Callable[[], tuple[list[RequestSample], str | None]]) -> None:
        self._work = work
        self._result: tuple[list[RequestSample], str | None] = ([], None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._work()
        except Exception as error:  # reported; the requests without samples break the identity
            self._result = ([], f"{type(error).__name__}: {error}")

    def join(self) -> tuple[list[RequestSample], str | None]:
        self._thread.join()
        return self._result


def _kill_on_schedule(config: SoakConfig, processes: ServingProcesses, load_started: float,
                      report: Callable[[str], None]) -> list[Kill]:
    if not config.kill_roles:
        return []
    killer = WorkerKiller(processes, config.kill_roles, config.seed)
    kills = []
    for at_s in kill_times(config.duration_s, config.kill_interval_s, config.kill_warmup_s, config.seed):
        time.sleep(max(0.0, load_started + at_s - time.monotonic()))
        kill = killer.kill_one(time.monotonic() - load_started)
        kills.append(kill)
        report(f"{kill.at_s:6.1f} s: " + (f"SIGKILL {kill.role} worker pid {kill.pid}" if kill.pid
                                           else f"no {kill.role} worker process to kill"))
    return kills


def _wait_ready(base_url: str, timeout_s: float) -> float | None:
    """`time.monotonic()` when `/ready` first answered 200, or None if it did not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/ready", timeout=10) as response:
                if response.status == 200:
                    return time.monotonic()
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def _settled_scrape(base_url: str, api_key: str | None, timeout_s: float) -> GatewayScrape:
    """The first scrape whose in-flight gauges are all 0, else the last one taken within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        scrape = scrape_gateway(base_url, api_key)
        if in_flight_check(scrape).passed or time.monotonic() >= deadline:
            return scrape
        time.sleep(POLL_S)


class _ResourceSampler:
    """Every `interval_s`, one row per process group and per half of each actor group (seconds since start,
    processes, RSS, fds, threads), and one per vision replica with what its embedding cache holds."""

    def __init__(self, processes: ServingProcesses, interval_s: float, scrape: Callable[[], GatewayScrape]) -> None:
        self.rows: list[dict] = []
        self.cache_rows: list[dict] = []
        self._scrape = scrape
        self._processes = processes
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            at_s = round(time.monotonic() - self._started, 1)
            for group, usage in {**self._processes.usage(), **self._processes.actor_split_usage()}.items():
                self.rows.append({"at_s": at_s, "group": group, "processes": usage.processes,
                                  "rss_mib": round(usage.rss_mib, 1), "open_fds": usage.open_fds,
                                  "threads": usage.threads})
            try:
                cache_bytes = self._scrape().vision_cache_bytes
            except OSError:  # the gateway is busy or restarting: the next sample counts
                cache_bytes = {}
            self.cache_rows += [{"at_s": at_s, "replica": replica, "cache_mib": round(held / 2**20, 2)}
                                for replica, held in sorted(cache_bytes.items())]
            if self._stopped.wait(self._interval_s):
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
