"""dvd-serve (DvD topology) against vLLM's own OpenAI server, both driven by vLLM's own benchmark client.

    python -m dvd_serve.loadtests.benchmarks.vs_vllm --out vs-vllm            # every workload, concurrency 8 and 32
    python -m dvd_serve.loadtests.benchmarks.vs_vllm --workloads text --concurrency 32 --num-prompts 400

One invocation generates the checkpoint, then starts each server in turn on the same cores and runs the same seeded
workloads against it with `vllm.benchmarks.serve` (`--backend openai-chat --ignore-eos --request-rate inf`, greedy).
Printed per level: req/s, TTFT/TPOT/E2E p50/p99 (the client's own numbers) and the ratio dvd-serve / vLLM, plus the
CPU seconds each process group spent per request (from /proc, summed over the level), and for dvd-serve where a
streamed token's time goes between the language engine and the response (the means of the gateway's
`dvd_token_path_seconds` hops over the level). Writes `vs_vllm.json` and `vs_vllm.md` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from dvd_serve.loadtests.bench import BenchConfig, prepare_checkpoints, ratio
from dvd_serve.loadtests.machine import machine_facts
from dvd_serve.loadtests.soak_processes import ServingProcesses
from dvd_serve.loadtests.systems import SYSTEMS, ServerProcess, ServerSettings, free_port

START_TIMEOUT_S = 600.0
WARMUP_PROMPTS = 16
# Client-side numbers copied from vLLM's result JSON: (our label, its key).
CLIENT_METRICS = (
    ("req_s", "request_throughput"), ("out_tok_s", "output_throughput"),
    ("ttft_p50_ms", "median_ttft_ms"), ("ttft_p99_ms", "p99_ttft_ms"),
    ("tpot_p50_ms", "median_tpot_ms"), ("tpot_p99_ms", "p99_tpot_ms"),
    ("e2e_p50_ms", "median_e2el_ms"), ("e2e_p99_ms", "p99_e2el_ms"),
)


@dataclass(frozen=True, slots=True)
class Workload:
    """One request mix in vLLM's benchmark client's terms."""

    name: str
    client_args: tuple[str, ...]


def workloads(input_len: int, output_len: int) -> dict[str, Workload]:
    common = ("--random-input-len", str(input_len), "--random-output-len", str(output_len),
              "--random-range-ratio", "0")

    def one_image(side: int) -> Workload:
        return Workload(f"image{side}", (
            "--dataset-name", "random-mm", *common, "--random-mm-base-items-per-request", "1",
            "--random-mm-num-mm-items-range-ratio", "0",
            "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
            "--random-mm-bucket-config", f"{{({side}, {side}, 1): 1.0}}",
        ))

    text = Workload("text", ("--dataset-name", "random", *common))
    return {"text": text, "image448": one_image(448), "image896": one_image(896)}


@dataclass(slots=True)
class LevelResult:
    system: str
    workload: str
    concurrency: int
    num_prompts: int
    completed: int
    failed: int
    client: dict[str, float]
    cpu_s_per_request: dict[str, float] = field(default_factory=dict)
    token_path_ms: dict[str, float] = field(default_factory=dict)  # mean per hop of the level (dvd-serve only)


class CpuMeter:
    """CPU seconds (user + system) per process group of one server's process tree, between two readings."""

    def __init__(self, root_pid: int, dvd: bool) -> None:
        self._root = psutil.Process(root_pid)
        self._dvd = ServingProcesses(root_pid) if dvd else None

    def read(self) -> dict[int, tuple[str, float]]:
        """pid -> (group label, CPU seconds so far)."""
        readings: dict[int, tuple[str, float]] = {}
        for label, process in self._labelled():
            try:
                times = process.cpu_times()
                readings[process.pid] = (label, times.user + times.system)
            except psutil.Error:
                continue
        return readings

    def _labelled(self):
        if self._dvd is not None:
            for group, processes in self._dvd.groups().items():
                for process in processes:
                    yield _dvd_label(group, process), process
            return
        yield "api server", self._root
        for child in self._root.children(recursive=True):
            yield _process_name(child), child


def _process_name(process: psutil.Process) -> str:
    try:
        return process.name() or "other"
    except psutil.Error:
        return "other"


