"""Regenerates the committed Python stubs from the `.proto` files: `python -m dvd_serve.proto.generate`.

Each `.proto` under this folder is compiled under the import path `dvd_serve/proto/...`, so the generated
`*_pb2_grpc.py` import their messages as `dvd_serve.proto.v1.embeddings_pb2` (the package's installed name, not
the folder's name on disk). Output is byte-for-byte reproducible for a given grpcio-tools version.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
IMPORT_PREFIX = "dvd_serve/proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every `.proto` below `root`, as paths relative to it, in a stable order."""
    return sorted(path.relative_to(root) for path in root.rglob("*.proto"))


def generated_names(proto: Path) -> list[Path]:
    """Stub files protoc writes for one `.proto` (relative to the proto root)."""
    stem = proto.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in GENERATED_SUFFIXES]


def run_protoc(arguments: list[str]) -> None:
    from grpc_tools import protoc  # test/proto extra only; never needed at run time

    exit_code = protoc.main(["grpc_tools.protoc", *arguments])
    if exit_code != 0:
        raise RuntimeError(f"protoc failed with exit code {exit_code}")


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compiles every `.proto` under `proto_root` and writes the stubs under `out_root` at the same relative paths.

    Returns the written files. `out_root` may be `proto_root` itself (regeneration in place).
    """
    protos = proto_files(proto_root)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="dvd-serve-protoc-") as scratch:
        scratch_root = Path(scratch)
        run_protoc(
            [
                f"-I{IMPORT_PREFIX}={proto_root}",
                f"--python_out={scratch_root}",
                f"--pyi_out={scratch_root}",
                f"--grpc_python_out={scratch_root}",
                *(f"{IMPORT_PREFIX}/{proto.as_posix()}" for proto in protos),
            ]
        )
        for proto in protos:
            for name in generated_names(proto):
                target = out_root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(scratch_root / IMPORT_PREFIX / name, target)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="root to write stubs under (default: in place)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
