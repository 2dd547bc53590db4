"""`dvd-serve bench`: the ablation benchmark, (a) vLLM monolithic, (b) dvd-serve coupled, (c) DvD, (d) DvD + ViR.

One invocation generates the checkpoints (an original-format one and a Flash one from the same seed), then runs
the same seeded open-loop workload against each system in turn at every resolution and offered rate, checks that
(b), (c) and (d, detail=high) give (a)'s greedy tokens, and writes into --out: bench.md (tables), levels.csv and
bench.json (every level), plots/ (throughput vs TTFT p90) and raw/ (datasets, raw samples, server logs).
The last stdout line is JSON with the headline ratios. Exit status 0 only if every system ran, every level stayed
within --max-fail-ratio and every parity check passed.

    dvd-serve bench --out loadtests/results/tiny
    dvd-serve bench --shape 1b --checkpoint-dtype bfloat16 --resolutions 448 --rates 448=0.04,0.08 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

REPOSITORY = Path(__file__).resolve().parent.parent


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from dvd_serve.loadtests.bench import DEFAULT_RATES

    default_rates = " ".join(f"{px}={','.join(f'{r:g}' for r in rates)}" for px, rates in DEFAULT_RATES.items())
    parser = subparsers.add_parser(
        "bench", help="ablation benchmark against vLLM monolithic, coupled, DvD and DvD + ViR",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", default="tiny", help="checkpoint shape (tiny, 1b, 2b, 8b, 38b; default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and workload (default 0)")
    parser.add_argument("--systems", type=_keys, default=None, help="comma-separated among a,b,c,d (default all)")
    parser.add_argument("--resolutions", type=_ints, default=None, help="image sides, e.g. 448,896,1344")
    parser.add_argument("--rates", action="append", type=_rates, default=[], metavar="PX=R1,R2",
                        help=f"offered req/s of one resolution (repeatable; default {default_rates})")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per level (default 10)")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds a level may drain (default 60)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--images-per-request", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--text-only-share", type=float, default=0.0, help="share of text-only requests")
    parser.add_argument("--repeated-image-share", type=float, default=0.0,
                        help="share of requests with images that resend the images of an earlier request of the same "
                        "level (e.g. 0.5, 0.9; default 0: every image new)")
    parser.add_argument("--parity-requests", type=int, default=2, help="greedy parity requests per resolution")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="compute dtype of every system (default auto: bfloat16 with GPUs, else float32)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests an engine decodes together")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM CPU KV cache per engine (GiB)")
    parser.add_argument("--checkpoint-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype the generated checkpoints are stored in (default float32)")
    parser.add_argument("--checkpoint-dir", help="generate checkpoints here or reuse them (default: the cache)")
    parser.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    parser.add_argument("--max-fail-ratio", type=float, default=0.0, help="failed share a level may have")
    parser.set_defaults(run=run)
    return parser


def _keys(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _rates(text: str) -> tuple[int, tuple[float, ...]]:
    resolution, _, values = text.partition("=")
    try:
        rates = tuple(sorted(float(value) for value in values.split(",") if value.strip()))
        if not rates or min(rates) <= 0:
            raise ValueError
        return int(resolution), rates
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PX=R1,R2,... with rates > 0 (e.g. 896=1,2.5,5), got {text!r}") \
            from None


def config_from_args(args: argparse.Namespace):
    from dvd_serve.loadtests.bench import DEFAULT_RATES, BenchConfig
    from dvd_serve.loadtests.machine import gpu_names

    gpus = len(gpu_names())
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if gpus else "float32"
    document: dict = {
        "shape": args.shape, "seed": args.seed, "out_dir": args.out, "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_dtype": args.checkpoint_dtype,
        "rates": {**DEFAULT_RATES, **dict(args.rates)}, "duration_s": args.duration,
        "drain_timeout_s": args.drain_timeout, "max_tokens": args.max_tokens,
        "images_per_request": args.images_per_request, "text_only_share": args.text_only_share,
        "repeated_image_share": args.repeated_image_share,
        "parity_requests": args.parity_requests, "kv_cache_gib": args.kv_cache_gib,
        "max_fail_ratio": args.max_fail_ratio,
        "server": {"dtype": dtype, "max_num_seqs": args.max_num_seqs, "cpus": os.cpu_count() or 1, "gpus": gpus,
                   "max_images_per_request": max(args.images_per_request, 1)},
    }
    if args.systems is not None:
        document["systems"] = args.systems
    if args.resolutions is not None:
        document["resolutions"] = args.resolutions
    return BenchConfig.model_validate(document)


def run(args: argparse.Namespace) -> int:
    from dvd_serve.loadtests.bench import run_bench
    from dvd_serve.loadtests.machine import machine_facts
    from dvd_serve.loadtests.report import headline_json, markdown, save_results

    try:
        config = config_from_args(args)
    except (ValidationError, ValueError) as error:
        print(f"bench: invalid settings: {error}", file=sys.stderr)
        return 2
    result = run_bench(config)
    facts = machine_facts(REPOSITORY)
    paths = save_results(result, facts)
    print(markdown(result, facts))
    print(json.dumps({"bench": headline_json(result), "files": paths}))
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m dvd_serve.loadtests.bench_cli ...`, the same as `dvd-serve bench ...`."""
    parser = argparse.ArgumentParser(prog="dvd-serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