def _dvd_label(group: str, process: psutil.Process) -> str:
    """`language` for the actor itself, `language/<name>` for processes it started (vLLM's engine core...)."""
    if group in ("gateway", "ray", "orphaned"):
        return group
    name = _process_name(process)
    return group if name.startswith("ray::") else f"{group}/{name}"


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per label spent between the two readings (processes born in between count from zero)."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (label, total) in after.items():
        spent[label] += total - before.get(pid, (label, 0.0))[1]
    return dict(spent)


TOKEN_PATH_SERIES = "dvd_token_path_seconds"


def token_path_totals(base_url: str) -> dict[str, tuple[float, float]]:
    """hop -> (seconds summed, deltas counted) of the gateway's token-path histogram so far ({} for vLLM)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        if family.name != TOKEN_PATH_SERIES:
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                totals[sample.labels["hop"]][0] += sample.value
            elif sample.name.endswith("_count"):
                totals[sample.labels["hop"]][1] += sample.value
    return {hop: (total, count) for hop, (total, count) in totals.items()}


def token_path_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds per hop between two readings; `gateway` = response - replica - transport."""
    means = {}
    for hop, (total, count) in after.items():
        seconds, deltas = total - before.get(hop, (0.0, 0.0))[0], count - before.get(hop, (0.0, 0.0))[1]
        if deltas > 0:
            means[hop] = seconds / deltas * 1000
    if {"response", "replica", "transport"} <= set(means):
        means["gateway"] = means["response"] - means["replica"] - means["transport"]
    return means


def served_model(base_url: str) -> str:
    """The first model id the server lists: what requests must name."""
    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def run_client(base_url: str, served_name: str, model: Path, workload: Workload, concurrency: int,
               num_prompts: int, seed: int, result_dir: Path) -> dict:
    """One level of vLLM's own benchmark client, in this process; its result JSON."""
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    result_dir.mkdir(parents=True, exist_ok=True)
    args = parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
        "--model", str(model), "--served-model-name", served_name, "--tokenizer", str(model), "--trust-remote-code",
        *workload.client_args,
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", "result.json", "--disable-tqdm",
    ])
    return vllm_bench.main(args)


