"""`dvd-serve make-checkpoint`: write a random-weight InternVL3.5 checkpoint in either file layout."""

from __future__ import annotations

import argparse
import sys

from dvd_serve.common.checkpoint.shapes import SHAPES

_GIB = 1024**3


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-checkpoint",
        help="write a random-weight InternVL3.5 checkpoint",
        description=(
            "Write a random-weight InternVL3.5 checkpoint into OUT (a new or empty folder). The same seed and shape "
            "give the same numbers in both formats. Large shapes are streamed to disk shard by shard."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="folder to create")
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=("hf", "chat"),
        required=True,
        help="hf: transformers-native InternVLForConditionalGeneration; chat: original InternVLChatModel",
    )
    parser.add_argument("--flash", action="store_true", help="add the Flash router weights (chat format only)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="model size (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="stored dtype (default: float32)"
    )
    parser.add_argument(
        "--shard-gib", type=float, default=2.0, help="largest shard size in GiB before splitting (default: 2)"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dvd_serve.common.checkpoint.generate import make_checkpoint

    if args.flash and args.fmt != "chat":
        print("make-checkpoint: --flash needs --format chat (Flash is original-format only)", file=sys.stderr)
        return 2
    if args.shard_gib <= 0:
        print("make-checkpoint: --shard-gib must be positive", file=sys.stderr)
        return 2
    try:
        path = make_checkpoint(
            args.out,
            fmt=args.fmt,
            shape=args.shape,
            flash=args.flash,
            seed=args.seed,
            dtype=args.dtype,
            max_shard_bytes=int(args.shard_gib * _GIB),
        )
    except (ValueError, FileExistsError) as error:
        print(f"make-checkpoint: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0
