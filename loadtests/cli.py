"""`python -m dvd_serve.loadtests`: one load level against a running OpenAI-compatible server.

    python -m dvd_serve.loadtests --url http://127.0.0.1:8000 --resolution 896 --images-per-request 2 \\
        --text-only-share 0.2 --mode poisson --rate 4 --duration 30 --max-fail-ratio 0.01 --out load-896

Builds the seeded dataset, runs locust in a subprocess, and writes into --out: samples.csv (one row per request),
summary.json and summary.csv (exact percentiles from the raw samples). Prints the summary and, last, one JSON line.
Exit status: 0 if the failed share is at most --max-fail-ratio (and a request ran), 1 if not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from dvd_serve.loadtests.datasets import WorkloadConfig, poisson_arrivals, write_dataset
from dvd_serve.loadtests.metrics import (
    exit_code,
    summarize,
    write_json,
    write_rows_csv,
    write_samples_csv,
)
from dvd_serve.loadtests.runner import LoadRunConfig, LoadRunError, run_load, served_model

DEFAULT_CLOSED_LOOP_REQUESTS = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dvd_serve.loadtests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", help="bearer key")
    parser.add_argument("--resolution", type=int, default=448, help="square image side in px (default 448)")
    parser.add_argument("--images-per-request", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--text-only-share", type=float, default=0.0, help="share of requests without images")
    parser.add_argument("--detail", choices=("auto", "low", "high"), help="image_url.detail of every image")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--logprobs", action="store_true",
                        help="ask for logprobs: TTFT then times the first token even before it is text")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    parser.add_argument("--num-requests", type=int,
                        help="distinct requests (default: the arrivals of a poisson run, else 256; reused in a loop)")
    parser.add_argument("--mode", choices=("poisson", "concurrency"), default="poisson",
                        help="open-loop Poisson arrivals, or a fixed number of requests in flight")
    parser.add_argument("--rate", type=float, default=1.0, help="poisson: mean arrivals per second")
    parser.add_argument("--concurrency", type=int, default=1, help="concurrency: requests in flight")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds during which requests start")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds running requests may finish")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="most seconds per request")
    parser.add_argument("--max-fail-ratio", type=float, default=0.0, help="failed share that still exits 0")
    parser.add_argument("--out", default="loadtest-results", help="output folder (default loadtest-results)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        requests = args.num_requests or (
            len(poisson_arrivals(args.rate, args.duration, args.seed)) if args.mode == "poisson"
            else DEFAULT_CLOSED_LOOP_REQUESTS
        )
        workload = WorkloadConfig(
            resolution=args.resolution, images_per_request=args.images_per_request,
            text_only_share=args.text_only_share, num_requests=max(requests, 1), max_tokens=args.max_tokens,
            temperature=args.temperature, detail=args.detail, seed=args.seed, logprobs=args.logprobs,
        )
        run = LoadRunConfig(
            base_url=args.url, model=args.model or served_model(args.url, args.api_key), api_key=args.api_key,
            mode=args.mode, rate=args.rate, concurrency=args.concurrency, duration_s=args.duration,
            drain_timeout_s=args.drain_timeout, request_timeout_s=args.request_timeout, arrival_seed=args.seed,
        )
    except (ValidationError, ValueError, OSError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    dataset = write_dataset(workload, out / "dataset.jsonl")
    try:
        samples = run_load(run, dataset, out / "samples.jsonl")
    except LoadRunError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 1
    summary = summarize(samples)
    labels = {"mode": args.mode, "offered": args.rate if args.mode == "poisson" else args.concurrency,
              "resolution": args.resolution}
    write_samples_csv(samples, out / "samples.csv")
    write_json({**labels, "summary": summary}, out / "summary.json")
    write_rows_csv([{**labels, **summary.flat()}], out / "summary.csv")
    _print_summary(summary)
    status = exit_code(summary, args.max_fail_ratio)
    print(json.dumps({**labels, **{key: round(value, 4) for key, value in summary.flat().items()},
                      "exit_code": status}))
    return status


def _print_summary(summary) -> None:
    print(f"requests {summary.requests}, failed {summary.failed} ({summary.fail_ratio:.2%}) {summary.failures}")
    print(f"throughput {summary.request_throughput:.3f} req/s, {summary.output_token_throughput:.1f} output tok/s "
          f"over {summary.duration_s:.1f} s")
    for name in ("ttft", "tpot", "e2e"):
        distribution = getattr(summary, name)
        print(f"{name.upper():>5} ms  mean {distribution.mean * 1000:8.1f}  p50 {distribution.p50 * 1000:8.1f}  "
              f"p90 {distribution.p90 * 1000:8.1f}  p99 {distribution.p99 * 1000:8.1f}  (n={distribution.count})")


if __name__ == "__main__":
    sys.exit(main())
