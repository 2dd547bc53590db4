"""The `dvd-serve` command: one sub-command per job, each defined in its own module.

The product's own commands are `make-checkpoint` and `serve`. Other packages add commands through the
`dvd_serve.commands` entry-point group (a function taking the sub-parsers): the load-test package registers
`bench` and `soak` there, so the serving code never imports it, and an install without it (the runtime image)
simply has no such commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)
COMMAND_GROUP = "dvd_serve.commands"


def build_parser() -> argparse.ArgumentParser:
    from dvd_serve.common.checkpoint import cli as checkpoint_cli
    from dvd_serve.server import serve

    parser = argparse.ArgumentParser(prog="dvd-serve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkpoint_cli.add_parser(commands)
    serve.add_parser(commands)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda entry: entry.name):
        try:
            add_parser = entry.load()
        except ImportError as error:  # its package (or a dependency) is not installed here
            logger.debug("command %s unavailable: %s", entry.name, error)
            continue
        add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
