"""Pixel shuffle and the MLP projectors that turn ViT patch tokens into LLM-width embeddings.

`mlp1` (256 tokens per tile) follows a pixel shuffle with ratio 1/2: [32, 32, vit] -> [16, 16, 4*vit].
`mlp2` (64 tokens per tile, Flash checkpoints) follows a pixel shuffle with ratio 1/4: [32, 32, vit] -> [8, 8, 16*vit].
Module indices match the checkpoints (`mlp1.{0,1,3}`, `mlp2.{0,1,4,7}`).
"""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle, `ps_version` v2. x: [n, w, h, c] -> [n, w*ratio, h*ratio, c/ratio^2]."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3)


def shuffle_to_tokens(patch_tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """patch_tokens: [tiles, side*side, vit] -> [tiles, (side*ratio)^2, vit/ratio^2], ready for a projector."""
    tiles, count, width = patch_tokens.shape
    side = int(count**0.5)
    shuffled = pixel_shuffle(patch_tokens.reshape(tiles, side, side, width), ratio)
    return shuffled.reshape(tiles, -1, shuffled.shape[-1])


def make_mlp1(in_width: int, llm_hidden: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear (indices 0, 1, 3)."""
    return nn.Sequential(
        nn.LayerNorm(in_width),
        nn.Linear(in_width, llm_hidden),
        nn.GELU(),
        nn.Linear(llm_hidden, llm_hidden),
    )


def make_mlp2(in_width: int, llm_hidden: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear -> GELU -> Dropout -> Linear (indices 0, 1, 4, 7).

    Dropout is an identity at inference; it is kept so the indices line up with the checkpoint.
    """
    return nn.Sequential(
        nn.LayerNorm(in_width),
        nn.Linear(in_width, 2 * llm_hidden),
        nn.GELU(),
        nn.Dropout(0.0),
        nn.Linear(2 * llm_hidden, 2 * llm_hidden),
        nn.GELU(),
        nn.Dropout(0.0),
        nn.Linear(2 * llm_hidden, llm_hidden),
    )
