"""Read selected tensors from a checkpoint's safetensors files without touching the rest.

A sharded checkpoint's `model.safetensors.index.json` says which shard holds each tensor, so only the shards that
hold a wanted tensor are opened; within a file, safetensors reads just the requested tensors' bytes. The vision
worker uses this to load the ViT and projectors of a model whose language model is tens of GB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from dvd_serve.common.checkpoint.writer import INDEX_FILE, SINGLE_FILE


def _tensor_files(path: Path) -> dict[str, str]:
    """Tensor name -> file name holding it (relative to `path`)."""
    index_path = path / INDEX_FILE
    if index_path.exists():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path} has no weight_map")
        return weight_map
    single = path / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), SINGLE_FILE)


def tensor_names(path: str | Path) -> list[str]:
    """Names of all tensors in the checkpoint, sorted."""
    return sorted(_tensor_files(Path(path)))


def load_tensors(
    path: str | Path,
    prefixes: Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Tensors whose names start with any of `prefixes`, optionally cast to `dtype`, keyed by checkpoint name."""
    if isinstance(prefixes, str):
        raise TypeError("prefixes must be a sequence of strings, not one string")
    folder = Path(path)
    wanted_by_file: dict[str, list[str]] = {}
    for name, file_name in _tensor_files(folder).items():
        if name.startswith(tuple(prefixes)):
            wanted_by_file.setdefault(file_name, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file_name, names in sorted(wanted_by_file.items()):
        with safe_open(str(folder / file_name), framework="pt", device=str(device)) as handle:
            for name in sorted(names):
                tensor = handle.get_tensor(name)
                tensors[name] = tensor if dtype is None else tensor.to(dtype)
    return tensors
