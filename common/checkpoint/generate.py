"""Random-weight InternVL3.5 checkpoints in the real file layouts, streamed to disk one tensor at a time.

Every tensor is drawn from its own generator seeded by (seed, canonical tensor name), so its numbers depend neither
on the format nor on generation order: the hf and chat checkpoints of one seed hold the same values (the hf
`q_proj`/`k_proj`/`v_proj` are the row blocks of the chat `attn.qkv`), and a bfloat16 checkpoint holds the rounded
float32 one. Initialisation keeps activations finite, greedy tokens varied and outputs sensitive to every weight:
embeddings and biases normal(0, 0.02), norms ones/zeros, layer scales uniform in [0.1, 1.0], and linear (and conv)
weights normal with std 1/sqrt(fan_in), which keeps each layer's output about as large as its input. A flat 0.02
would be close to that at full size (0.016 for width 4096) but makes the tiny models' attention scores vanish, so
attention averages uniformly and a swapped q/k or a wrong head split would not change any output. Biases are
random rather than zero so that tests of vision code notice a missing or misplaced bias.

config.json is written last, so its presence means the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from dvd_serve.common.checkpoint import configs
from dvd_serve.common.checkpoint import tokenizer as tok
from dvd_serve.common.checkpoint.layout import OutputPiece, TensorSpec, checkpoint_tensors, output_pieces
from dvd_serve.common.checkpoint.remote_code import REMOTE_CODE_DIR, REMOTE_CODE_FILES
from dvd_serve.common.checkpoint.shapes import ModelShape, get_shape
from dvd_serve.common.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter, WrittenShard

Format = Literal["hf", "chat"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02
LAYER_SCALE_RANGE = (0.1, 1.0)
_PROGRESS_MIN_BYTES = 1024**3


def tensor_seed(seed: int, name: str) -> int:
    """Generator seed of one tensor: a stable hash of the checkpoint seed and the canonical tensor name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_values(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The float32 values of one tensor."""
    if spec.init == "ones":
        return torch.ones(spec.shape)
    if spec.init == "zeros":
        return torch.zeros(spec.shape)
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    values = torch.empty(spec.shape)
    if spec.init == "layer_scale":
        return values.uniform_(*LAYER_SCALE_RANGE, generator=generator)
    if spec.init == "linear":
        fan_in = spec.numel // spec.shape[0]
        return values.normal_(0.0, fan_in**-0.5, generator=generator)
    return values.normal_(0.0, INIT_STD, generator=generator)


def checkpoint_nbytes(shape: ModelShape, vocab_rows: int, *, flash: bool, dtype: str) -> int:
    """Bytes of all weights of a checkpoint (the index's `total_size`)."""
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return sum(spec.numel for spec in checkpoint_tensors(shape, vocab_rows, flash=flash)) * itemsize


def make_checkpoint(
    out_dir: str | Path,
    *,
    fmt: Format,
    shape: str | ModelShape = "tiny",
    flash: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    show_progress: bool | None = None,
) -> Path:
    """Write a random-weight checkpoint into `out_dir` (created; must be empty) and return its path.

    `show_progress` prints one line per shard to stderr; by default only for checkpoints above 1 GiB.
    """
    if fmt not in ("hf", "chat"):
        raise ValueError(f"unknown format {fmt!r}; choose 'hf' or 'chat'")
    if flash and fmt != "chat":
        raise ValueError("Flash checkpoints exist only in the original ('chat') format")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    model_shape = get_shape(shape)
    out = Path(out_dir)
    _prepare_empty_dir(out)
    vocab_rows = model_shape.language.vocab_rows(tok.build_tokenizer().get_vocab_size())
    total_bytes = checkpoint_nbytes(model_shape, vocab_rows, flash=flash, dtype=dtype)
    if show_progress is None:
        show_progress = total_bytes >= _PROGRESS_MIN_BYTES
    reporter = _ProgressReporter(total_bytes) if show_progress else None
    writer = ShardedSafetensorsWriter(out, max_shard_bytes=max_shard_bytes, on_shard_written=reporter)
    for spec in checkpoint_tensors(model_shape, vocab_rows, flash=flash):
        values = initial_values(spec, seed)
        for piece in output_pieces(spec.name, fmt):
            writer.add(piece.name, _piece_values(values, piece).to(DTYPES[dtype]))
        del values
    writer.close()
    _write_side_files(out, model_shape, vocab_rows, fmt=fmt, flash=flash, dtype=dtype)
    return out


def _piece_values(values: torch.Tensor, piece: OutputPiece) -> torch.Tensor:
    if piece.row_block is None:
        return values
    rows = values.shape[0] // piece.row_blocks
    return values[piece.row_block * rows : (piece.row_block + 1) * rows].clone()


def _prepare_empty_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _write_side_files(
    out: Path, shape: ModelShape, vocab_rows: int, *, fmt: Format, flash: bool, dtype: str
) -> None:
    _write_json(out / "generation_config.json", configs.generation_config())
    if fmt == "hf":
        tok.write_tokenizer_files(out, image_text=tok.IMAGE_CONTEXT, declare_processor_roles=True)
        _write_json(out / "processor_config.json", configs.processor_config(shape.vision))
        model_config = configs.hf_config(shape, vocab_rows, dtype)
    else:
        tok.write_tokenizer_files(out, image_text=tok.CHAT_IMAGE_PLACEHOLDER, declare_processor_roles=False)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, out / name)
        model_config = configs.chat_config(shape, vocab_rows, dtype, flash=flash)
    _write_json(out / "config.json", model_config)


class _ProgressReporter:
    """Prints one line per written shard: size, share of the total, elapsed time."""

    def __init__(self, total_bytes: int) -> None:
        self._total_bytes = total_bytes
        self._written_bytes = 0
        self._started = time.monotonic()

    def __call__(self, shard: WrittenShard) -> None:
        self._written_bytes += shard.nbytes
        print(
            f"shard {shard.path.name.split('.')[0]}: {shard.nbytes / 1024**3:.2f} GiB, "
            f"{len(shard.tensor_names)} tensors, {100 * self._written_bytes / self._total_bytes:.1f}% of "
            f"{self._total_bytes / 1024**3:.2f} GiB, {time.monotonic() - self._started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
