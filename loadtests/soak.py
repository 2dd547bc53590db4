"""`dvd-serve soak` (or `python -m dvd_serve.loadtests.soak`): a bounded soak with random worker kills.

Starts `dvd-serve serve` on the tiny default checkpoint with two vision replicas (or attaches to --url), offers a
steady open-loop mix of image and text-only streaming requests plus clients that hang up early, and SIGKILLs a
seeded random vision or language worker at seeded random moments. Afterwards it checks that every accepted
request ended in exactly one outcome,

    accepted = succeeded + client errors (4xx, 429 included) + server errors (5xx, error events) + cancelled

as the clients counted them and as the gateway's /metrics counted them, that the gateway's in-flight gauges are
back to 0 and that /ready answers again; and it reports RSS, open file descriptors and threads of every process
group (gateway, vision workers, language workers, Ray) at start and end. Writes into --out: soak.json, the
datasets, the raw samples, resources.csv (a sample every 10 s) and server.log. Prints the tables, then one JSON
line. Exit status: 0 if every check passed, 1 if one failed, 2 if the soak could not run.

    dvd-serve soak --duration 120 --out soak-results
    dvd-serve soak --url http://127.0.0.1:8000 --kill-roles vision --duration 600
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "soak", help="bounded soak with random worker kills: request accounting, RSS, fds, threads",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="attach to this gateway (on this machine, with its embedded Ray); "
                        "default: start dvd-serve serve")
    parser.add_argument("--api-key", help="bearer key of an attached gateway")
    parser.add_argument("--gateway-pid", type=int, help="attached gateway's pid (default: who listens on the port)")
    parser.add_argument("--model", help="checkpoint of the started server (default: the tiny Flash checkpoint)")
    parser.add_argument("--vision-replicas", type=int, default=2, help="vision replicas of the started server")
    parser.add_argument("--lm-replicas", type=int, default=1, help="language replicas of the started server")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load and kills (default 120)")
    parser.add_argument("--rate", type=float, default=1.0, help="steady load: mean arrivals/s (default 1)")
    parser.add_argument("--hang-up-rate", type=float, default=0.2, help="hang-up clients: mean arrivals/s")
    parser.add_argument("--hang-up-after", type=_pair, default=(0.2, 3.0), metavar="MIN,MAX",
                        help="seconds a hang-up client waits for output at most (seeded, default 0.2,3)")
    parser.add_argument("--resolution", type=int, default=448, help="image side in px (default 448)")
    parser.add_argument("--images-per-request", type=int, default=1, help="images per image request (default 1)")
    parser.add_argument("--text-only-share", type=float, default=0.3, help="share of text-only requests")
    parser.add_argument("--repeated-image-share", type=float, default=0.0,
                        help="share of image requests that resend an earlier request's images (default 0)")
    parser.add_argument("--vision-cache-mib", type=float, default=1024.0,
                        help="embedding cache budget per vision replica, given to the started server and checked "
                        "against the sampled cache sizes (default 1024)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per steady request")
    parser.add_argument("--kill-roles", type=_roles, default=("vision", "language"),
                        help="comma-separated among vision,language,coupled; '' = no kills (default vision,language)")
    parser.add_argument("--kill-interval", type=float, default=30.0, help="mean seconds between kills (default 30)")
    parser.add_argument("--kill-warmup", type=float, default=10.0, help="seconds before the first kill may come")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds running requests may finish")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="most seconds per steady request")
    parser.add_argument("--recovery-timeout", type=float, default=300.0,
                        help="seconds to wait for /ready after the load (killed workers reload)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, arrivals, hang-ups and kills")
    parser.add_argument("--out", default="soak-results", help="output folder (default soak-results)")
    parser.set_defaults(run=run)
    return parser


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds, got {text!r}") from None
    return low, high


def _roles(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def config_from_args(args: argparse.Namespace):
    from dvd_serve.loadtests.soak_run import SoakConfig

    return SoakConfig(
        url=args.url, api_key=args.api_key, gateway_pid=args.gateway_pid, model=args.model,
        vision_replicas=args.vision_replicas, language_replicas=args.lm_replicas, duration_s=args.duration,
        rate=args.rate, hang_up_rate=args.hang_up_rate, hang_up_after_s=args.hang_up_after,
        resolution=args.resolution, images_per_request=args.images_per_request,
        text_only_share=args.text_only_share, repeated_image_share=args.repeated_image_share,
        vision_cache_mib=args.vision_cache_mib, max_tokens=args.max_tokens, kill_roles=args.kill_roles,
        kill_interval_s=args.kill_interval, kill_warmup_s=args.kill_warmup, drain_timeout_s=args.drain_timeout,
        request_timeout_s=args.request_timeout, recovery_timeout_s=args.recovery_timeout, seed=args.seed,
        out_dir=args.out,
    )


def run(args: argparse.Namespace) -> int:
    from dvd_serve.loadtests.soak_report import headline_json, markdown, save_result
    from dvd_serve.loadtests.soak_run import SoakError, run_soak
    from dvd_serve.loadtests.systems import ServerStartError

    try:
        config = config_from_args(args)
    except ValidationError as error:
        print(f"soak: invalid settings: {error}", file=sys.stderr)
        return 2
    try:
        result = run_soak(config)
    except (SoakError, ServerStartError, OSError) as error:
        print(f"soak: could not run: {error}", file=sys.stderr)
        return 2
    save_result(result)
    print(markdown(result))
    headline = headline_json(result)
    print(json.dumps(headline))
    return headline["exit_code"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dvd_serve.loadtests.soak ...`, the same as `dvd-serve soak ...`."""
    from dvd_serve.server.cli import main as dvd_serve_main

    return dvd_serve_main(["soak", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
