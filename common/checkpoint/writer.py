"""Streams tensors into size-limited safetensors shards plus the `model.safetensors.index.json` that maps them.

Tensors are buffered until the next one would push the shard past `max_shard_bytes`; then the buffer is written
and released, so memory holds at most one shard plus the tensor being added. A tensor larger than the limit gets a
shard of its own. Shards are renamed to `model-0000k-of-0000n.safetensors` once their count is known; a single
shard becomes `model.safetensors` with no index, as transformers writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
# safetensors creates files readable by their owner only; checkpoints are shared like their JSON files.
SHARD_FILE_MODE = 0o644
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_SAFETENSORS_METADATA = {"format": "pt"}


@dataclass(slots=True)
class WrittenShard:
    """A shard on disk under its temporary name, with the tensor names it holds."""

    path: Path
    tensor_names: list[str]
    nbytes: int


@dataclass(slots=True)
class ShardedSafetensorsWriter:
    """Collects named tensors and writes them shard by shard into `out_dir`; call `close()` once at the end."""

    out_dir: Path
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    on_shard_written: Callable[[WrittenShard], None] | None = None
    _buffer: dict[str, torch.Tensor] = field(default_factory=dict)
    _buffer_bytes: int = 0
    _shards: list[WrittenShard] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _closed: bool = False

    def __post_init__(self) -> None:
        if self.max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in memory waiting for the current shard to be written."""
        return self._buffer_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index; returns the files written."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if self._buffer or not self._shards:
            self._flush()
        self._closed = True
        if len(self._shards) == 1:
            final = self.out_dir / SINGLE_FILE
            self._publish(self._shards[0], final)
            return [final]
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        files: list[Path] = []
        for number, shard in enumerate(self._shards, start=1):
            final = self.out_dir / f"model-{number:05d}-of-{count:05d}.safetensors"
            self._publish(shard, final)
            files.append(final)
            weight_map.update(dict.fromkeys(shard.tensor_names, final.name))
        index = {
            "metadata": {"total_size": sum(shard.nbytes for shard in self._shards)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        index_path = self.out_dir / INDEX_FILE
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [*files, index_path]

    @staticmethod
    def _publish(shard: WrittenShard, final: Path) -> None:
        shard.path.rename(final)
        final.chmod(SHARD_FILE_MODE)

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(self._buffer, str(path), metadata=_SAFETENSORS_METADATA)
        shard = WrittenShard(path=path, tensor_names=list(self._buffer), nbytes=self._buffer_bytes)
        self._shards.append(shard)
        self._buffer = {}
        self._buffer_bytes = 0
        if self.on_shard_written is not None:
            self.on_shard_written(shard)
