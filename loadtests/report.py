"""The benchmark's markdown report, CSV rows and headline JSON, rendered from a `BenchResult`.

Headline rows are each system's highest offered rate per resolution (the most loaded level, as Table 18 of the
InternVL3.5 paper reports throughput under a fixed high offered load).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from dvd_serve.loadtests.bench import BenchResult, LevelResult, ratio
from dvd_serve.loadtests.metrics import write_json, write_rows_csv
from dvd_serve.loadtests.plots import plot_throughput_vs_ttft
from dvd_serve.loadtests.systems import SYSTEMS

STAGE_COLUMNS = (
    ("fetch_decode_ms", "fetch+decode ms/img"), ("preprocess_ms", "tiling ms/img"),
    ("vision_queue_ms", "vision queue ms/img"), ("encode_ms", "encode ms/batch"), ("batch_tiles", "tiles/batch"),
    ("transfer_ms", "transfer ms/req"), ("vision_ms", "vision ms/req"), ("lm_queue_ms", "LM queue ms/req"),
    ("inference_ms", "decode ms/req"), ("kept_token_share", "kept token share"),
    ("vllm_queue_ms", "vLLM queue ms"), ("vllm_prefill_ms", "vLLM prefill ms"), ("vllm_decode_ms", "vLLM decode ms"),
)


def headline_levels(result: BenchResult) -> list[LevelResult]:
    """Per resolution and system, the level at the highest offered rate."""
    rows = []
    for resolution in result.config.resolutions:
        top = max(result.config.rates_for(resolution))
        rows += [level for key in result.config.systems if (level := result.level(key, resolution, top))]
    return rows


def visual_tokens(result: BenchResult, level: LevelResult) -> tuple[float, bool]:
    """Visual tokens per request and whether they were derived rather than reported.

    vLLM reports none; for it they are its prompt tokens minus the text tokens of the same requests, the latter
    taken from a dvd-serve level at the same resolution and rate (prompt - visual tokens).
    """
    if math.isfinite(level.summary.mean_visual_tokens):
        return level.summary.mean_visual_tokens, False
    for key in ("c", "b", "d"):
        other = result.level(key, level.resolution, level.rate)
        if other is not None and math.isfinite(other.summary.mean_visual_tokens):
            text_tokens = other.summary.mean_prompt_tokens - other.summary.mean_visual_tokens
            return level.summary.mean_prompt_tokens - text_tokens, True
    return math.nan, False


def _ms(seconds: float) -> str:
    return "-" if not math.isfinite(seconds) else f"{seconds * 1000:.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def _num(value: float, digits: int = 2) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _three(distribution) -> str:
    return " / ".join(_ms(getattr(distribution, stat)) for stat in ("p50", "p90", "p99"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def headline_table(result: BenchResult) -> list[str]:
    settings = result.config.server
    rows = []
    for level in headline_levels(result):
        summary = level.summary
        base = {key: result.level(key, level.resolution, level.rate) for key in ("a", "b")}
        tokens, derived = visual_tokens(result, level)
        embedding = level.stages.get("embedding_bytes", math.nan)
        rows.append([
            str(level.resolution), SYSTEMS[level.system].label, f"{level.rate:g}",
            _num(summary.request_throughput), _num(summary.output_token_throughput, 1),
            _three(summary.ttft), _three(summary.tpot), _three(summary.e2e),
            _num(tokens, 0) + ("*" if derived else ""),
            "-" if not math.isfinite(embedding) else f"{embedding / 1024:.0f} KiB",
            *(_num(ratio(summary.request_throughput, base[key].summary.request_throughput)) if base[key] else "-"
              for key in ("a", "b")),
            f"{summary.failed}/{summary.requests}",
            f"{settings.cpus} / {SYSTEMS[level.system].gpus_used(settings)}",
        ])
    header = ["px", "system", "offered req/s", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
              "E2E p50/p90/p99 ms", "visual tok/req", "embedding/req", "x (a)", "x (b)", "failed", "cores / GPUs"]
    return _table(header, rows)


def stage_table(result: BenchResult) -> list[str]:
    levels = headline_levels(result)
    present = [(label, title) for label, title in STAGE_COLUMNS if any(label in level.stages for level in levels)]
    rows = [[str(level.resolution), SYSTEMS[level.system].label,
             *(_num(level.stages.get(label, math.nan), 3 if label == "kept_token_share" else 1)
               for label, _ in present)] for level in levels]
    return _table(["px", "system", *(title for _, title in present)], rows)


def levels_table(result: BenchResult) -> list[str]:
    rows = [[SYSTEMS[level.system].label, str(level.resolution), f"{level.rate:g}",
             _num(summary.request_throughput), _num(summary.output_token_throughput, 1), _ms(summary.ttft.p90),
             _ms(summary.e2e.p90), f"{summary.failed}/{summary.requests}", _num(level.load_average)]
            for level in result.levels if (summary := level.summary)]
    header = ["system", "px", "offered req/s", "req/s", "out tok/s", "TTFT p90 ms", "E2E p90 ms", "failed",
              "load avg after"]
    return _table(header, rows)


def parity_lines(result: BenchResult) -> list[str]:
    if not result.parity:
        return ["Not checked: (a) and at least one other system must run."]
    lines = []
    for key, parity in result.parity.items():
        verdict = "" if parity.passed else f"; FIRST DIFFERENCE: {parity.first_difference}"
        lines.append(f"- {SYSTEMS[key].label} vs (a): {parity.identical} of {parity.compared} greedy answers "
                     f"identical{verdict}")
    return lines


def markdown(result: BenchResult, facts: Mapping[str, str]) -> str:
    config = result.config
    lines = [
        f"## Ablation: vLLM monolithic vs dvd-serve coupled / DvD / DvD + ViR ({config.shape} shape)", "",
        "Machine and software: " + ", ".join(f"{key} {value}" for key, value in facts.items()) + ".", "",
        f"Workload: seed {config.seed}; open-loop Poisson arrivals for {config.duration_s:g} s per level; "
        f"{config.images_per_request} image(s) per request, {config.text_only_share:.0%} text-only; "
        f"{config.max_tokens} output tokens (temperature 0, ignore_eos, logprobs on, so TTFT is the first streamed "
        f"token even where random weights produce no text yet); square synthetic PNG data URLs; "
        + (f"{config.repeated_image_share:.0%} of the requests with images resend an earlier request's images "
           "(same level), each request's text distinct. " if config.repeated_image_share
           else "every request distinct. ")
        + f"Engines: dtype {config.server.dtype}, max_model_len {config.server.max_model_len}, "
        f"max_num_seqs {config.server.max_num_seqs}. Server start-up: "
        + ", ".join(f"{SYSTEMS[key].label} {seconds:.0f} s" for key, seconds in result.startup_s.items())
        + f". Whole run: {result.wall_s / 60:.1f} min.", "",
        "Headline (each system at the highest offered rate of the resolution; x (a) / x (b) = req/s ratios):", "",
        *headline_table(result), "",
        "`*` derived: vLLM reports no visual tokens; prompt tokens minus the text tokens of the same requests. "
        "Embedding/req: bytes of image embeddings handed to the LM (coupled: in-process, not sent).", "",
        "Where the time goes (means over the same levels, from each server's /metrics):", "",
        *stage_table(result), "",
        "Greedy parity (same requests, temperature 0, detail=high; prompt and completion token counts, text, and "
        "every chosen token's logprob within 1e-3):", "",
        *parity_lines(result), "",
        "Placement:", "",
        *(f"- {SYSTEMS[key].label}: {SYSTEMS[key].placement(config.server)}" for key in config.systems), "",
    ]
    if result.failed_systems:
        lines += ["Systems that did not complete:", "",
                  *(f"- {SYSTEMS[key].label}: {why}" for key, why in result.failed_systems.items()), ""]
    lines += ["All levels (load avg: the machine's 1-minute load average right after the level, this benchmark's "
              "own processes included; the machine has other users):", "", *levels_table(result), ""]
    return "\n".join(lines)


def level_rows(result: BenchResult) -> list[dict]:
    """One flat row per level (summary and stage means), for CSV."""
    return [{"system": level.system, "resolution": level.resolution, "offered_rate": level.rate,
             "load_average": level.load_average, **level.summary.flat(), **{f"stage_{name}": value for name, value in level.stages.items()}}
            for level in result.levels]


def headline_json(result: BenchResult) -> dict:
    """Per resolution: req/s of each system and the ratios the issue asks about."""
    document: dict = {"passed": result.passed, "parity": {key: p.passed for key, p in result.parity.items()}}
    for resolution in result.config.resolutions:
        top = max(result.config.rates_for(resolution))
        rps = {key: level.summary.request_throughput
               for key in result.config.systems if (level := result.level(key, resolution, top))}
        entry: dict = {"offered_rate": top, "req_per_s": rps}
        for key in ("c", "d"):
            for base in ("a", "b"):
                if key in rps and base in rps:
                    entry[f"{key}_over_{base}"] = round(ratio(rps[key], rps[base]), 3)
        document[str(resolution)] = entry
    return document


def save_results(result: BenchResult, facts: Mapping[str, str]) -> dict[str, str]:
    """Writes bench.md, levels.csv, bench.json and the plots into the run's out_dir; returns what went where."""
    out = Path(result.config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "bench.md"
    report.write_text(markdown(result, facts), encoding="utf-8")
    document = {"facts": dict(facts), "config": result.config.model_dump(mode="json"),
                "headline": headline_json(result), "startup_s": result.startup_s, "wall_s": result.wall_s,
                "failed_systems": result.failed_systems, "parity": result.parity, "levels": result.levels}
    paths = {"report": report, "levels_csv": write_rows_csv(level_rows(result), out / "levels.csv"),
             "json": write_json(document, out / "bench.json")}
    for index, plot in enumerate(plot_throughput_vs_ttft(result, out / "plots")):
        paths[f"plot_{index}"] = plot
    return {name: str(path) for name, path in paths.items()}
