"""Raw per-request samples and the exact statistics computed from them (no histogram buckets anywhere).

Definitions (as `vllm bench serve` and the peers use them):
- TTFT: request sent -> first streamed chunk with non-empty `content` (or, for requests that ask for logprobs, with
  the first token's logprob: see `stream.py`).
- TPOT: (E2E - TTFT) / (output tokens - 1), per request, for requests with at least two output tokens.
- E2E: request sent -> end of the stream (`data: [DONE]`).
- Percentiles: linear interpolation between the two nearest ranks of the sorted raw values (numpy's default).
- Throughput: successful requests (and their output tokens) / the span from the first send to the last end.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

OK = "ok"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RequestSample:
    """What one request did, as the load generator saw it."""

    request_index: int  # line of the dataset file it came from
    start_s: float  # wall clock (epoch seconds) when it was sent
    e2e_s: float  # sent -> stream end, or -> failure
    ttft_s: float | None  # sent -> first output (content, or a logprob entry); None if none arrived
    output_tokens: int  # `usage.completion_tokens`, else the number of content chunks
    prompt_tokens: int  # `usage.prompt_tokens`, 0 when the server did not report it
    status: str  # "ok", "http_<code>", "stream_error", "connection_error", "timeout", "client_error", "incomplete"
    error: str = ""
    visual_tokens: int | None = None  # from the `x-dvd-visual-tokens` header when the server sends it

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "RequestSample":
        return cls(**json.loads(line))


@dataclass(frozen=True, slots=True)
class Distribution:
    """Exact summary of one latency: mean and percentiles (seconds); NaN when there is no value."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Distribution":
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(values)
        p50, p90, p99 = (exact_percentile(ordered, q, presorted=True) for q in PERCENTILES)
        return cls(len(ordered), math.fsum(ordered) / len(ordered), p50, p90, p99)


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """One load run, computed from its raw samples."""

    requests: int
    succeeded: int
    failed: int
    fail_ratio: float
    without_output: int  # succeeded requests whose stream carried no output chunk (no TTFT)
    duration_s: float
    request_throughput: float  # successful requests / s
    output_token_throughput: float  # output tokens of successful requests / s
    mean_output_tokens: float
    mean_prompt_tokens: float
    mean_visual_tokens: float  # NaN when the server reports no visual tokens
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    failures: dict[str, int]  # status -> count

    def flat(self) -> dict[str, float | int]:
        """Scalar fields and `<latency>_<stat>_ms` columns, for CSV rows and tables."""
        row: dict[str, float | int] = {
            name: getattr(self, name)
            for name in ("requests", "succeeded", "failed", "fail_ratio", "without_output", "duration_s",
                         "request_throughput", "output_token_throughput", "mean_output_tokens",
                         "mean_prompt_tokens", "mean_visual_tokens")
        }
        for name in ("ttft", "tpot", "e2e"):
            distribution: Distribution = getattr(self, name)
            for stat in ("mean", "p50", "p90", "p99"):
                row[f"{name}_{stat}_ms"] = getattr(distribution, stat) * 1000.0
        return row


def exact_percentile(values: Sequence[float], q: float, presorted: bool = False) -> float:
    """The q-th percentile (0..100) of `values`, interpolating linearly between closest ranks."""
    if not values:
        raise ValueError("no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must lie in [0, 100]")
    ordered = values if presorted else sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def summarize(samples: Sequence[RequestSample]) -> LoadSummary:
    succeeded = [sample for sample in samples if sample.ok]
    failures: dict[str, int] = {}
    for sample in samples:
        if not sample.ok:
            failures[sample.status] = failures.get(sample.status, 0) + 1
    duration = (max(s.end_s for s in samples) - min(s.start_s for s in samples)) if samples else 0.0
    output_tokens = sum(s.output_tokens for s in succeeded)
    visual = [s.visual_tokens for s in succeeded if s.visual_tokens is not None]
    return LoadSummary(
        requests=len(samples),
        succeeded=len(succeeded),
        failed=len(samples) - len(succeeded),
        fail_ratio=(len(samples) - len(succeeded)) / len(samples) if samples else 0.0,
        without_output=sum(1 for s in succeeded if s.ttft_s is None),
        duration_s=duration,
        request_throughput=len(succeeded) / duration if duration > 0 else 0.0,
        output_token_throughput=output_tokens / duration if duration > 0 else 0.0,
        mean_output_tokens=_mean([s.output_tokens for s in succeeded]),
        mean_prompt_tokens=_mean([s.prompt_tokens for s in succeeded]),
        mean_visual_tokens=_mean(visual),
        ttft=Distribution.of([s.ttft_s for s in succeeded if s.ttft_s is not None]),
        tpot=Distribution.of([t for s in succeeded if (t := s.tpot_s) is not None]),
        e2e=Distribution.of([s.e2e_s for s in succeeded]),
        failures=failures,
    )


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def exit_code(summary: LoadSummary, max_fail_ratio: float) -> int:
    """0 when at least one request ran and the failed share is at most `max_fail_ratio`, else 1."""
    if summary.requests == 0 or summary.fail_ratio > max_fail_ratio:
        return 1
    return 0


def read_samples(path: Path) -> list[RequestSample]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as source:
        return [RequestSample.from_json(line) for line in source if line.strip()]


def write_samples_csv(samples: Iterable[RequestSample], path: Path) -> Path:
    fields = [field.name for field in dataclasses.fields(RequestSample)] + ["tpot_s"]
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for sample in samples:
            writer.writerow({**dataclasses.asdict(sample), "tpot_s": sample.tpot_s})
    return path


def write_rows_csv(rows: Sequence[dict], path: Path) -> Path:
    """Rows of scalars (e.g. `LoadSummary.flat()` plus labels) under the union of their keys, in first-seen order."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(document: object, path: Path) -> Path:
    """`document` (dataclasses allowed) as indented JSON; NaN becomes null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(document), indent=2) + "\n", encoding="utf-8")
    return path


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