def run_system(key: str, model: Path, settings: ServerSettings, plan: Sequence[tuple[Workload, int]],
               num_prompts: int, seed: int, out: Path) -> list[LevelResult]:
    spec = SYSTEMS[key]
    port = free_port()
    name = "vllm" if key == "a" else "dvd-serve"
    results = []
    with ServerProcess(spec.label, spec.command(model, port, settings), port, spec.ready_path,
                       out / "logs" / f"{name}.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        ready_s = server.start(START_TIMEOUT_S)
        print(f"{name}: ready in {ready_s:.1f} s", file=sys.stderr)
        served_name = served_model(server.base_url)
        meter = CpuMeter(server.process.pid, dvd=key != "a")
        for workload, concurrency in plan:
            run_client(server.base_url, served_name, model, workload, concurrency, WARMUP_PROMPTS, seed + 1,
                       out / "raw" / name / "warmup")
            before = meter.read()
            path_before = token_path_totals(server.base_url)
            raw = run_client(server.base_url, served_name, model, workload, concurrency, num_prompts, seed,
                             out / "raw" / name / f"{workload.name}-c{concurrency}")
            after = meter.read()
            path_after = token_path_totals(server.base_url)
            completed = int(raw.get("completed", 0))
            level = LevelResult(
                name, workload.name, concurrency, num_prompts, completed, int(raw.get("failed", 0) or 0),
                {label: float(raw.get(source) or 0.0) for label, source in CLIENT_METRICS},
            )
            if completed:
                level.cpu_s_per_request = {label: seconds / completed
                                           for label, seconds in sorted(cpu_delta(before, after).items())}
            level.token_path_ms = token_path_means_ms(path_before, path_after)
            print(_level_line(level), file=sys.stderr)
            results.append(level)
    return results


def _level_line(level: LevelResult) -> str:
    c = level.client
    return (f"{level.system:9} {level.workload:9} c={level.concurrency:<3} {c['req_s']:7.1f} req/s  "
            f"TTFT p50 {c['ttft_p50_ms']:7.1f} ms  TPOT p50 {c['tpot_p50_ms']:6.1f} ms  "
            f"E2E p50 {c['e2e_p50_ms']:7.1f} ms  failed {level.failed}")


def report(results: list[LevelResult], facts: dict, wall_s: float) -> str:
    by_key = {(r.system, r.workload, r.concurrency): r for r in results}
    lines = [
        f"Machine: {facts.get('cpu', '?')}, {facts.get('cores', '?')} cores; vLLM {_vllm_version(facts)}; "
        f"measured {facts.get('date_utc', '?')} UTC, {wall_s / 60:.1f} min in all.", "",
        "| workload | conc. | vLLM req/s | dvd req/s | ratio | TTFT p50 vLLM / dvd (ms) | TPOT p50 vLLM / dvd (ms) "
        "| E2E p99 vLLM / dvd (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (system, workload, concurrency), dvd in by_key.items():
        if system != "dvd-serve" or (ref := by_key.get(("vllm", workload, concurrency))) is None:
            continue
        v, d = ref.client, dvd.client
        lines.append(
            f"| {workload} | {concurrency} | {v['req_s']:.1f} | {d['req_s']:.1f} | {ratio(d['req_s'], v['req_s']):.2f}x "
            f"| {v['ttft_p50_ms']:.1f} / {d['ttft_p50_ms']:.1f} | {v['tpot_p50_ms']:.2f} / {d['tpot_p50_ms']:.2f} "
            f"| {v['e2e_p99_ms']:.0f} / {d['e2e_p99_ms']:.0f} |")
    lines += ["", "CPU seconds per request, by process group (milliseconds):", ""]
    for r in results:
        groups = ", ".join(f"{label} {seconds * 1000:.1f}" for label, seconds in r.cpu_s_per_request.items()
                           if seconds * 1000 >= 0.05)
        lines.append(f"- {r.system} {r.workload} c={r.concurrency}: {groups}")
    lines += ["", "Where a streamed token's time goes after the engine produced it, dvd-serve (mean ms per delta):", ""]
    for r in results:
        if r.token_path_ms:
            hops = ", ".join(f"{hop} {r.token_path_ms[hop]:.2f}" for hop in ("replica", "transport", "gateway",
                                                                            "response") if hop in r.token_path_ms)
            lines.append(f"- {r.workload} c={r.concurrency}: {hops}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="vs-vllm-results", help="output folder")
    parser.add_argument("--shape", default="tiny", help="checkpoint shape (make-checkpoint --shape)")
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of generating one")
    parser.add_argument("--workloads", default="text,image448,image896", help="comma list of text,image448,image896")
    parser.add_argument("--concurrency", default="8,32", help="comma list of client concurrencies")
    parser.add_argument("--num-prompts", type=int, default=200, help="requests per level")
    parser.add_argument("--input-len", type=int, default=64, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=16, help="output tokens per request (--ignore-eos)")
    parser.add_argument("--seed", type=int, default=0, help="checkpoint and workload seed")
    parser.add_argument("--systems", default="a,c", help="a = vLLM's own server, c = dvd-serve DvD")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = Path(args.checkpoint) if args.checkpoint else prepare_checkpoints(
        BenchConfig(shape=args.shape, seed=args.seed, systems=("a", "c")), lambda line: print(line, file=sys.stderr)
    )["chat"]
    known = workloads(args.input_len, args.output_len)
    plan = [(known[name], int(c)) for name in args.workloads.split(",") for c in args.concurrency.split(",")]
    settings = ServerSettings(max_num_seqs=max(64, max(c for _, c in plan)))
    results: list[LevelResult] = []
    for key in args.systems.split(","):
        results += run_system(key, model, settings, plan, args.num_prompts, args.seed, out)
    wall_s = time.monotonic() - started
    facts = machine_facts()
    (out / "vs_vllm.json").write_text(json.dumps(
        {"machine": facts, "args": vars(args), "levels": [asdict(r) for r in results]}, indent=2))
    text = report(results, facts, wall_s)
    (out / "vs_vllm.md").write_text(text)
    print(text)
    return 0 if all(r.failed == 0 and r.completed == r.num_prompts for r in results) else 1


def _vllm_version(facts: dict) -> str:
    return next((f"{name} {version}" for name, version in facts.items() if name.startswith("vllm")), "?")


if __name__ == "__main__":
    sys.exit(main())
