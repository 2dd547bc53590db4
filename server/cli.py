"""The `dvd-serve` command: one sub-command per job, each defined in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from dvd_serve.common.checkpoint import cli as checkpoint_cli
    from dvd_serve.loadtests import soak
    from dvd_serve.server import bench_cli, serve

    parser = argparse.ArgumentParser(prog="dvd-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkpoint_cli.add_parser(commands)
    serve.add_parser(commands)
    bench_cli.add_parser(commands)
    soak.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
